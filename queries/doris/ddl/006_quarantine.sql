-- Telemetry rows the quality gate refused: telemetry's columns plus the rule, the reason and
-- the batch (its Kafka topic/partition/offset ranges). UNIQUE KEY (device_id, seq); the
-- sequence column `released` keeps the released copy once `fleet quality release` wrote it.
CREATE TABLE IF NOT EXISTS quarantine (
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
    rule          VARCHAR(128) NOT NULL,
    reason        STRING NOT NULL,
    batch_id      STRING NOT NULL,
    released      TINYINT NOT NULL DEFAULT "0",
    org           VARCHAR(256) NOT NULL DEFAULT "",
    project       VARCHAR(256) NOT NULL DEFAULT "",
    `group`       VARCHAR(256) NOT NULL DEFAULT ""
)
UNIQUE KEY(device_id, seq)
DISTRIBUTED BY HASH(device_id) BUCKETS AUTO
PROPERTIES (
    "enable_unique_key_merge_on_write" = "true",
    "function_column.sequence_col" = "released",
    "replication_num" = "1"
);
