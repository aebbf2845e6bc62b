"""The quality gate in the cold path: each telemetry batch judged (sinks/quality/gate.py) before
it is stored; refused rows to the ``quarantine`` table and to ``dlq.quality``, the rest to
``telemetry``; releases asked on ``quality.release`` applied in the same writer thread.

All of it runs in the loader's one writer thread, before the batch's offsets are committed
(streams/runtime/loader.py), so a crash anywhere re-reads the batch: the gate judges it as
before (it is pure), both inserts carry their deduplication tokens, and a dead letter may be
sent twice (the dead-letter topics are at-least-once). Counters count a batch once, after all
of it is stored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import pyarrow as pa

from sinks.clickhouse import TELEMETRY_TABLE, ClickHouseSink, WriteResult, telemetry_to_arrow
from sinks.quality.gate import check_batch
from sinks.quality.quarantine import Quarantine, ReleaseFilter, batch_id
from sinks.quality.rules import QualityRules
from streams.runtime.records import DeadLetter, SourceRecord

__all__ = [
    "QUALITY_DLQ_TOPIC",
    "RELEASE_TABLE",
    "RELEASE_TOPIC",
    "QualityCounters",
    "QualityPath",
    "no_registry",
]

log = logging.getLogger("fleetstream.quality")

QUALITY_DLQ_TOPIC: Final = "dlq.quality"
RELEASE_TOPIC: Final = "quality.release"
RELEASE_TABLE: Final = "quality_release"  # the loader's name for what the requests "store"
QUALITY_STAGE: Final = "quality"  # header `source` of its dead letters
_RECENT_RELEASES: Final = 50

# The registry's device ids as an Arrow string array; None while there is no registry (the
# unknown-device rule is then off).
KnownDevices = Callable[[], pa.Array | None]


def no_registry() -> pa.Array | None:
    return None


@dataclass
class QualityCounters:
    checked: int = 0  # telemetry rows judged
    quarantined: int = 0
    by_rule: dict[str, int] = field(default_factory=dict)
    released: int = 0
    releases: dict[str, int] = field(default_factory=dict)  # recent request id -> rows moved

    def status(self) -> dict[str, Any]:
        return {
            "checked": self.checked,
            "quarantined": self.quarantined,
            "by_rule": dict(self.by_rule),
            "released": self.released,
            "releases": dict(self.releases),
        }


class QualityPath:
    """The telemetry writer with the gate in front, and the release requests' writer."""

    def __init__(
        self,
        sink: ClickHouseSink,
        rules: QualityRules | None,
        dead_letter: Callable[[list[DeadLetter]], None],
        known_devices: KnownDevices = no_registry,
    ) -> None:
        self.sink = sink
        self.rules = rules  # None: the gate is off, every row loads
        self.quarantine = Quarantine(sink)
        self.dead_letter = dead_letter
        self.known_devices = known_devices
        self.counters = QualityCounters()

    def write_telemetry(
        self, records: list[dict[str, Any]], sources: list[SourceRecord]
    ) -> WriteResult:
        batch = telemetry_to_arrow(records)
        if self.rules is None:
            return self.sink.write_arrow(TELEMETRY_TABLE, batch)
        verdict = check_batch(batch, self.rules, self.known_devices())
        if len(verdict.bad):
            where = [(s.topic, s.partition, s.offset) for s in sources]
            self.quarantine.write(verdict.bad, batch_id(where))
            self.dead_letter(_dead_letters(verdict.bad, verdict.bad_rows, sources))
        result = self.sink.write_arrow(TELEMETRY_TABLE, verdict.good)
        self.counters.checked += len(batch)
        self.counters.quarantined += len(verdict.bad)
        for rule, rows in verdict.failed.items():
            self.counters.by_rule[rule] = self.counters.by_rule.get(rule, 0) + rows
        return result

    def apply_releases(self, records: list[dict[str, Any]]) -> None:
        """Apply ``QualityRelease`` requests in order (each idempotent)."""
        for record in records:
            which = ReleaseFilter(record.get("rule") or "", record.get("device_id") or "")
            moved = self.quarantine.release(which)
            log.info(
                "quality release %s by %s (%s): %d row(s) moved to telemetry",
                record["request_id"],
                record.get("principal", "?"),
                which,
                moved,
            )
            self.counters.released += moved
            self.counters.releases[str(record["request_id"])] = moved
            while len(self.counters.releases) > _RECENT_RELEASES:
                self.counters.releases.pop(next(iter(self.counters.releases)))

    def status(self) -> Mapping[str, Any]:
        return {"quality": self.counters.status()}


def _dead_letters(
    bad: pa.Table, rows: pa.Array, sources: Sequence[SourceRecord]
) -> list[DeadLetter]:
    """One dead letter per refused row: its original record, the rule and the reason."""
    rules = bad.column("rule").to_pylist()
    reasons = bad.column("reason").to_pylist()
    return [
        DeadLetter(sources[row], str(rule), str(reason), stage=QUALITY_STAGE)
        for row, rule, reason in zip(rows.to_pylist(), rules, reasons, strict=True)
    ]
