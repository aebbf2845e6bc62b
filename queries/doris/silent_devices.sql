-- answers: devices whose latest telemetry reached the platform more than N minutes ago
--          (bridge clock, received_at), oldest first
-- params: minutes UInt32 15
-- params: device_prefix String ''
-- Doris dialect (queries/silent_devices.sql is ClickHouse's).
SELECT
    device_id,
    max(received_at) AS last_seen,
    max(seq) AS last_seq,
    seconds_diff(now(3), max(received_at)) AS silent_s
FROM telemetry
WHERE starts_with(device_id, {device_prefix:String})
GROUP BY device_id
HAVING max(received_at) < minutes_sub(now(3), {minutes:UInt32})
ORDER BY last_seen, device_id
