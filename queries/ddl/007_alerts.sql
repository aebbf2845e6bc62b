-- One row per alert lifecycle record (topic alerts, Avro Alert: raised, then resolved), loaded
-- by the cold worker with its device's tenant. (device_id, alert_id, status) identifies a
-- record (a replay of the hot job yields the same alert id), so this is the exactly-once
-- design of telemetry on that key: ReplacingMergeTree, read FINAL, inserts with a dedup token.
CREATE TABLE IF NOT EXISTS alerts
(
    device_id  LowCardinality(String),
    org        LowCardinality(String) DEFAULT '',
    project    LowCardinality(String) DEFAULT '',
    `group`    LowCardinality(String) DEFAULT '',
    alert_id   String,
    status     LowCardinality(String),
    rule_id    String,
    metric     LowCardinality(String),
    value      Nullable(Float64),
    threshold  Float64,
    severity   LowCardinality(String),
    seq        Int64,
    ts         DateTime64(3, 'UTC'),
    stored_at  DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (device_id, alert_id, status)
SETTINGS non_replicated_deduplication_window = 10000;
