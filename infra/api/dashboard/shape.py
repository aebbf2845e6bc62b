"""The dashboard's data document, shaped from what the platform already holds: pure functions
(no I/O), so the page, the demo's report and the tests all read one shape.

The document (``GET /dashboard/data``, and the data inlined in ``fleet demo --report``)::

    {"generated_ms", "window_s", "bucket_s",
     "devices": {"registered", "online", "by_status": {status: n}},
     "totals": {"accepted", "stored", "dead_lettered"},
     "throughput": {"t": [bucket start ms], "in": [msgs/s], "stored": [msgs/s]},
     "lag": [{"group", "lag"}],
     "dead_letters": [{"topic", "count"}],
     "alerts": {"t": [minute start ms], "by_severity": {severity: [raised per minute]}},
     "twins": {"total", "converged"},
     "rollouts": [{"rollout_id", "state", "version", "target", "cohort",
                   "updated", "failed", "rolled_back",
                   "cohorts": [{"index", "size", "progress": {status: n}}]}],
     "errors": {source: reason}}

A source that could not be read (the warehouse, Kafka) leaves its part empty and says why
under ``errors``: the page shows what it has.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from streams.hot.alerts import AlertEvent, AlertStatus, Severity
from streams.hot.twin import Twin, delta
from streams.ota.model import Rollout
from streams.ota.summary import rollout_summary
from streams.registry.devices import DeviceRecord

__all__ = [
    "alerts_per_minute",
    "devices_view",
    "rollout_view",
    "throughput_series",
    "twins_view",
]

MINUTE_MS = 60_000


def _bucket_starts(now_ms: int, bucket_ms: int, window_ms: int) -> list[int]:
    """The starts of the buckets that cover the last ``window_ms``, oldest first; the last one
    holds ``now_ms``."""
    last = now_ms - now_ms % bucket_ms
    count = max(1, window_ms // bucket_ms)
    return [last - bucket_ms * i for i in range(count - 1, -1, -1)]


def throughput_series(
    received: Iterable[tuple[int, int]],
    stored: Iterable[tuple[int, int]],
    now_ms: int,
    bucket_s: int,
    window_s: int,
) -> dict[str, list[float] | list[int]]:
    """Messages per second in (received by the bridge) and stored (written to the warehouse),
    per bucket of ``bucket_s`` over the last ``window_s``. ``received``/``stored`` are
    ``(bucket start ms, messages)`` rows, as the warehouse groups them; a bucket with no row is 0,
    rows outside the window are left out."""
    bucket_ms = bucket_s * 1000
    starts = _bucket_starts(now_ms, bucket_ms, window_s * 1000)
    index = {start: i for i, start in enumerate(starts)}

    def rates(rows: Iterable[tuple[int, int]]) -> list[float]:
        counts = [0] * len(starts)
        for start, messages in rows:
            i = index.get(int(start) - int(start) % bucket_ms)
            if i is not None:
                counts[i] += int(messages)
        return [round(c / bucket_s, 3) for c in counts]

    return {"t": starts, "in": rates(received), "stored": rates(stored)}


def alerts_per_minute(
    events: Iterable[AlertEvent], now_ms: int, window_min: int
) -> dict[str, list[int] | dict[str, list[int]]]:
    """Alerts raised per minute (by the device's time of the reading that raised them) over the
    last ``window_min`` minutes, one series per severity (every severity, zeros included)."""
    starts = _bucket_starts(now_ms, MINUTE_MS, window_min * MINUTE_MS)
    index = {start: i for i, start in enumerate(starts)}
    series = {str(s): [0] * len(starts) for s in Severity}
    for event in events:
        if event.status is not AlertStatus.raised:
            continue
        i = index.get(event.ts - event.ts % MINUTE_MS)
        if i is not None:
            series[str(event.severity)][i] += 1
    return {"t": starts, "by_severity": series}


def devices_view(records: Sequence[DeviceRecord], online: int) -> dict[str, Any]:
    """Registered devices by status, and how many sent telemetry lately (``online``)."""
    by_status = Counter(str(r.status) for r in records)
    return {
        "registered": len(records),
        "online": online,
        "by_status": dict(sorted(by_status.items())),
    }


def twins_view(twins: Iterable[Twin]) -> dict[str, int]:
    """Twins, and those converged: reported matches desired (an empty delta)."""
    total = converged = 0
    for twin in twins:
        total += 1
        converged += not delta(twin)
    return {"total": total, "converged": converged}


def rollout_view(rollout: Rollout) -> dict[str, Any]:
    """One rollout as the dashboard shows it: its summary and each cohort's devices by progress
    status."""
    summary = rollout_summary(rollout)
    cohorts = [
        {
            "index": i,
            "size": len(members),
            "progress": {str(k): v for k, v in sorted(rollout.counts(i).items())},
        }
        for i, members in enumerate(rollout.cohorts)
    ]
    keep = ("rollout_id", "state", "version", "target", "cohort", "updated", "failed")
    return {
        **{k: summary[k] for k in keep},
        "rolled_back": summary["rolled_back"],
        "cohorts": cohorts,
    }


def rollouts_view(rollouts: Mapping[str, Rollout], limit: int = 10) -> list[dict[str, Any]]:
    """The ``limit`` rollouts changed last, newest first."""
    newest = sorted(rollouts.values(), key=lambda r: r.updated_ms, reverse=True)[:limit]
    return [rollout_view(r) for r in newest]
