-- answers: messages held in quarantine (refused by the quality gate, not released, and not in
--          telemetry either: a conflicting copy of a stored message is quarantined under
--          `duplicate` but was not lost), of devices with a prefix. The demo's "quarantined",
--          so that stored + quarantined == published.
-- params: device_prefix String ''
SELECT uniqExact(device_id, seq) AS quarantined
FROM quarantine FINAL
WHERE released = 0
  AND startsWith(device_id, {device_prefix:String})
  AND (device_id, seq) NOT IN (
      SELECT device_id, seq FROM telemetry FINAL WHERE startsWith(device_id, {device_prefix:String})
  )
