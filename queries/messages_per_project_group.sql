-- answers: messages per minute per project and device group over the last N minutes, and how
--          many devices sent them, by the tenant columns every row carries (the device
--          registry's organization, project and group when the row was loaded; no join).
--          Rows of devices the registry did not know have empty ones.
-- params: minutes UInt32 60
-- params: device_prefix String ''
-- Reads the telemetry_1m rollup (one row per device and minute, fit for long windows); its
-- message count is uniqExact(seq), so a re-sent message is counted once.
SELECT
    minute,
    org,
    project,
    `group`,
    sum(device_messages) AS messages,
    count() AS devices
FROM
(
    SELECT device_id, org, project, `group`, minute, uniqExactMerge(messages) AS device_messages
    FROM telemetry_1m
    WHERE minute >= toStartOfMinute(now() - toIntervalMinute({minutes:UInt32}))
      AND startsWith(device_id, {device_prefix:String})
    GROUP BY device_id, org, project, `group`, minute
)
GROUP BY minute, org, project, `group`
ORDER BY minute, org, project, `group`
