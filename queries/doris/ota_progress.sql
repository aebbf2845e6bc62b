-- answers: per rollout and cohort, its latest state: the rollout's state and artifact version,
--          the cohort's size (skipped devices excluded), how many devices succeeded, failed,
--          were rolled back and are in progress, and the share succeeded
-- params: rollout_id String ''
-- params: device_prefix String ''
-- Doris dialect (queries/ota_progress.sql is ClickHouse's). A `device_prefix` other than ''
-- keeps the rollouts that devices with that prefix reported on (device_events ota_status).
SELECT
    rollout_id,
    cohort,
    state,
    version,
    current_cohort,
    updated_at,
    devices - skipped AS cohort_size,
    succeeded,
    failed,
    rolled_back,
    in_progress,
    round(succeeded / nullif(devices - skipped, 0), 4) AS share_succeeded
FROM
(
    SELECT
        e.*,
        row_number() OVER (PARTITION BY rollout_id, cohort ORDER BY updated_at DESC) AS newest
    FROM ota_events e
    WHERE {rollout_id:String} IN ('', rollout_id)
      AND (
          {device_prefix:String} = ''
          OR rollout_id IN (
              SELECT element_at(attributes, 'rollout_id') FROM device_events
              WHERE type = 'ota_status' AND starts_with(device_id, {device_prefix:String})
          )
      )
) latest
WHERE newest = 1
ORDER BY rollout_id, cohort
