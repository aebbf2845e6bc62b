-- Tenant columns (issue 14): every row carries the organization, project and group of its
-- device as the device registry (registry.devices) said when the cold worker loaded it; an
-- OTA rollout's row, those of its target (empty below the target's level). A device the
-- registry does not hold gets empty strings. They are what the query port's row filters and
-- a ClickHouse server's row policies limit each analyst to (see the README), and what queries
-- by project or group use instead of joins.
-- Existing rows keep their data and get empty tenant columns (only the platform sees them):
-- ADD COLUMN is a metadata change, nothing is rewritten or dropped.
ALTER TABLE telemetry
    ADD COLUMN IF NOT EXISTS org LowCardinality(String) DEFAULT '' AFTER device_id,
    ADD COLUMN IF NOT EXISTS project LowCardinality(String) DEFAULT '' AFTER org,
    ADD COLUMN IF NOT EXISTS `group` LowCardinality(String) DEFAULT '' AFTER project;

ALTER TABLE device_events
    ADD COLUMN IF NOT EXISTS org LowCardinality(String) DEFAULT '' AFTER device_id,
    ADD COLUMN IF NOT EXISTS project LowCardinality(String) DEFAULT '' AFTER org,
    ADD COLUMN IF NOT EXISTS `group` LowCardinality(String) DEFAULT '' AFTER project;

ALTER TABLE twin_history
    ADD COLUMN IF NOT EXISTS org LowCardinality(String) DEFAULT '' AFTER device_id,
    ADD COLUMN IF NOT EXISTS project LowCardinality(String) DEFAULT '' AFTER org,
    ADD COLUMN IF NOT EXISTS `group` LowCardinality(String) DEFAULT '' AFTER project;

ALTER TABLE ota_events
    ADD COLUMN IF NOT EXISTS org LowCardinality(String) DEFAULT '' AFTER rollout_id,
    ADD COLUMN IF NOT EXISTS project LowCardinality(String) DEFAULT '' AFTER org,
    ADD COLUMN IF NOT EXISTS `group` LowCardinality(String) DEFAULT '' AFTER project;

-- The rollup keeps them: a device's tenant is a plain column of its (device_id, minute) row
-- (a device moved to another group within a minute keeps the first one on merge).
ALTER TABLE telemetry_1m
    ADD COLUMN IF NOT EXISTS org LowCardinality(String) DEFAULT '' AFTER device_id,
    ADD COLUMN IF NOT EXISTS project LowCardinality(String) DEFAULT '' AFTER org,
    ADD COLUMN IF NOT EXISTS `group` LowCardinality(String) DEFAULT '' AFTER project;

-- The view is replaced to carry them (the cold worker applies migrations before it loads, so
-- no insert falls between the two statements).
DROP VIEW IF EXISTS telemetry_1m_mv;

CREATE MATERIALIZED VIEW IF NOT EXISTS telemetry_1m_mv TO telemetry_1m AS
SELECT
    device_id,
    org,
    project,
    `group`,
    toStartOfMinute(ts) AS minute,
    uniqExactState(seq) AS messages,
    avgState(temperature) AS temperature_avg,
    min(temperature) AS temperature_min,
    max(temperature) AS temperature_max,
    quantilesState(0.5, 0.95, 0.99)(temperature) AS temperature_q,
    avgState(humidity) AS humidity_avg,
    min(battery) AS battery_min,
    max(vibration_rms) AS vibration_rms_max
FROM telemetry
GROUP BY device_id, org, project, `group`, minute;
