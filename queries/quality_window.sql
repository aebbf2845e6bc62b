-- answers: the newest telemetry rows stored in the last N minutes (at most R), with how far
--          each reading's clock was ahead of the bridge's: what `fleet quality report`
--          validates with great-expectations
-- params: minutes UInt32 60
-- params: rows UInt32 100000
-- params: device_prefix String ''
SELECT device_id, seq, ts, received_at,
       toInt64(toUnixTimestamp64Milli(ts) - toUnixTimestamp64Milli(received_at)) AS ahead_ms,
       temperature, humidity, battery, vibration_rms
FROM telemetry FINAL
WHERE stored_at >= now64(3) - toIntervalMinute({minutes:UInt32})
  AND startsWith(device_id, {device_prefix:String})
ORDER BY stored_at DESC
LIMIT {rows:UInt32}
