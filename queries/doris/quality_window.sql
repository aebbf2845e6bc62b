-- answers: the newest telemetry rows stored in the last N minutes (at most R), with how far
--          each reading's clock was ahead of the bridge's: what `fleet quality report`
--          validates with great-expectations
-- params: minutes UInt32 60
-- params: rows UInt32 100000
-- params: device_prefix String ''
-- Doris dialect (queries/quality_window.sql is ClickHouse's).
SELECT device_id, seq, ts, received_at,
       milliseconds_diff(ts, received_at) AS ahead_ms,
       temperature, humidity, battery, vibration_rms
FROM telemetry
WHERE stored_at >= minutes_sub(now(3), {minutes:UInt32})
  AND starts_with(device_id, {device_prefix:String})
ORDER BY stored_at DESC
LIMIT {rows:UInt32}
