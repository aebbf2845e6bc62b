-- answers: per rollout and cohort, its latest state: the rollout's state and artifact version,
--          the cohort's size (skipped devices excluded), how many devices succeeded, failed,
--          were rolled back and are in progress, and the share succeeded
-- params: rollout_id String ''
-- params: device_prefix String ''
-- `rollout_id` '' = every rollout. Reads ota_events FINAL (one row per (rollout_id, cohort,
-- updated_at) before merges) and keeps each cohort's row of the rollout's latest record.
-- A rollout not split into cohorts yet shows one row, cohort 0, of size 0. Rows are per
-- cohort, not per device: a `device_prefix` other than '' keeps the rollouts that devices with
-- that prefix reported on (ota_status events in device_events, the view ota_device_events).
-- rolled_back counts confirmed rollbacks; share_succeeded is NULL for an empty cohort.
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
    round(succeeded / nullIf(devices - skipped, 0), 4) AS share_succeeded
FROM
(
    SELECT *
    FROM ota_events FINAL
    WHERE {rollout_id:String} IN ('', rollout_id)
      AND (
          {device_prefix:String} = ''
          OR rollout_id IN (
              SELECT rollout_id FROM ota_device_events
              WHERE startsWith(device_id, {device_prefix:String})
          )
      )
    ORDER BY rollout_id, cohort, updated_at DESC
    LIMIT 1 BY rollout_id, cohort
)
ORDER BY rollout_id, cohort
