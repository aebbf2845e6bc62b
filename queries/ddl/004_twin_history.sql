-- One row per device-twin version, loaded by the cold worker from the compacted topic
-- twin.state. A twin version is written once per accepted change; a re-delivery after a crash
-- (the insert done, the offset commit not) must not double it. (device_id, version)
-- identifies a twin state, so this is the exactly-once design of telemetry on that key:
-- ReplacingMergeTree ORDER BY (device_id, version), read FINAL, and inserts with a dedup
-- token within the same deduplication window, so a re-delivered batch is dropped at insert.
-- The hot worker also re-publishes a version when only last_reported_seq advanced (a report
-- that changed nothing): same documents, newer seq. Its token differs (it hashes
-- last_reported_seq too), and the version column of the engine keeps that newer copy.
-- updated_at is fixed per version, so every copy of a version lands in the same partition.
-- Compaction keeps a device's newest state only: a cold worker lagging past it leaves gaps
-- in the history, never a wrong or doubled version.
CREATE TABLE IF NOT EXISTS twin_history
(
    device_id         LowCardinality(String),
    version           UInt64,
    updated_at        DateTime64(3, 'UTC'),
    stored_at         DateTime64(3, 'UTC') DEFAULT now64(3),
    desired           String,
    reported          String,
    delta             String,
    delta_keys        UInt32,
    last_reported_seq Int64
)
ENGINE = ReplacingMergeTree(last_reported_seq)
PARTITION BY toYYYYMM(updated_at)
ORDER BY (device_id, version)
SETTINGS non_replicated_deduplication_window = 10000;
