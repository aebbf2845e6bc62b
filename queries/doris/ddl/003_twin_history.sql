-- One row per device-twin version (from the compacted topic twin.state). UNIQUE KEY
-- (device_id, version); the sequence column last_reported_seq keeps the copy with the newest
-- report when the hot worker re-publishes a version (as ReplacingMergeTree(last_reported_seq)
-- does on ClickHouse).
CREATE TABLE IF NOT EXISTS twin_history (
    device_id         VARCHAR(256) NOT NULL,
    version           BIGINT NOT NULL,
    updated_at        DATETIME(3) NOT NULL,
    stored_at         DATETIME(3) NULL DEFAULT CURRENT_TIMESTAMP(3),
    desired           STRING NOT NULL,
    reported          STRING NOT NULL,
    delta             STRING NOT NULL,
    delta_keys        INT NOT NULL,
    last_reported_seq BIGINT NOT NULL,
    org               VARCHAR(256) NOT NULL DEFAULT "",
    project           VARCHAR(256) NOT NULL DEFAULT "",
    `group`           VARCHAR(256) NOT NULL DEFAULT ""
)
UNIQUE KEY(device_id, version)
DISTRIBUTED BY HASH(device_id) BUCKETS AUTO
PROPERTIES (
    "enable_unique_key_merge_on_write" = "true",
    "function_column.sequence_col" = "last_reported_seq",
    "replication_num" = "1"
);
