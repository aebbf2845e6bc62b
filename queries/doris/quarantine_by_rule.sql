-- answers: rows held in quarantine (not released), per rule of the quality gate
-- params: device_prefix String ''
-- Doris dialect (queries/quarantine_by_rule.sql is ClickHouse's).
SELECT rule, count(*) AS `rows`
FROM quarantine
WHERE released = 0 AND starts_with(device_id, {device_prefix:String})
GROUP BY rule
ORDER BY rule
