-- answers: the devices whose battery drains fastest over the last N minutes: the slope of the
--          least-squares line through battery against device time, in battery units (%) per
--          hour (positive = draining), with the first and last level seen
-- params: minutes UInt32 1440
-- params: min_samples UInt32 3
-- params: limit UInt32 10
-- params: device_prefix String ''
-- Doris dialect (queries/battery_drain.sql is ClickHouse's): the slope is
-- covar_samp(hours, battery) / var_samp(hours).
SELECT
    device_id,
    count(*) AS samples,
    -round(covar_samp(hours, battery) / nullif(var_samp(hours), 0), 6) AS drain_per_hour,
    min_by(battery, ts) AS first_battery,
    max_by(battery, ts) AS last_battery
FROM
(
    SELECT device_id, ts, battery, milliseconds_diff(ts, now(3)) / 3600000.0 AS hours
    FROM telemetry
    WHERE battery IS NOT NULL
      AND ts >= minutes_sub(now(3), {minutes:UInt32})
      AND starts_with(device_id, {device_prefix:String})
) readings
GROUP BY device_id
HAVING count(*) >= {min_samples:UInt32}
ORDER BY drain_per_hour DESC, device_id
LIMIT {limit:UInt32}
