-- One row per (rollout, cohort) per rollout version, loaded by the cold worker from the
-- compacted topic ota.rollouts (Avro Rollout, written by the OTA controller after every
-- change): the rollout's state, its artifact version, target and current cohort, and for each
-- cohort its size and how many of its devices are in each progress status (in_progress =
-- downloading + verifying + installing). A rollout not split into cohorts yet (pending
-- approval, approved, rejected, aborted before its first tick) has one row, cohort 0, with
-- zero counts, so every transition reaches the table.
-- A re-delivered rollout record (the insert done, the offset commit not) must not double its
-- rows. (rollout_id, cohort, updated_at) identifies a row, so this is the exactly-once design
-- of telemetry on that key: ReplacingMergeTree ORDER BY (rollout_id, cohort, updated_at), read
-- FINAL, and inserts with a dedup token within the same deduplication window as the other
-- tables, so a re-delivered batch is dropped at insert. Compaction keeps a rollout's newest
-- record only: a cold worker lagging past it leaves gaps in the history, never a doubled row.
-- The devices' own status reports are not here: they are already in device_events (type
-- ota_status, attributes status, version, command_id, rollout_id); the view
-- ota_device_events below shows them as columns.
CREATE TABLE IF NOT EXISTS ota_events
(
    rollout_id      String,
    updated_at      DateTime64(3, 'UTC'),
    stored_at       DateTime64(3, 'UTC') DEFAULT now64(3),
    state           LowCardinality(String),
    version         String,
    target          String,
    current_cohort  Int32,
    cohort          UInt32,
    devices         UInt32,
    planned         UInt32,
    skipped         UInt32,
    sent            UInt32,
    in_progress     UInt32,
    succeeded       UInt32,
    failed          UInt32,
    rollback_sent   UInt32,
    rolled_back     UInt32,
    rollback_failed UInt32,
    reason          Nullable(String)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(updated_at)
ORDER BY (rollout_id, cohort, updated_at)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE VIEW IF NOT EXISTS ota_device_events AS
SELECT
    device_id,
    seq,
    ts,
    received_at,
    attributes['rollout_id'] AS rollout_id,
    attributes['command_id'] AS command_id,
    attributes['status']     AS status,
    attributes['version']    AS version,
    message                  AS reason
FROM device_events
WHERE type = 'ota_status';
