-- One row per device lifecycle event (connect, disconnect, ota_status, ...); same
-- exactly-once design as telemetry: ReplacingMergeTree on (device_id, seq) + insert tokens.
CREATE TABLE IF NOT EXISTS device_events
(
    device_id   LowCardinality(String),
    seq         UInt64,
    ts          DateTime64(3, 'UTC'),
    received_at DateTime64(3, 'UTC'),
    stored_at   DateTime64(3, 'UTC') DEFAULT now64(3),
    type        LowCardinality(String),
    message     Nullable(String),
    attributes  Map(String, String)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (device_id, seq)
SETTINGS non_replicated_deduplication_window = 10000;
