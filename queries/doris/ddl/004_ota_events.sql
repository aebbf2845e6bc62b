-- One row per (rollout, cohort) per rollout version (from the compacted topic ota.rollouts).
-- UNIQUE KEY (rollout_id, cohort, updated_at); no sequence column: the cold worker keeps only
-- the newest of the versions sharing a millisecond within a batch, and batches load in topic
-- order from its one writer thread, so the last load is the newest.
CREATE TABLE IF NOT EXISTS ota_events (
    rollout_id      VARCHAR(256) NOT NULL,
    cohort          INT NOT NULL,
    updated_at      DATETIME(3) NOT NULL,
    stored_at       DATETIME(3) NULL DEFAULT CURRENT_TIMESTAMP(3),
    state           VARCHAR(64) NOT NULL,
    version         STRING NOT NULL,
    target          STRING NOT NULL,
    current_cohort  INT NOT NULL,
    devices         INT NOT NULL,
    planned         INT NOT NULL,
    skipped         INT NOT NULL,
    sent            INT NOT NULL,
    in_progress     INT NOT NULL,
    succeeded       INT NOT NULL,
    failed          INT NOT NULL,
    rollback_sent   INT NOT NULL,
    rolled_back     INT NOT NULL,
    rollback_failed INT NOT NULL,
    reason          STRING NULL,
    org             VARCHAR(256) NOT NULL DEFAULT "",
    project         VARCHAR(256) NOT NULL DEFAULT "",
    `group`         VARCHAR(256) NOT NULL DEFAULT ""
)
UNIQUE KEY(rollout_id, cohort, updated_at)
DISTRIBUTED BY HASH(rollout_id) BUCKETS AUTO
PROPERTIES (
    "enable_unique_key_merge_on_write" = "true",
    "replication_num" = "1"
);
