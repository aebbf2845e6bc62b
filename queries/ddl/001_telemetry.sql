-- One row per device telemetry message. (device_id, seq) identifies a message: a re-sent
-- message lands in the same partition (ts is the device's, unchanged on re-send) and the
-- same sorting key, so ReplacingMergeTree keeps one copy when parts merge; analyst queries
-- read FINAL to be exact before merges. The deduplication window makes ClickHouse drop a
-- re-delivered insert whose insert_deduplication_token (or data hash) it has already seen.
CREATE TABLE IF NOT EXISTS telemetry
(
    device_id     LowCardinality(String),
    seq           UInt64,
    ts            DateTime64(3, 'UTC'),
    received_at   DateTime64(3, 'UTC'),
    stored_at     DateTime64(3, 'UTC') DEFAULT now64(3),
    temperature   Nullable(Float64),
    humidity      Nullable(Float64),
    battery       Nullable(Float64),
    vibration_rms Nullable(Float64),
    extra         Map(String, Float64)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (device_id, seq)
SETTINGS non_replicated_deduplication_window = 10000;
