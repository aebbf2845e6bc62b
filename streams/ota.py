"""Governed OTA rollouts: the pure core (no Kafka). The OTA controller (a thin loop in the stream
worker) feeds each :class:`Rollout` its events and writes what :func:`step` returns: the new
rollout (``ota.rollouts``, compacted, key = rollout id, Avro ``Rollout``), the commands to send
(``mqtt.downlink`` -> ``devices/<id>/ota/command``) and audit records (``audit.log``).

**States.** ::

    pending_approval --approve--> approved --tick--> running (cohort 0, 1, ...) --gates--> completed
        |--reject--> rejected        |                 |    ^
        |                            +----pause---> paused -+ resume (to approved or running)
        +--abort (from pending_approval, approved, running or paused)--> aborted
    running --error threshold--> rolling_back --confirmed, or deadline--> rolled_back

Operators act through events naming a principal and a request id, each authorized with
:func:`streams.rbac.authorize` on the rollout's target and audited (applied, unchanged,
denied = HTTP 403, refused = not valid now): :class:`CreateRollout` needs ``ota.create``,
:class:`Approve` (or reject) ``ota.approve``, :class:`Pause`, :class:`Resume` and
:class:`Abort` ``ota.control``. Nothing is sent before an authorized approval.

**Cohorts.** At the first :class:`Tick` after approval the target's devices (registry records
under the target, provisioned or active) are split by :func:`plan_cohorts`: ordered by a hash
of (rollout id, device id), a canary of ``canary_size`` devices (at least one, however small
the fleet), then cumulative shares of the whole target (1 %, 10 %, 100 % by default); every
device lies in exactly one cohort; empty cohorts are dropped. A cohort starts by commanding
each of its devices (``install``), recording the registry's ``firmware_version`` as the
device's previous version; a device suspended, revoked, gone, moved out of the target or
already at the version is ``skipped`` and left out of the cohort's counts.

**Gates.** Devices report on ``ota/status`` (:class:`DeviceReport`: downloading, verifying,
installing, succeeded or failed with a reason, and the version; reports with a seq not above
the device's last, or naming another command or rollout, are ignored). A ``succeeded`` naming
another version than the artifact's counts as failed; a succeeded device may later fail (it
reverted, or failed its health check), never the other way. For the current cohort (totals
exclude skipped devices):

- failed/total > ``error_threshold``: **rollback**;
- succeeded/total >= ``success_threshold``: the **health window** opens (its start is
  ``window_started_ms``); once ``health_window_s`` has passed (by the ``now_ms`` of a tick) the
  cohort passes, provided no updated device of the cohort had an alert of the plan's
  severities (:class:`AlertRaised`) and, if ``require_telemetry``, each succeeded device was
  seen (:class:`Telemetry`, or ``Tick.last_seen_ms``) since the window opened. An alert fails
  its device and restarts the window; a silent device fails at the window's end (a window of
  0 s watches no telemetry). Either may tip the cohort past the error threshold, or back below
  the success threshold (the window closes until enough devices succeed again).
- with ``cohort_timeout_s``, devices of the cohort neither succeeded nor failed by then fail
  (``timeout``).

The last cohort passing completes the rollout. A device joining the target
(:class:`DeviceJoined`) while it runs is added to the last cohort (commanded at once if that
cohort is running); after completion it is commanded at once.

**Rollback.** Every device of the started cohorts that reported installing or succeeded is
commanded back to its previous version (``rollback``); one that reports installing or
succeeded later is commanded back then. No device outside the started cohorts is ever
touched. The rollout ends ``rolled_back`` once every rollback is confirmed (succeeded or
failed) or ``rollback_timeout_s`` has passed.

**Pause** stops every new command (next cohort, late joiners, rollback) and closes the
health window; reports are still recorded, and :class:`Resume` re-evaluates the gates (which
may start the rollback then, or open the health window afresh).
**Abort** ends the rollout; nothing is commanded back.

**Idempotence.** Command ids are UUID5s of (rollout id, device id, action), so a replay never
produces a different command, and the rollout records every id it issued (``issued``): no
command id is ever emitted twice by a lineage of rollout states. Replaying events against a
later state changes nothing; a controller that lost its last state write re-emits the same
ids, which devices drop (and, when state and downlinks are written in one Kafka transaction,
nothing is re-emitted at all). Automatic transitions are audited under the orchestrator with
deterministic ids too.

**Commands** (JSON on ``devices/<id>/ota/command``, keys sorted): ``install`` is
``{"action", "artifact": <OtaArtifact record, signature in base64>, "command_id", "kind",
"rollout_id", "version"}``; ``rollback`` is ``{"action", "command_id", "from_version",
"kind", "rollout_id", "version": <previous version, null if unknown>}`` (the device returns to
the image it kept, A/B style). Devices echo ``command_id`` and ``rollout_id`` in their status
reports; a report without ``command_id`` after a rollback was sent is taken as the rollback's,
unless it reports the new version.

:func:`run` applies a batch of events at one ``now_ms``: per-device progress is copied once per
batch and the current cohort's counts are kept as it goes, so a batch costs O(fleet + events),
not O(fleet x events).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import math
import re
import uuid
from bisect import insort
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, TypeAlias

from infra.artifacts import Artifact, ArtifactKind
from ingest.downlink import downlink_record
from streams.hot.alerts import AlertEvent, AlertStatus, Severity
from streams.rbac import Action, GrantSet, Principal, Resource, authorize
from streams.registry import AuditDecision, AuditRecord, DeviceRecord, DeviceStatus

__all__ = [
    "ELIGIBLE_STATUSES",
    "OTA_COMMAND_SUBTOPIC",
    "ROLLOUTS_TOPIC",
    "ROLLOUT_SCHEMA",
    "Abort",
    "AlertRaised",
    "Approval",
    "ApprovalDecision",
    "Approve",
    "Command",
    "CommandAction",
    "CreateRollout",
    "DeviceJoined",
    "DeviceReport",
    "Event",
    "OtaStatus",
    "Pause",
    "Progress",
    "Resume",
    "Rollout",
    "RolloutDevice",
    "RolloutPlan",
    "RolloutState",
    "Step",
    "Telemetry",
    "Tick",
    "command_id",
    "from_record",
    "in_target",
    "install_document",
    "plan_cohorts",
    "report_from_event",
    "run",
    "step",
    "to_record",
]

ROLLOUT_SCHEMA = "Rollout"  # schemas/avro/Rollout.avsc
ROLLOUTS_TOPIC = "ota.rollouts"  # compacted, key = rollout id
OTA_COMMAND_SUBTOPIC = "ota/command"  # devices/<id>/ota/command
ELIGIBLE_STATUSES = frozenset({DeviceStatus.provisioned, DeviceStatus.active})

_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://fleetstream/ota")
_ROLLOUT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_AUTOMATIC = "automatic: the rollout controller"
_MAX_TEXT = 256


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


_IN_FLIGHT = frozenset(
    {Progress.sent, Progress.downloading, Progress.verifying, Progress.installing}
)
_INSTALL_DONE = frozenset({Progress.succeeded, Progress.failed})
_ROLLBACK = frozenset({Progress.rollback_sent, Progress.rolled_back, Progress.rollback_failed})


class CommandAction(StrEnum):
    install = "install"
    rollback = "rollback"


class ApprovalDecision(StrEnum):
    approved = "approved"
    rejected = "rejected"


# --------------------------------------------------------------------------- plan


def _check_fraction(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and 0 <= value <= 1):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def _check_seconds(name: str, value: float | None, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class RolloutPlan:
    """How a rollout proceeds; invalid plans raise ValueError at construction."""

    canary_size: int = 5
    percentages: tuple[float, ...] = (1.0, 10.0, 100.0)
    success_threshold: float = 0.95
    error_threshold: float = 0.05
    health_window_s: float = 300.0
    alert_severities: frozenset[Severity] = frozenset({Severity.critical})
    require_telemetry: bool = True
    cohort_timeout_s: float | None = None
    rollback_timeout_s: float = 900.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "percentages", tuple(float(p) for p in self.percentages))
        object.__setattr__(
            self, "alert_severities", frozenset(Severity(s) for s in self.alert_severities)
        )
        if isinstance(self.canary_size, bool) or not isinstance(self.canary_size, int):
            raise ValueError(f"canary_size must be an integer, got {self.canary_size!r}")
        if self.canary_size < 1:
            raise ValueError("canary_size must be at least 1: every rollout starts with a canary")
        shares = self.percentages
        if not shares or shares[-1] != 100.0:
            raise ValueError(f"percentages must end at 100, got {list(shares)}")
        if any(not (0 < p <= 100) for p in shares) or any(
            a >= b for a, b in itertools.pairwise(shares)
        ):
            raise ValueError(
                f"percentages must ascend strictly within (0, 100], got {list(shares)}"
            )
        _check_fraction("success_threshold", self.success_threshold)
        _check_fraction("error_threshold", self.error_threshold)
        _check_seconds("health_window_s", self.health_window_s)
        _check_seconds("cohort_timeout_s", self.cohort_timeout_s, optional=True)
        _check_seconds("rollback_timeout_s", self.rollback_timeout_s)

    def to_record(self) -> dict[str, Any]:
        return {
            "canary_size": self.canary_size,
            "percentages": list(self.percentages),
            "success_threshold": float(self.success_threshold),
            "error_threshold": float(self.error_threshold),
            "health_window_s": float(self.health_window_s),
            "alert_severities": sorted(str(s) for s in self.alert_severities),
            "require_telemetry": self.require_telemetry,
            "cohort_timeout_s": _float(self.cohort_timeout_s),
            "rollback_timeout_s": float(self.rollback_timeout_s),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> RolloutPlan:
        return cls(
            canary_size=int(record["canary_size"]),
            percentages=tuple(float(p) for p in record["percentages"]),
            success_threshold=float(record["success_threshold"]),
            error_threshold=float(record["error_threshold"]),
            health_window_s=float(record["health_window_s"]),
            alert_severities=frozenset(Severity(s) for s in record["alert_severities"]),
            require_telemetry=bool(record.get("require_telemetry", True)),
            cohort_timeout_s=_float(record.get("cohort_timeout_s")),
            rollback_timeout_s=float(record["rollback_timeout_s"]),
        )


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _rank(seed: str, device_id: str) -> bytes:
    return hashlib.sha256(json.dumps([seed, device_id]).encode("utf-8")).digest()


def plan_cohorts(device_ids: Iterable[str], plan: RolloutPlan, seed: str = "") -> list[list[str]]:
    """Split ``device_ids`` into cohorts: ordered by a hash of (``seed`` = the rollout id,
    device id), the first ``canary_size`` (at least one), then up to each cumulative
    percentage of the whole (rounded up). Every id lies in exactly one (non-empty) cohort."""
    ids = sorted(set(device_ids), key=lambda d: (_rank(seed, d), d))
    n = len(ids)
    if n == 0:
        return []
    done = min(n, plan.canary_size)
    cohorts = [ids[:done]]
    for share in plan.percentages:
        upto = min(n, math.ceil(round(n * share / 100, 9)))
        if upto > done:
            cohorts.append(ids[done:upto])
            done = upto
    if done < n:  # unreachable while the last share is 100; kept so no device is lost
        cohorts.append(ids[done:])
    return cohorts


def in_target(target: Resource, record: DeviceRecord) -> bool:
    """Whether the registry ``record`` is a device a rollout on ``target`` updates."""
    names = target.names
    place = (record.org, record.project, record.group)
    return record.status in ELIGIBLE_STATUSES and place[: len(names)] == names


def command_id(rollout_id: str, device_id: str, action: CommandAction) -> str:
    """The id of ``action`` for ``device_id`` in ``rollout_id``: the same on every replay."""
    return str(uuid.uuid5(_NAMESPACE, json.dumps([rollout_id, device_id, str(action)])))


def _note_id(rollout_id: str, *parts: object) -> str:
    return str(uuid.uuid5(_NAMESPACE, json.dumps([rollout_id, "audit", *map(str, parts)])))


# --------------------------------------------------------------------------- state


@dataclass(frozen=True, slots=True, kw_only=True)
class Approval:
    request_id: str
    principal: str
    decision: ApprovalDecision
    ts_ms: int
    comment: str | None = None

    def to_record(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "principal": self.principal,
            "decision": str(self.decision),
            "ts_ms": self.ts_ms,
            "comment": self.comment,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Approval:
        return cls(
            request_id=str(record["request_id"]),
            principal=str(record["principal"]),
            decision=ApprovalDecision(record["decision"]),
            ts_ms=int(record["ts_ms"]),
            comment=record.get("comment"),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class RolloutDevice:
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

    def to_record(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "cohort": self.cohort,
            "status": str(self.status),
            "installed": self.installed,
            "previous_version": self.previous_version,
            "reported_version": self.reported_version,
            "reason": self.reason,
            "last_seq": self.last_seq,
            "sent_ms": self.sent_ms,
            "updated_ms": self.updated_ms,
            "last_seen_ms": self.last_seen_ms,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> RolloutDevice:
        return cls(
            device_id=str(record["device_id"]),
            cohort=int(record["cohort"]),
            status=Progress(record["status"]),
            installed=bool(record.get("installed", False)),
            previous_version=record.get("previous_version"),
            reported_version=record.get("reported_version"),
            reason=record.get("reason"),
            last_seq=int(record.get("last_seq", -1)),
            sent_ms=_int(record.get("sent_ms")),
            updated_ms=int(record["updated_ms"]),
            last_seen_ms=_int(record.get("last_seen_ms")),
        )


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


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True, kw_only=True)
class CreateRollout:
    request_id: str
    principal: Principal
    rollout_id: str
    artifact: Artifact
    target: Resource
    plan: RolloutPlan = field(default_factory=RolloutPlan)


@dataclass(frozen=True, slots=True, kw_only=True)
class Approve:
    request_id: str
    principal: Principal
    decision: ApprovalDecision = ApprovalDecision.approved
    comment: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Pause:
    request_id: str
    principal: Principal


@dataclass(frozen=True, slots=True, kw_only=True)
class Resume:
    request_id: str
    principal: Principal


@dataclass(frozen=True, slots=True, kw_only=True)
class Abort:
    request_id: str
    principal: Principal
    reason: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceReport:
    """A device's ``ota/status`` report (see :func:`report_from_event`)."""

    device_id: str
    status: OtaStatus
    seq: int
    version: str | None = None
    reason: str | None = None
    command_id: str | None = None
    rollout_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class AlertRaised:
    device_id: str
    severity: Severity
    alert_id: str

    @classmethod
    def from_alert(cls, alert: AlertEvent) -> AlertRaised | None:
        """The event of an ``alerts`` record; None for a resolved alert."""
        if alert.status is not AlertStatus.raised:
            return None
        return cls(device_id=alert.device_id, severity=alert.severity, alert_id=alert.alert_id)


