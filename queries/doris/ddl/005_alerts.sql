-- One row per alert lifecycle record (topic alerts): a raise and its resolve share alert_id
-- (deterministic from device, rule and raising seq), so UNIQUE KEY (alert_id, status): a
-- re-delivered record replaces itself, a resolve never replaces its raise.
CREATE TABLE IF NOT EXISTS alerts (
    alert_id  VARCHAR(256) NOT NULL,
    status    VARCHAR(16) NOT NULL,
    device_id VARCHAR(256) NOT NULL,
    rule_id   VARCHAR(256) NOT NULL,
    metric    VARCHAR(256) NOT NULL,
    value     DOUBLE NULL,
    threshold DOUBLE NOT NULL,
    severity  VARCHAR(16) NOT NULL,
    seq       BIGINT NOT NULL,
    ts        DATETIME(3) NOT NULL,
    stored_at DATETIME(3) NULL DEFAULT CURRENT_TIMESTAMP(3),
    org       VARCHAR(256) NOT NULL DEFAULT "",
    project   VARCHAR(256) NOT NULL DEFAULT "",
    `group`   VARCHAR(256) NOT NULL DEFAULT ""
)
UNIQUE KEY(alert_id, status)
DISTRIBUTED BY HASH(alert_id) BUCKETS AUTO
PROPERTIES (
    "enable_unique_key_merge_on_write" = "true",
    "replication_num" = "1"
);
