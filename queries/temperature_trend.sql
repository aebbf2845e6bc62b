-- answers: per device and time bucket (default one hour), messages and temperature
--          avg/min/max/p50/p95/p99 over the last N minutes (default 7 days)
-- params: minutes UInt32 10080
-- params: bucket_minutes UInt32 60
-- params: device_prefix String ''
-- Reads the telemetry_1m rollup, so long windows stay cheap. Messages and min/max are exact;
-- avg and quantiles weigh a message re-sent in a different batch twice (see README).
SELECT
    device_id,
    toStartOfInterval(minute, toIntervalMinute({bucket_minutes:UInt32})) AS bucket,
    uniqExactMerge(messages) AS bucket_messages,
    avgMerge(temperature_avg) AS avg_temperature,
    min(temperature_min) AS min_temperature,
    max(temperature_max) AS max_temperature,
    (quantilesMerge(0.5, 0.95, 0.99)(temperature_q) AS q)[1] AS p50_temperature,
    q[2] AS p95_temperature,
    q[3] AS p99_temperature
FROM telemetry_1m
WHERE minute >= toStartOfMinute(now() - toIntervalMinute({minutes:UInt32}))
  AND startsWith(device_id, {device_prefix:String})
GROUP BY device_id, bucket
ORDER BY device_id, bucket