@dataclass(frozen=True, slots=True, kw_only=True)
class Telemetry:
    """Telemetry from ``device_id`` received at ``seen_ms`` (the bridge's ``received_at``)."""

    device_id: str
    seen_ms: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Tick:
    """The timer (the step's ``now_ms`` is the time); ``last_seen_ms`` may carry the latest
    telemetry time of devices, as :class:`Telemetry` events would."""

    last_seen_ms: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceJoined:
    """``device_id`` entered the rollout's target (new, moved in, or activated)."""

    device_id: str


OperatorEvent: TypeAlias = CreateRollout | Approve | Pause | Resume | Abort
Event: TypeAlias = OperatorEvent | DeviceReport | AlertRaised | Telemetry | Tick | DeviceJoined


def report_from_event(record: Mapping[str, Any]) -> DeviceReport | None:
    """The report in a ``device.events`` record (Avro ``DeviceEvent`` of type ``ota_status``,
    attributes as the bridge keeps them); None for other events and unknown statuses."""
    if record.get("type") != "ota_status":
        return None
    attributes: Mapping[str, str] = record.get("attributes") or {}
    try:
        status = OtaStatus(str(attributes.get("status")))
    except ValueError:
        return None
    return DeviceReport(
        device_id=str(record["device_id"]),
        status=status,
        seq=int(record["seq"]),
        version=attributes.get("version"),
        reason=attributes.get("reason") or record.get("message"),
        command_id=attributes.get("command_id"),
        rollout_id=attributes.get("rollout_id"),
    )


