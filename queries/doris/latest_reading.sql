-- answers: the latest reading of every device (its highest sequence number) and how old it is
-- params: device_prefix String ''
-- Doris dialect (queries/latest_reading.sql is ClickHouse's). UNIQUE KEY tables hold one row
-- per (device_id, seq): no FINAL; the latest row per device by a window function.
SELECT
    device_id,
    seq,
    ts,
    received_at,
    temperature,
    humidity,
    battery,
    vibration_rms,
    extra,
    seconds_diff(now(3), received_at) AS age_s
FROM
(
    SELECT
        t.*,
        row_number() OVER (PARTITION BY device_id ORDER BY seq DESC) AS newest
    FROM telemetry t
    WHERE starts_with(device_id, {device_prefix:String})
) latest
WHERE newest = 1
ORDER BY device_id
