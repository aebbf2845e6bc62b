-- One row per device lifecycle event (connect, disconnect, ota_status, ...): the exactly-once
-- design of telemetry, UNIQUE KEY (device_id, seq), sequence column received_at.
CREATE TABLE IF NOT EXISTS device_events (
    device_id   VARCHAR(256) NOT NULL,
    seq         BIGINT NOT NULL,
    ts          DATETIME(3) NOT NULL,
    received_at DATETIME(3) NOT NULL,
    stored_at   DATETIME(3) NULL DEFAULT CURRENT_TIMESTAMP(3),
    type        VARCHAR(64) NOT NULL,
    message     STRING NULL,
    attributes  MAP<STRING, STRING> NULL,
    org         VARCHAR(256) NOT NULL DEFAULT "",
    project     VARCHAR(256) NOT NULL DEFAULT "",
    `group`     VARCHAR(256) NOT NULL DEFAULT ""
)
UNIQUE KEY(device_id, seq)
DISTRIBUTED BY HASH(device_id) BUCKETS AUTO
PROPERTIES (
    "enable_unique_key_merge_on_write" = "true",
    "function_column.sequence_col" = "received_at",
    "replication_num" = "1"
);