# --------------------------------------------------------------------------- effects


@dataclass(frozen=True, slots=True)
class Command:
    """An OTA command for one device; ``payload`` is its canonical JSON (same bytes on replay)."""

    rollout_id: str
    device_id: str
    command_id: str
    action: CommandAction
    payload: bytes

    @property
    def document(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.payload)
        return value

    def to_downlink(self) -> dict[str, Any]:
        """The Avro ``Downlink`` record for ``mqtt.downlink`` (key: the device id)."""
        return downlink_record(
            self.device_id, OTA_COMMAND_SUBTOPIC, self.payload, qos=1, command_id=self.command_id
        )


@dataclass(frozen=True, slots=True)
class Step:
    """What one :func:`step` / :func:`run` produced. ``rollout`` is the input itself when
    nothing changed (and None when there is no rollout, e.g. a refused create)."""

    rollout: Rollout | None
    commands: tuple[Command, ...] = ()
    audits: tuple[AuditRecord, ...] = ()
    changed: bool = False

    @property
    def effects(self) -> tuple[Command | AuditRecord, ...]:
        return (*self.commands, *self.audits)


def _canonical(document: Mapping[str, Any]) -> str:
    """Compact JSON with sorted keys: the same document always gives the same bytes."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"))


def install_document(rollout: Rollout, device_id: str) -> dict[str, Any]:
    """The ``install`` command for ``device_id`` (its payload is this, as canonical JSON)."""
    artifact = rollout.artifact.to_record()
    artifact["signature"] = base64.b64encode(rollout.artifact.signature).decode("ascii")
    return {
        "action": str(CommandAction.install),
        "artifact": artifact,
        "command_id": command_id(rollout.rollout_id, device_id, CommandAction.install),
        "kind": str(rollout.artifact.kind),
        "rollout_id": rollout.rollout_id,
        "version": rollout.artifact.version,
    }


def _install_parts(rollout: Rollout) -> tuple[str, str]:
    """The canonical install payload before and after its command id (the one part that
    differs between devices), so a cohort of 100 000 is not encoded 100 000 times."""
    marker = "\x00command-id\x00"
    document = install_document(rollout, "-")
    document["command_id"] = marker
    head, tail = _canonical(document).split(json.dumps(marker))
    return head, tail


# --------------------------------------------------------------------------- transitions


class _Work:
    """The mutable working copy of one batch; :meth:`finish` freezes it."""

    def __init__(
        self,
        rollout: Rollout | None,
        now_ms: int,
        grants: Mapping[str, GrantSet],
        devices: Mapping[str, DeviceRecord],
    ) -> None:
        self.original = rollout
        self.r = rollout
        self.now = now_ms
        self.grants = grants
        self.registry = devices
        self.commands: list[Command] = []
        self.audits: list[AuditRecord] = []
        self._progress: dict[str, RolloutDevice] | None = None
        self._issued: set[str] | None = None
        self._cohorts: list[list[str]] | None = None
        self._tally: Counter[Progress] | None = None  # the current cohort's statuses
        self._authorization = ""  # the last authorization's reason, for the audit record
        self._install_parts: tuple[str, str] | None = None  # the install payload around its id

    # ------------------------------------------------------------ working state

    @property
    def rollout(self) -> Rollout:
        assert self.r is not None
        return self.r

    def set(self, **changes: Any) -> None:
        self.r = replace(self.rollout, **changes)

    def progress(self, device_id: str) -> RolloutDevice | None:
        source = self._progress if self._progress is not None else self.rollout.devices
        return source.get(device_id)

    def put(self, device: RolloutDevice) -> None:
        if self._progress is None:
            self._progress = dict(self.rollout.devices)
        old = self._progress.get(device.device_id)
        if device.updated_ms != self.now:
            device = replace(device, updated_ms=self.now)
        self._progress[device.device_id] = device
        if self._tally is not None and device.cohort == self.rollout.cohort_index:
            if old is not None and old.cohort == device.cohort:
                self._tally[old.status] -= 1
            self._tally[device.status] += 1

    def issued(self, command: str) -> bool:
        source = self._issued if self._issued is not None else self.rollout.issued
        return command in source

    def cohort(self, index: int) -> Sequence[str]:
        cohorts = self._cohorts if self._cohorts is not None else self.rollout.cohorts
        return cohorts[index] if 0 <= index < len(cohorts) else ()

    @property
    def cohort_count(self) -> int:
        cohorts = self._cohorts if self._cohorts is not None else self.rollout.cohorts
        return len(cohorts)

    def tally(self) -> Counter[Progress]:
        if self._tally is None:
            tally: Counter[Progress] = Counter()
            for device_id in self.cohort(self.rollout.cohort_index):
                device = self.progress(device_id)
                if device is not None:
                    tally[device.status] += 1
            self._tally = tally
        return self._tally

    def finish(self) -> Step:
        if self.r is None:
            return Step(None, (), tuple(self.audits), changed=False)
        changes: dict[str, Any] = {}
        if self._progress is not None:
            changes["devices"] = self._progress
        if self._issued is not None:
            changes["issued"] = frozenset(self._issued)
        if self._cohorts is not None:
            changes["cohorts"] = tuple(tuple(c) for c in self._cohorts)
        rollout = self.r
        if changes or rollout is not self.original:
            rollout = replace(rollout, updated_ms=self.now, **changes)
        changed = rollout is not self.original
        return Step(rollout, tuple(self.commands), tuple(self.audits), changed=changed)

    # ------------------------------------------------------------ audit

    def audit(
        self,
        *,
        request_id: str,
        command: str,
        principal: str,
        action: Action,
        decision: AuditDecision,
        authorization: str,
        reason: str,
        resource: Resource | None = None,
        device_id: str | None = None,
    ) -> None:
        if resource is None and self.r is not None:
            resource = self.r.target
        self.audits.append(
            AuditRecord(
                ts_ms=self.now,
                command_id=request_id,
                command=command,
                principal=principal,
                action=str(action),
                device_id=device_id,
                resource=None if resource is None else str(resource),
                decision=decision,
                authorization=authorization,
                reason=reason,
            )
        )

    def note(self, what: str, reason: str, *key: object, device_id: str | None = None) -> None:
        """Audit an automatic transition (the orchestrator acts; ids stable on replay)."""
        r = self.rollout
        self.audit(
            request_id=_note_id(r.rollout_id, what, *key),
            command=f"ota.{what}",
            principal=str(Principal.orchestrator()),
            action=Action.ota_control,
            decision=AuditDecision.applied,
            authorization=_AUTOMATIC,
            reason=f"rollout {r.rollout_id}: {reason}",
            device_id=device_id,
        )

    # ------------------------------------------------------------ dispatch

    def handle(self, event: Event) -> None:
        if isinstance(event, CreateRollout):
            self.create(event)
        elif self.r is None:
            if isinstance(event, Approve | Pause | Resume | Abort):
                self.audit(
                    request_id=event.request_id,
                    command=_OPERATOR_COMMANDS[type(event)],
                    principal=str(event.principal),
                    action=_OPERATOR_ACTIONS[type(event)],
                    decision=AuditDecision.refused,
                    authorization="not evaluated: no such rollout",
                    reason="unknown rollout",
                )
        elif isinstance(event, Approve):
            self.approve(event)
        elif isinstance(event, Pause | Resume | Abort):
            self.control(event)
        elif isinstance(event, DeviceReport):
            self.report(event)
        elif isinstance(event, AlertRaised):
            self.alert(event)
        elif isinstance(event, Telemetry):
            self.seen(event.device_id, event.seen_ms)
            self.evaluate()
        elif isinstance(event, Tick):
            for device_id, seen_ms in event.last_seen_ms.items():
                self.seen(device_id, seen_ms)
            self.tick()
        else:
            self.joined(event)

    # ------------------------------------------------------------ operators

    def _authorized(self, event: OperatorEvent, target: Resource) -> bool:
        action = _OPERATOR_ACTIONS[type(event)]
        decision = authorize(event.principal, action, target, self.grants)
        if not decision.allowed:
            self.audit(
                request_id=event.request_id,
                command=_OPERATOR_COMMANDS[type(event)],
                principal=str(event.principal),
                action=action,
                decision=AuditDecision.denied,
                authorization=decision.reason,
                reason=decision.reason,
                resource=target,
            )
        self._authorization = decision.reason
        return decision.allowed

    def _answer(self, event: OperatorEvent, decision: AuditDecision, reason: str) -> None:
        self.audit(
            request_id=event.request_id,
            command=_OPERATOR_COMMANDS[type(event)],
            principal=str(event.principal),
            action=_OPERATOR_ACTIONS[type(event)],
            decision=decision,
            authorization=self._authorization,
            reason=reason,
            resource=event.target if isinstance(event, CreateRollout) else None,
        )

    def create(self, event: CreateRollout) -> None:
        if not self._authorized(event, event.target):
            return
        existing = self.r
        if existing is not None:
            if existing.create_request_id == event.request_id:
                self._answer(event, AuditDecision.unchanged, "rollout already created")
            else:
                reason = f"rollout {existing.rollout_id} already exists ({existing.state})"
                self._answer(event, AuditDecision.refused, reason)
            return
        problem = None
        if _ROLLOUT_ID.fullmatch(event.rollout_id) is None:
            problem = f"invalid rollout id {event.rollout_id!r}: must match {_ROLLOUT_ID.pattern}"
        elif event.target.project is None or event.target.device is not None:
            problem = f"the target must be a project or a device group, not {event.target}"
        if problem is not None:
            self._answer(event, AuditDecision.refused, problem)
            return
        self.r = Rollout(
            rollout_id=event.rollout_id,
            state=RolloutState.pending_approval,
            artifact=event.artifact,
            target=event.target,
            plan=event.plan,
            created_by=str(event.principal),
            create_request_id=event.request_id,
            created_ms=self.now,
            updated_ms=self.now,
        )
        artifact = event.artifact
        self._answer(
            event,
            AuditDecision.applied,
            f"rollout {event.rollout_id} of {artifact.kind} {artifact.version} "
            f"({artifact.sha256[:12]}) to {event.target} awaits approval",
        )

    def approve(self, event: Approve) -> None:
        r = self.rollout
        if not self._authorized(event, r.target):
            return
        if r.state is not RolloutState.pending_approval:
            if any(a.request_id == event.request_id for a in r.approvals):
                self._answer(event, AuditDecision.unchanged, "decision already recorded")
            else:
                self._answer(event, AuditDecision.refused, f"rollout is {r.state}")
            return
        approval = Approval(
            request_id=event.request_id,
            principal=str(event.principal),
            decision=ApprovalDecision(event.decision),
            ts_ms=self.now,
            comment=_text(event.comment),
        )
        approvals = (*r.approvals, approval)
        if approval.decision is ApprovalDecision.approved:
            self.set(state=RolloutState.approved, approvals=approvals)
            self._answer(event, AuditDecision.applied, "approved: starts at the next tick")
        else:
            reason = f"rejected by {event.principal}" + (
                f": {approval.comment}" if approval.comment else ""
            )
            self.set(
                state=RolloutState.rejected, approvals=approvals, reason=reason, ended_ms=self.now
            )
            self._answer(event, AuditDecision.applied, reason)

    def control(self, event: Pause | Resume | Abort) -> None:
        r = self.rollout
        if not self._authorized(event, r.target):
            return
        state = r.state
        if isinstance(event, Pause):
            if state is RolloutState.paused:
                self._answer(event, AuditDecision.unchanged, "already paused")
            elif state in (RolloutState.approved, RolloutState.running):
                self.set(state=RolloutState.paused, paused_from=state, window_started_ms=None)
                self._answer(event, AuditDecision.applied, f"paused ({state})")
            else:
                self._answer(event, AuditDecision.refused, f"cannot pause: rollout is {state}")
        elif isinstance(event, Resume):
            if state in (RolloutState.approved, RolloutState.running):
                self._answer(event, AuditDecision.unchanged, f"not paused ({state})")
            elif state is RolloutState.paused:
                back = r.paused_from or RolloutState.running
                self.set(state=back, paused_from=None)
                self._answer(event, AuditDecision.applied, f"resumed ({back})")
                if back is RolloutState.running:
                    self.send_planned()
                    self.evaluate()
            else:
                self._answer(event, AuditDecision.refused, f"cannot resume: rollout is {state}")
        elif state is RolloutState.aborted:
            self._answer(event, AuditDecision.unchanged, "already aborted")
        elif state in (
            RolloutState.pending_approval,
            RolloutState.approved,
            RolloutState.running,
            RolloutState.paused,
        ):
            reason = f"aborted by {event.principal}" + (
                f": {_text(event.reason)}" if event.reason else ""
            )
            self.set(state=RolloutState.aborted, paused_from=None, reason=reason, ended_ms=self.now)
            self._answer(event, AuditDecision.applied, reason)
        else:
            self._answer(event, AuditDecision.refused, f"cannot abort: rollout is {state}")

    # ------------------------------------------------------------ devices

    def report(self, event: DeviceReport) -> None:
        r = self.rollout
        device = self.progress(event.device_id)
        if device is None or device.sent_ms is None:
            return  # never commanded by this rollout
        if event.rollout_id is not None and event.rollout_id != r.rollout_id:
            return
        install = command_id(r.rollout_id, event.device_id, CommandAction.install)
        rollback = command_id(r.rollout_id, event.device_id, CommandAction.rollback)
        if event.command_id is not None and event.command_id not in (install, rollback):
            return
        if event.seq <= device.last_seq:
            return  # a replay, or overtaken by a newer report
        device = replace(device, last_seq=event.seq, updated_ms=self.now)
        rolling_back = event.command_id == rollback
        if event.command_id is None and self.issued(rollback):
            # No command id: the rollback's, unless it names the new version (a late report
            # of the install, e.g. sent before the device saw the rollback command).
            late_install = event.version == r.artifact.version != device.previous_version
            rolling_back = not late_install
        if rolling_back:
            self.put(self._rollback_report(device, event))
            self.check_rolled_back()
            return
        device = self._install_report(device, event)
        self.put(device)
        if (
            r.state in (RolloutState.rolling_back, RolloutState.rolled_back)
            and device.installed
            and device.status not in _ROLLBACK
        ):
            self.send_rollback(device.device_id)
            self.check_rolled_back()
        elif r.state is RolloutState.running and device.cohort == r.cohort_index:
            self.evaluate()

    def _install_report(self, device: RolloutDevice, event: DeviceReport) -> RolloutDevice:
        status = Progress(str(event.status))
        if device.status in _ROLLBACK:
            return device  # a late report of the install, after it was commanded back
        if device.status in _INSTALL_DONE and not (
            device.status is Progress.succeeded and status is Progress.failed
        ):
            return device  # only succeeded -> failed follows a final status
        installed = device.installed or status in (Progress.installing, Progress.succeeded)
        reason = _text(event.reason) if status is Progress.failed else None
        expected = self.rollout.artifact.version
        if status is Progress.succeeded and event.version is not None and event.version != expected:
            status = Progress.failed
            reason = f"reported version {_text(event.version)} after install, expected {expected}"
        if status is Progress.failed and reason is None:
            reason = "failed"
        return replace(
            device,
            status=status,
            installed=installed,
            reported_version=_text(event.version) or device.reported_version,
            reason=reason,
        )

    def _rollback_report(self, device: RolloutDevice, event: DeviceReport) -> RolloutDevice:
        if device.status is not Progress.rollback_sent:
            return device
        version = _text(event.version)
        if event.status is OtaStatus.failed:
            reason = f"rollback failed: {_text(event.reason) or 'no reason given'}"
            return replace(device, status=Progress.rollback_failed, reason=reason)
        if event.status is not OtaStatus.succeeded:
            return replace(device, reported_version=version or device.reported_version)
        expected = device.previous_version
        if expected is not None and version is not None and version != expected:
            reason = f"rolled back to {version}, expected {expected}"
            return replace(
                device, status=Progress.rollback_failed, reported_version=version, reason=reason
            )
        return replace(
            device,
            status=Progress.rolled_back,
            reported_version=version or device.reported_version,
            reason=device.reason,
        )

    def alert(self, event: AlertRaised) -> None:
        r = self.rollout
        if r.state not in (RolloutState.running, RolloutState.paused):
            return
        device = self.progress(event.device_id)
        if (
            device is None
            or device.cohort != r.cohort_index
            or event.severity not in r.plan.alert_severities
            or not device.installed
            or device.status not in (Progress.installing, Progress.succeeded)
        ):
            return
        reason = f"alert {event.alert_id} ({event.severity}) after the update"
        self.put(replace(device, updated_ms=self.now, status=Progress.failed, reason=reason))
        self.note(
            "device_failed",
            f"{event.device_id}: {reason}",
            event.device_id,
            event.alert_id,
            device_id=event.device_id,
        )
        if r.window_started_ms is not None:
            self.set(window_started_ms=self.now)  # the window starts over
        self.evaluate()

    def seen(self, device_id: str, seen_ms: int) -> None:
        r = self.rollout
        start = r.window_started_ms
        if r.state not in (RolloutState.running, RolloutState.paused) or start is None:
            return
        device = self.progress(device_id)
        if device is None or device.cohort != r.cohort_index or seen_ms < start:
            return
        if device.last_seen_ms is not None and device.last_seen_ms >= start:
            return  # already seen in this window: nothing to record
        self.put(replace(device, updated_ms=self.now, last_seen_ms=seen_ms))

    def joined(self, event: DeviceJoined) -> None:
        r = self.rollout
        if r.state not in (RolloutState.running, RolloutState.paused, RolloutState.completed):
            return  # not planned yet (the plan will include it), or over
        record = self.registry.get(event.device_id)
        if self.progress(event.device_id) is not None or record is None:
            return
        if not in_target(r.target, record):
            return
        if self._cohorts is None:
            self._cohorts = [list(c) for c in r.cohorts] or [[]]
        last = len(self._cohorts) - 1
        insort(self._cohorts[last], event.device_id)
        self.put(RolloutDevice(device_id=event.device_id, cohort=last, updated_ms=self.now))
        if r.state is RolloutState.completed:
            self.send_install(event.device_id)
            self.note(
                "late_device",
                f"{event.device_id} joined the target",
                event.device_id,
                device_id=event.device_id,
            )
        elif r.state is RolloutState.running and r.cohort_index == last:
            self.send_install(event.device_id)
            self.evaluate()

    # ------------------------------------------------------------ commands

    def send_install(self, device_id: str) -> None:
        r = self.rollout
        device = self.progress(device_id)
        if device is None or device.status is not Progress.planned:
            return
        record = self.registry.get(device_id)
        skip = None
        if record is None:
            skip = "not in the registry"
        elif record.status not in ELIGIBLE_STATUSES:
            skip = f"device is {record.status}"
        elif not in_target(r.target, record):
            skip = f"device left {r.target}"
        elif (
            r.artifact.kind is ArtifactKind.firmware
            and record.firmware_version == r.artifact.version
        ):
            skip = f"already at {r.artifact.version}"
        if skip is not None or record is None:
            self.put(replace(device, updated_ms=self.now, status=Progress.skipped, reason=skip))
            return
        previous = record.firmware_version if r.artifact.kind is ArtifactKind.firmware else None
        ident = command_id(r.rollout_id, device_id, CommandAction.install)
        if self._install_parts is None:
            self._install_parts = _install_parts(r)
        head, tail = self._install_parts
        self._emit(device_id, ident, CommandAction.install, head + json.dumps(ident) + tail)
        self.put(
            replace(
                device,
                updated_ms=self.now,
                status=Progress.sent,
                sent_ms=self.now,
                previous_version=previous,
            )
        )

    def send_rollback(self, device_id: str) -> None:
        r = self.rollout
        device = self.progress(device_id)
        if device is None or device.status in _ROLLBACK or device.sent_ms is None:
            return
        ident = command_id(r.rollout_id, device_id, CommandAction.rollback)
        document = {
            "action": str(CommandAction.rollback),
            "command_id": ident,
            "from_version": r.artifact.version,
            "kind": str(r.artifact.kind),
            "rollout_id": r.rollout_id,
            "version": device.previous_version,
        }
        self._emit(device_id, ident, CommandAction.rollback, _canonical(document))
        self.put(replace(device, updated_ms=self.now, status=Progress.rollback_sent))

    def _emit(self, device_id: str, ident: str, action: CommandAction, payload: str) -> None:
        if self.issued(ident):
            return  # never twice
        if self._issued is None:
            self._issued = set(self.rollout.issued)
        self._issued.add(ident)
        body = payload.encode("utf-8")
        self.commands.append(Command(self.rollout.rollout_id, device_id, ident, action, body))

    def send_planned(self) -> None:
        for device_id in list(self.cohort(self.rollout.cohort_index)):
            self.send_install(device_id)

    # ------------------------------------------------------------ gates

    def tick(self) -> None:
        r = self.rollout
        if r.state is RolloutState.approved:
            self.start()
        elif r.state is RolloutState.running:
            timeout = r.plan.cohort_timeout_s
            started = r.cohort_started_ms
            if timeout is not None and started is not None and self.now >= started + _ms(timeout):
                self.time_out()
            self.evaluate()
        elif r.state is RolloutState.rolling_back:
            deadline = r.rollback_deadline_ms
            if deadline is not None and self.now >= deadline:
                waiting = [
                    d
                    for c in range(r.cohort_index + 1)
                    for d in self.cohort(c)
                    if (p := self.progress(d)) is not None and p.status is Progress.rollback_sent
                ]
                self.end_rollback(f"{len(waiting)} device(s) did not confirm by the deadline")

    def start(self) -> None:
        r = self.rollout
        members = [d for d, record in self.registry.items() if in_target(r.target, record)]
        cohorts = [sorted(c) for c in plan_cohorts(members, r.plan, seed=r.rollout_id)]
        if not cohorts:
            self._cohorts = [[]]
            self.set(state=RolloutState.completed, cohort_index=0, ended_ms=self.now)
            self.note("completed", f"no devices in {r.target}: completed (later ones get it)")
            return
        self._cohorts = cohorts
        for index, cohort in enumerate(cohorts):
            for device_id in cohort:
                self.put(RolloutDevice(device_id=device_id, cohort=index, updated_ms=self.now))
        self.set(state=RolloutState.running)
        sizes = ", ".join(str(len(c)) for c in cohorts)
        self.note("started", f"{len(members)} device(s) in {len(cohorts)} cohorts ({sizes})")
        self.start_cohort(0)

    def start_cohort(self, index: int) -> None:
        self.set(cohort_index=index, cohort_started_ms=self.now, window_started_ms=None)
        self._tally = None
        self.send_planned()
        size = len(self.cohort(index))
        self.note("cohort_started", f"cohort {index} started ({size} device(s))", index)
        self.evaluate()

    def time_out(self) -> None:
        r = self.rollout
        for device_id in self.cohort(r.cohort_index):
            device = self.progress(device_id)
            if device is not None and device.status in _IN_FLIGHT:
                reason = f"no success within {r.plan.cohort_timeout_s:g} s"
                self.put(
                    replace(device, updated_ms=self.now, status=Progress.failed, reason=reason)
                )

    def evaluate(self) -> None:
        """Apply the current cohort's gates (running state only)."""
        r = self.rollout
        if r.state is not RolloutState.running:
            return
        tally = self.tally()
        total = sum(n for status, n in tally.items() if status is not Progress.skipped)
        failed, succeeded = tally[Progress.failed], tally[Progress.succeeded]
        if total and failed / total > r.plan.error_threshold:
            self.start_rollback(
                f"cohort {r.cohort_index}: {failed} of {total} failed, over the error "
                f"threshold {r.plan.error_threshold:g}"
            )
            return
        if tally[Progress.planned]:
            return  # commands still to send (paused before they went out)
        if total and succeeded / total < r.plan.success_threshold:
            if r.window_started_ms is not None:
                self.set(window_started_ms=None)
            return
        if not total:
            self.advance("no device to update")
            return
        start = r.window_started_ms
        if start is None:
            self.set(window_started_ms=self.now)
            start = self.now
        if self.now < start + _ms(r.plan.health_window_s):
            return
        watched = r.plan.require_telemetry and r.plan.health_window_s > 0
        if watched and self.fail_silent(start):
            self.evaluate()  # thresholds again, without the silent devices
            return
        self.advance(f"{succeeded} of {total} succeeded and stayed healthy")

    def fail_silent(self, start: int) -> bool:
        silent = []
        for device_id in self.cohort(self.rollout.cohort_index):
            device = self.progress(device_id)
            if device is None or device.status is not Progress.succeeded:
                continue
            if device.last_seen_ms is None or device.last_seen_ms < start:
                silent.append(device)
        for device in silent:
            reason = "no telemetry during the health window"
            self.put(replace(device, updated_ms=self.now, status=Progress.failed, reason=reason))
        return bool(silent)

    def advance(self, why: str) -> None:
        r = self.rollout
        self.note("cohort_passed", f"cohort {r.cohort_index} passed: {why}", r.cohort_index)
        if r.cohort_index + 1 < self.cohort_count:
            self.start_cohort(r.cohort_index + 1)
            return
        self.set(state=RolloutState.completed, window_started_ms=None, ended_ms=self.now)
        self.note("completed", f"completed: {r.artifact.version} on {r.target}")

    def start_rollback(self, reason: str) -> None:
        r = self.rollout
        deadline = self.now + _ms(r.plan.rollback_timeout_s)
        self.set(
            state=RolloutState.rolling_back,
            window_started_ms=None,
            rollback_deadline_ms=deadline,
            reason=reason,
        )
        self.note("rollback", f"rolling back: {reason}")
        for index in range(r.cohort_index + 1):
            for device_id in self.cohort(index):
                device = self.progress(device_id)
                if device is not None and device.installed:
                    self.send_rollback(device_id)
        self.check_rolled_back()

    def check_rolled_back(self) -> None:
        r = self.rollout
        if r.state is not RolloutState.rolling_back:
            return
        for index in range(r.cohort_index + 1):
            for device_id in self.cohort(index):
                device = self.progress(device_id)
                if device is not None and device.status is Progress.rollback_sent:
                    return
        self.end_rollback("every rollback confirmed")

    def end_rollback(self, why: str) -> None:
        self.set(state=RolloutState.rolled_back, ended_ms=self.now)
        self.note("rolled_back", f"rolled back ({why})")


