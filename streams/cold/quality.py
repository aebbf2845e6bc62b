"""The quality gate in the cold path, in front of either warehouse: each telemetry batch judged
(sinks/quality/gate.py) before it is stored; refused rows to the ``quarantine`` table and to
``dlq.quality``, the rest to ``telemetry``; releases asked on ``quality.release`` applied in
the same writer thread.

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
from typing import Any, Final, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sinks.base import TELEMETRY_TABLE, WarehouseSink, WriteResult
from sinks.clickhouse import telemetry_to_arrow
from sinks.quality.gate import check_batch
from sinks.quality.quarantine import Quarantine, ReleaseFilter, batch_id
from sinks.quality.rules import QualityRules
from streams.cold.registry import TenantColumns
from streams.cold.rows import origin_of
from streams.runtime.records import DeadLetter, SourceRecord

__all__ = [
    "QUALITY_DLQ_TOPIC",
    "RELEASE_TABLE",
    "RELEASE_TOPIC",
    "DeviceLookup",
    "QualityCounters",
    "QualityPath",
    "registry_columns",
]

log = logging.getLogger("fleetstream.quality")

QUALITY_DLQ_TOPIC: Final = "dlq.quality"
RELEASE_TOPIC: Final = "quality.release"
RELEASE_TABLE: Final = "quality_release"  # the loader's name for what the requests "store"
QUALITY_STAGE: Final = "quality"  # header `source` of its dead letters
_RECENT_RELEASES: Final = 50


class DeviceLookup(Protocol):
    """The registry as the gate asks it (streams.cold.registry.DeviceTenants fits)."""

    def tenants(self, device_ids: Sequence[str]) -> TenantColumns: ...


def registry_columns(lookup: DeviceLookup, device_ids: pa.Array) -> tuple[pa.Array, pa.Array]:
    """Per row: whether the registry lacks its device, and its group path (org/project/group;
    null when unknown), for the gate."""
    tenants = lookup.tenants(device_ids.to_pylist())
    unknown = np.zeros(len(device_ids), dtype=bool)
    unknown[tenants.unknown] = True
    mask = pa.array(unknown)
    paths = pc.binary_join_element_wise(
        pa.array(tenants.org, pa.string()),
        pa.array(tenants.project, pa.string()),
        pa.array(tenants.group, pa.string()),
        "/",
    )
    return mask, pc.if_else(mask, pa.scalar(None, pa.string()), paths)


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
        sink: WarehouseSink,
        rules: QualityRules | None,
        dead_letter: Callable[[list[DeadLetter]], None],
        registry: DeviceLookup | None = None,
    ) -> None:
        self.sink = sink
        self.rules = rules  # None: the gate is off, every row loads
        self.quarantine = Quarantine(sink)
        self.dead_letter = dead_letter
        self.registry = registry  # None: no unknown-device rule, no per-group bounds
        self.counters = QualityCounters()

    def write_telemetry(
        self, records: list[dict[str, Any]], sources: list[SourceRecord]
    ) -> WriteResult:
        tenants = None
        if self.registry is not None:
            tenants = self.registry.tenants([r["device_id"] for r in records]).as_columns()
        batch = telemetry_to_arrow(records, tenants)
        origin = origin_of(sources)
        if self.rules is None:
            return self.sink.write_arrow(TELEMETRY_TABLE, batch, origin)
        unknown, groups = None, None
        if self.registry is not None and (self.rules.require_registered or self.rules.groups):
            unknown, groups = registry_columns(self.registry, batch.column("device_id"))
        verdict = check_batch(
            batch,
            self.rules,
            groups=groups,
            unknown_rows=unknown if self.rules.require_registered else None,
        )
        if len(verdict.bad):
            where = [(s.topic, s.partition, s.offset) for s in sources]
            self.quarantine.write(verdict.bad, batch_id(where), origin)
            self.dead_letter(_dead_letters(verdict.bad, verdict.bad_rows, sources))
        result = self.sink.write_arrow(TELEMETRY_TABLE, verdict.good, origin)
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
