-- answers: per device and time bucket (default one hour), messages and temperature
--          avg/min/max/p50/p95/p99 over the last N minutes (default 7 days)
-- params: minutes UInt32 10080
-- params: bucket_minutes UInt32 60
-- params: device_prefix String ''
-- Doris dialect (queries/temperature_trend.sql is ClickHouse's, from its rollup): straight
-- from telemetry; exact, as each message is one row.
SELECT
    device_id,
    minute_floor(ts, {bucket_minutes:UInt32}) AS bucket,
    count(*) AS bucket_messages,
    avg(temperature) AS avg_temperature,
    min(temperature) AS min_temperature,
    max(temperature) AS max_temperature,
    percentile(temperature, 0.5) AS p50_temperature,
    percentile(temperature, 0.95) AS p95_temperature,
    percentile(temperature, 0.99) AS p99_temperature
FROM telemetry
WHERE ts >= minutes_sub(now(3), {minutes:UInt32})
  AND starts_with(device_id, {device_prefix:String})
GROUP BY device_id, minute_floor(ts, {bucket_minutes:UInt32})
ORDER BY device_id, bucket
