-- answers: each device's twin at a point in time (its highest version changed at or before
--          `at`; '' = its latest version), and on every row how many listed devices have a
--          non-empty delta (not converged)
-- params: at String ''
-- params: device_prefix String ''
-- Doris dialect (queries/twin_history.sql is ClickHouse's). `at` is 'YYYY-MM-DD HH:MM:SS' UTC.
SELECT
    device_id,
    version,
    updated_at,
    desired,
    reported,
    delta,
    delta_keys,
    last_reported_seq,
    sum(if(delta_keys > 0, 1, 0)) OVER () AS not_converged_devices
FROM
(
    SELECT
        h.*,
        row_number() OVER (PARTITION BY device_id ORDER BY version DESC) AS newest
    FROM twin_history h
    WHERE starts_with(device_id, {device_prefix:String})
      AND ({at:String} = '' OR updated_at <= CAST({at:String} AS DATETIME(3)))
) versions
WHERE newest = 1
ORDER BY device_id
