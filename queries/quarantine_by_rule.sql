-- answers: rows held in quarantine (not released), per rule of the quality gate
-- params: device_prefix String ''
SELECT rule, count() AS rows
FROM quarantine FINAL
WHERE released = 0 AND startsWith(device_id, {device_prefix:String})
GROUP BY rule
ORDER BY rule
