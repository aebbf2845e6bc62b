-- One row per device telemetry message. UNIQUE KEY (device_id, seq) with merge-on-write: a
-- message re-sent in another batch replaces its row instead of doubling it; the sequence
-- column (received_at) makes the copy kept the one the bridge received last, whatever order
-- the loads commit in. A re-sent whole batch is refused by its Stream Load label first.
-- org, project, group: the device's tenant as the registry said when the row was loaded.
CREATE TABLE IF NOT EXISTS telemetry (
    device_id     VARCHAR(256) NOT NULL,
    seq           BIGINT NOT NULL,
    ts            DATETIME(3) NOT NULL,
    received_at   DATETIME(3) NOT NULL,
    stored_at     DATETIME(3) NULL DEFAULT CURRENT_TIMESTAMP(3),
    temperature   DOUBLE NULL,
    humidity      DOUBLE NULL,
    battery       DOUBLE NULL,
    vibration_rms DOUBLE NULL,
    extra         MAP<STRING, DOUBLE> NULL,
    org           VARCHAR(256) NOT NULL DEFAULT "",
    project       VARCHAR(256) NOT NULL DEFAULT "",
    `group`       VARCHAR(256) NOT NULL DEFAULT ""
)
UNIQUE KEY(device_id, seq)
DISTRIBUTED BY HASH(device_id) BUCKETS AUTO
PROPERTIES (
    "enable_unique_key_merge_on_write" = "true",
    "function_column.sequence_col" = "received_at",
    "replication_num" = "1"
);
