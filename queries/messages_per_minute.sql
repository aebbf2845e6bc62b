-- answers: messages per minute per device group over the last N minutes, and how many devices
--          sent them. Until the device registry exists, a device's group is its id without the
--          last '-' segment (sim-00042 -> sim; fleet provision's <group>-<hex> -> <group>).
-- params: minutes UInt32 60
-- params: device_prefix String ''
-- Reads the telemetry_1m rollup (one row per device and minute, fit for long windows); its
-- message count is uniqExact(seq), so a re-sent message is counted once.
SELECT
    minute,
    replaceRegexpOne(device_id, '-[^-]*$', '') AS device_group,
    sum(device_messages) AS messages,
    count() AS devices
FROM
(
    SELECT device_id, minute, uniqExactMerge(messages) AS device_messages
    FROM telemetry_1m
    WHERE minute >= toStartOfMinute(now() - toIntervalMinute({minutes:UInt32}))
      AND startsWith(device_id, {device_prefix:String})
    GROUP BY device_id, minute
)
GROUP BY minute, device_group
ORDER BY minute, device_group
