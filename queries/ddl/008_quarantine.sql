-- Telemetry rows the cold path's quality gate refused (sinks/quality/rules.toml): telemetry's
-- columns plus the rule a row failed, the reason, and the batch it came in (its Kafka
-- topic/partition/offset ranges). Written in the same step as the batch's good rows, before
-- its offsets are committed, with an insert deduplication token like telemetry's, so a batch
-- re-read after a crash is not quarantined twice. `fleet quality release` moves rows into
-- telemetry: it copies them there, then inserts a copy here with released = 1 (the engine's
-- version column keeps that copy), so a release is idempotent and leaves the audit trail.
CREATE TABLE IF NOT EXISTS quarantine
(
    device_id      LowCardinality(String),
    seq            UInt64,
    ts             DateTime64(3, 'UTC'),
    received_at    DateTime64(3, 'UTC'),
    stored_at      DateTime64(3, 'UTC') DEFAULT now64(3),
    temperature    Nullable(Float64),
    humidity       Nullable(Float64),
    battery        Nullable(Float64),
    vibration_rms  Nullable(Float64),
    extra          Map(String, Float64),
    org            LowCardinality(String) DEFAULT '',
    project        LowCardinality(String) DEFAULT '',
    `group`        LowCardinality(String) DEFAULT '',
    rule           LowCardinality(String),
    reason         String,
    batch_id       String,
    released       UInt8 DEFAULT 0
)
ENGINE = ReplacingMergeTree(released)
ORDER BY (device_id, seq)
SETTINGS non_replicated_deduplication_window = 10000;
