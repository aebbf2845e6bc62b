-- answers: the devices whose battery drains fastest over the last N minutes: the slope of the
--          least-squares line through battery against device time, in battery units (%) per
--          hour (positive = draining), with the first and last level seen
-- params: minutes UInt32 1440
-- params: min_samples UInt32 3
-- params: limit UInt32 10
-- params: device_prefix String ''
-- Reads telemetry FINAL (exact before merges).
SELECT
    device_id,
    count() AS samples,
    -round(simpleLinearRegression(
        dateDiff('millisecond', now64(3), ts) / 3600000.0, assumeNotNull(battery)
    ).1, 6) AS drain_per_hour,
    argMin(battery, ts) AS first_battery,
    argMax(battery, ts) AS last_battery
FROM telemetry FINAL
WHERE battery IS NOT NULL
  AND ts >= now64(3) - toIntervalMinute({minutes:UInt32})
  AND startsWith(device_id, {device_prefix:String})
GROUP BY device_id
HAVING samples >= {min_samples:UInt32}
ORDER BY drain_per_hour DESC, device_id
LIMIT {limit:UInt32}
