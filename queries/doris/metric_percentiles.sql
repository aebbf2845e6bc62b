-- answers: per device and metric, the number of samples and p50/p95/p99 over the last N minutes
--          (device time); metrics are the four named columns and every key of extra
-- params: minutes UInt32 60
-- params: device_prefix String ''
-- Doris dialect (queries/metric_percentiles.sql is ClickHouse's): percentile() is exact
-- (interpolated); extra's keys come out of the map with LATERAL VIEW explode_map.
SELECT
    device_id,
    metric,
    count(*) AS samples,
    percentile(value, 0.5) AS p50,
    percentile(value, 0.95) AS p95,
    percentile(value, 0.99) AS p99
FROM
(
    SELECT device_id, 'temperature' AS metric, temperature AS value, ts FROM telemetry
    UNION ALL SELECT device_id, 'humidity', humidity, ts FROM telemetry
    UNION ALL SELECT device_id, 'battery', battery, ts FROM telemetry
    UNION ALL SELECT device_id, 'vibration_rms', vibration_rms, ts FROM telemetry
    UNION ALL
    SELECT device_id, k AS metric, v AS value, ts
    FROM telemetry LATERAL VIEW explode_map(extra) extra_metrics AS k, v
) readings
WHERE value IS NOT NULL
  AND ts >= minutes_sub(now(3), {minutes:UInt32})
  AND starts_with(device_id, {device_prefix:String})
GROUP BY device_id, metric
ORDER BY device_id, metric
