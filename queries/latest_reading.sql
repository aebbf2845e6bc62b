-- answers: the latest reading of every device (its highest sequence number) and how old it is
-- params: device_prefix String ''
-- Reads telemetry FINAL (exact before merges). The readings ride in one tuple so that a NULL
-- metric in the latest message stays NULL instead of falling back to an older value.
SELECT
    device_id,
    latest.1 AS seq,
    latest.2 AS ts,
    latest.3 AS received_at,
    latest.4 AS temperature,
    latest.5 AS humidity,
    latest.6 AS battery,
    latest.7 AS vibration_rms,
    latest.8 AS extra,
    dateDiff('second', latest.3, now64(3)) AS age_s
FROM
(
    SELECT
        device_id,
        argMax(
            (seq, ts, received_at, temperature, humidity, battery, vibration_rms, extra), seq
        ) AS latest
    FROM telemetry FINAL
    WHERE startsWith(device_id, {device_prefix:String})
    GROUP BY device_id
)
ORDER BY device_id
