-- Per-device, per-minute rollup of telemetry for long windows, fed on insert by a
-- materialized view. The view sees every inserted block, before ReplacingMergeTree merges:
--   * messages is uniqExact(seq), so a re-sent message is never counted twice;
--   * min/max are unchanged by a duplicate;
--   * avg and quantiles weigh a message re-sent in a *different* batch twice (a re-delivered
--     identical batch is dropped by its insert token here too, as this table has a window).
-- For exact averages or percentiles over a short window, query telemetry FINAL.
CREATE TABLE IF NOT EXISTS telemetry_1m
(
    device_id         LowCardinality(String),
    minute            DateTime('UTC'),
    messages          AggregateFunction(uniqExact, UInt64),
    temperature_avg   AggregateFunction(avg, Nullable(Float64)),
    temperature_min   SimpleAggregateFunction(min, Nullable(Float64)),
    temperature_max   SimpleAggregateFunction(max, Nullable(Float64)),
    temperature_q     AggregateFunction(quantiles(0.5, 0.95, 0.99), Nullable(Float64)),
    humidity_avg      AggregateFunction(avg, Nullable(Float64)),
    battery_min       SimpleAggregateFunction(min, Nullable(Float64)),
    vibration_rms_max SimpleAggregateFunction(max, Nullable(Float64))
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(minute)
ORDER BY (device_id, minute)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS telemetry_1m_mv TO telemetry_1m AS
SELECT
    device_id,
    toStartOfMinute(ts) AS minute,
    uniqExactState(seq) AS messages,
    avgState(temperature) AS temperature_avg,
    min(temperature) AS temperature_min,
    max(temperature) AS temperature_max,
    quantilesState(0.5, 0.95, 0.99)(temperature) AS temperature_q,
    avgState(humidity) AS humidity_avg,
    min(battery) AS battery_min,
    max(vibration_rms) AS vibration_rms_max
FROM telemetry
GROUP BY device_id, minute;
