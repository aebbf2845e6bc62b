-- answers: messages per minute per device group over the last N minutes, and how many devices
--          sent them (a device's group: its id without the last '-' segment)
-- params: minutes UInt32 60
-- params: device_prefix String ''
-- Doris dialect (queries/messages_per_minute.sql is ClickHouse's, from its rollup): straight
-- from telemetry, one row per message under UNIQUE KEY (device_id, seq).
SELECT
    minute_floor(ts) AS minute,
    regexp_replace(device_id, '-[^-]*$', '') AS device_group,
    count(*) AS messages,
    count(DISTINCT device_id) AS devices
FROM telemetry
WHERE ts >= minute_floor(minutes_sub(now(3), {minutes:UInt32}))
  AND starts_with(device_id, {device_prefix:String})
GROUP BY minute_floor(ts), regexp_replace(device_id, '-[^-]*$', '')
ORDER BY minute, device_group
