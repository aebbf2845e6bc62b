-- answers: messages held in quarantine (refused by the quality gate, not released, and not in
--          telemetry either), of devices with a prefix: the demo's "quarantined"
-- params: device_prefix String ''
-- Doris dialect (queries/quarantined.sql is ClickHouse's).
SELECT count(*) AS quarantined
FROM quarantine q
LEFT JOIN telemetry t ON t.device_id = q.device_id AND t.seq = q.seq
WHERE q.released = 0
  AND starts_with(q.device_id, {device_prefix:String})
  AND t.device_id IS NULL
