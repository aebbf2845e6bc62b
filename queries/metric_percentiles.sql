-- answers: per device and metric, the number of samples and p50/p95/p99 over the last N minutes
--          (device time); metrics are the four named columns and every key of extra
-- params: minutes UInt32 60
-- params: device_prefix String ''
-- quantiles() is exact (interpolated) up to 8192 samples per device and metric, a uniform
-- sample beyond. Reads telemetry FINAL (exact before merges).
SELECT
    device_id,
    metric,
    count() AS samples,
    (quantiles(0.5, 0.95, 0.99)(value) AS q)[1] AS p50,
    q[2] AS p95,
    q[3] AS p99
FROM
(
    SELECT device_id, metric_value.1 AS metric, metric_value.2 AS value
    FROM telemetry FINAL
    ARRAY JOIN arrayConcat(
        [('temperature', temperature), ('humidity', humidity), ('battery', battery),
         ('vibration_rms', vibration_rms)],
        arrayMap((k, v) -> (k, toNullable(v)), mapKeys(extra), mapValues(extra))
    ) AS metric_value
    WHERE ts >= now64(3) - toIntervalMinute({minutes:UInt32})
      AND startsWith(device_id, {device_prefix:String})
)
WHERE value IS NOT NULL
GROUP BY device_id, metric
ORDER BY device_id, metric
