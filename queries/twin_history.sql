-- answers: each device's twin at a point in time (its highest version changed at or before
--          `at`; '' = its latest version): version, when it changed, desired, reported and
--          delta documents, and, on every row, how many of the devices listed have a non-empty
--          delta (desired not yet reported: not converged)
-- params: at String ''
-- params: device_prefix String ''
-- `at` is any date-time parseDateTime64BestEffort reads, UTC unless it names a zone
-- ('2026-01-31 12:00:00', '2026-01-31T12:00:00+01:00'). Reads twin_history FINAL (one row per
-- (device_id, version) before merges). A report that changes nothing advances
-- last_reported_seq without a new version, so a past state shows its version's latest seq.
SELECT
    device_id,
    version,
    updated_at,
    desired,
    reported,
    delta,
    delta_keys,
    last_reported_seq,
    countIf(delta_keys > 0) OVER () AS not_converged_devices
FROM
(
    SELECT device_id, version, updated_at, desired, reported, delta, delta_keys, last_reported_seq
    FROM twin_history FINAL
    WHERE startsWith(device_id, {device_prefix:String})
      AND updated_at <= if(
          {at:String} = '', updated_at, parseDateTime64BestEffort({at:String}, 3, 'UTC')
      )
    ORDER BY device_id, version DESC
    LIMIT 1 BY device_id
)
ORDER BY device_id