_OPERATOR_ACTIONS: dict[type, Action] = {
    CreateRollout: Action.ota_create,
    Approve: Action.ota_approve,
    Pause: Action.ota_control,
    Resume: Action.ota_control,
    Abort: Action.ota_control,
}
_OPERATOR_COMMANDS: dict[type, str] = {
    CreateRollout: "ota.create",
    Approve: "ota.approve",
    Pause: "ota.pause",
    Resume: "ota.resume",
    Abort: "ota.abort",
}


def _ms(seconds: float) -> int:
    return math.ceil(seconds * 1000)


def _text(value: str | None) -> str | None:
    """A device- or operator-chosen string, cut to a sane length."""
    if value is None:
        return None
    value = str(value)
    return value if len(value) <= _MAX_TEXT else value[: _MAX_TEXT - 3] + "..."


def run(
    rollout: Rollout | None,
    events: Iterable[Event],
    *,
    now_ms: int,
    grants: Mapping[str, GrantSet] | None = None,
    devices: Mapping[str, DeviceRecord] | None = None,
) -> Step:
    """Apply ``events`` in order at ``now_ms`` to ``rollout`` (None: it does not exist yet).

    ``grants`` is the ``rbac.grants`` table (for operator events), ``devices`` the registry
    (``registry.devices`` by device id: planning, previous versions, joins). Pure."""
    work = _Work(rollout, now_ms, grants or {}, devices or {})
    for event in events:
        work.handle(event)
    return work.finish()


def step(
    rollout: Rollout | None,
    event: Event,
    *,
    now_ms: int,
    grants: Mapping[str, GrantSet] | None = None,
    devices: Mapping[str, DeviceRecord] | None = None,
) -> Step:
    """:func:`run` with one event."""
    return run(rollout, [event], now_ms=now_ms, grants=grants, devices=devices)


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
