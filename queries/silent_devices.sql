-- answers: devices whose latest telemetry reached the platform more than N minutes ago
--          (bridge clock, received_at), oldest first. Only devices that sent at least once are
--          known until the device registry exists.
-- params: minutes UInt32 15
-- params: device_prefix String ''
SELECT
    device_id,
    max(received_at) AS last_seen,
    max(seq) AS last_seq,
    dateDiff('second', last_seen, now64(3)) AS silent_s
FROM telemetry FINAL
WHERE startsWith(device_id, {device_prefix:String})
GROUP BY device_id
HAVING last_seen < now64(3) - toIntervalMinute({minutes:UInt32})
ORDER BY last_seen, device_id
