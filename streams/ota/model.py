"""A rollout's state: its states and statuses, the :class:`Rollout` record (immutable; the
state machine in streams/ota/rollout.py returns new ones) and its Avro ``Rollout`` form
(``ota.rollouts``, compacted, key = rollout id)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from schemas.records import AvroRecord
from streams.ota.artifacts import Artifact
from streams.ota.plan import RolloutPlan
from streams.registry.rbac import Resource

ROLLOUT_SCHEMA = "Rollout"  # schemas/avro/Rollout.avsc
ROLLOUTS_TOPIC = "ota.rollouts"  # compacted, key = rollout id


class RolloutState(StrEnum):
    pending_approval = "pending_approval"
    approved = "approved"
    running = "running"
    paused = "paused"
    completed = "completed"
    rolling_back = "rolling_back"
    rolled_back = "rolled_back"
    aborted = "aborted"
    rejected = "rejected"


FINAL_STATES = frozenset(
    {RolloutState.completed, RolloutState.rolled_back, RolloutState.aborted, RolloutState.rejected}
)


class OtaStatus(StrEnum):
    """What a device reports on ``ota/status``."""

    downloading = "downloading"
    verifying = "verifying"
    installing = "installing"
    succeeded = "succeeded"
    failed = "failed"


class Progress(StrEnum):
    """A device's progress in a rollout."""

    planned = "planned"  # in a cohort not commanded yet
    skipped = "skipped"  # not commanded: ineligible or already at the version
    sent = "sent"
    downloading = "downloading"
    verifying = "verifying"
    installing = "installing"
    succeeded = "succeeded"
    failed = "failed"
    rollback_sent = "rollback_sent"
    rolled_back = "rolled_back"
    rollback_failed = "rollback_failed"


IN_FLIGHT = frozenset(
    {Progress.sent, Progress.downloading, Progress.verifying, Progress.installing}
)
INSTALL_DONE = frozenset({Progress.succeeded, Progress.failed})
ROLLBACK_STATUSES = frozenset(
    {Progress.rollback_sent, Progress.rolled_back, Progress.rollback_failed}
)


class CommandAction(StrEnum):
    install = "install"
    rollback = "rollback"


class ApprovalDecision(StrEnum):
    approved = "approved"
    rejected = "rejected"


@dataclass(frozen=True, slots=True, kw_only=True)
class Approval(AvroRecord):
    request_id: str
    principal: str
    decision: ApprovalDecision
    ts_ms: int
    comment: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RolloutDevice(AvroRecord):
    """One device's progress in a rollout."""

    device_id: str
    cohort: int
    status: Progress = Progress.planned
    installed: bool = False  # reported installing or succeeded at some point
    previous_version: str | None = None  # registry firmware_version when commanded
    reported_version: str | None = None
    reason: str | None = None
    last_seq: int = -1
    sent_ms: int | None = None
    updated_ms: int = 0
    last_seen_ms: int | None = None  # telemetry seen in the health window


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


@dataclass(frozen=True, kw_only=True)
class Rollout:
    """One rollout. Immutable: :func:`step` returns new rollouts. ``devices`` and ``cohorts``
    are shared between successive rollouts: treat them as read-only."""

    rollout_id: str
    state: RolloutState
    artifact: Artifact
    target: Resource
    plan: RolloutPlan
    created_by: str
    create_request_id: str
    created_ms: int
    updated_ms: int
    paused_from: RolloutState | None = None
    approvals: tuple[Approval, ...] = ()
    cohort_index: int = -1  # -1: not started
    cohorts: tuple[tuple[str, ...], ...] = ()  # each sorted by device id
    cohort_started_ms: int | None = None
    window_started_ms: int | None = None
    rollback_deadline_ms: int | None = None
    devices: Mapping[str, RolloutDevice] = field(default_factory=dict)
    issued: frozenset[str] = frozenset()
    reason: str | None = None
    ended_ms: int | None = None

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def current_cohort(self) -> tuple[str, ...]:
        if 0 <= self.cohort_index < len(self.cohorts):
            return self.cohorts[self.cohort_index]
        return ()

    def counts(self, cohort: int | None = None) -> Counter[Progress]:
        """How many devices of ``cohort`` (default: the current one) are in each status."""
        index = self.cohort_index if cohort is None else cohort
        if not 0 <= index < len(self.cohorts):
            return Counter()
        return Counter(self.devices[d].status for d in self.cohorts[index])


# --------------------------------------------------------------------------- Avro records


def to_record(rollout: Rollout) -> dict[str, Any]:
    """The Avro ``Rollout`` record (devices sorted by id, issued ids sorted)."""
    return {
        "rollout_id": rollout.rollout_id,
        "state": str(rollout.state),
        "paused_from": None if rollout.paused_from is None else str(rollout.paused_from),
        "artifact": rollout.artifact.to_record(),
        "target": str(rollout.target),
        "plan": rollout.plan.to_record(),
        "created_by": rollout.created_by,
        "create_request_id": rollout.create_request_id,
        "created_ms": rollout.created_ms,
        "updated_ms": rollout.updated_ms,
        "approvals": [a.to_record() for a in rollout.approvals],
        "cohort_index": rollout.cohort_index,
        "cohort_count": len(rollout.cohorts),
        "cohort_started_ms": rollout.cohort_started_ms,
        "window_started_ms": rollout.window_started_ms,
        "rollback_deadline_ms": rollout.rollback_deadline_ms,
        "devices": [rollout.devices[d].to_record() for d in sorted(rollout.devices)],
        "issued": sorted(rollout.issued),
        "reason": rollout.reason,
        "ended_ms": rollout.ended_ms,
    }


def from_record(record: Mapping[str, Any]) -> Rollout:
    """The rollout in an Avro ``Rollout`` record; ValueError (or KeyError) if malformed."""
    devices: dict[str, RolloutDevice] = {}
    for item in record.get("devices") or ():
        device = RolloutDevice.from_record(item)
        devices[device.device_id] = device
    count = int(record.get("cohort_count", 0))
    cohorts: list[list[str]] = [[] for _ in range(count)]
    for device_id in sorted(devices):
        index = devices[device_id].cohort
        if not 0 <= index < count:
            raise ValueError(f"device {device_id} in cohort {index} of {count}")
        cohorts[index].append(device_id)
    paused_from = record.get("paused_from")
    return Rollout(
        rollout_id=str(record["rollout_id"]),
        state=RolloutState(record["state"]),
        paused_from=None if paused_from is None else RolloutState(paused_from),
        artifact=Artifact.from_record(record["artifact"]),
        target=Resource.parse(record["target"]),
        plan=RolloutPlan.from_record(record["plan"]),
        created_by=str(record["created_by"]),
        create_request_id=str(record["create_request_id"]),
        created_ms=int(record["created_ms"]),
        updated_ms=int(record["updated_ms"]),
        approvals=tuple(Approval.from_record(a) for a in record.get("approvals") or ()),
        cohort_index=int(record.get("cohort_index", -1)),
        cohorts=tuple(tuple(c) for c in cohorts),
        cohort_started_ms=_int(record.get("cohort_started_ms")),
        window_started_ms=_int(record.get("window_started_ms")),
        rollback_deadline_ms=_int(record.get("rollback_deadline_ms")),
        devices=devices,
        issued=frozenset(str(i) for i in record.get("issued") or ()),
        reason=record.get("reason"),
        ended_ms=_int(record.get("ended_ms")),
    )
