"""The mutable working copy of one rollout over one batch of events (streams/ota/rollout.py
drives it): progress copied once per batch, the current cohort's counts kept as it goes, the
commands and audit records produced; :meth:`WorkingCopy.finish` freezes it into a
:class:`~streams.ota.events.Step`."""

from __future__ import annotations

import json
import math
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from streams.ota.events import NAMESPACE, Command, Step
from streams.ota.model import CommandAction, Progress, Rollout, RolloutDevice
from streams.registry.devices import AuditDecision, AuditRecord, DeviceRecord
from streams.registry.rbac import Action, GrantSet, Principal, Resource

AUTOMATIC = "automatic: the rollout controller"
MAX_TEXT = 256


def to_ms(seconds: float) -> int:
    return math.ceil(seconds * 1000)


def clip_text(value: str | None) -> str | None:
    """A device- or operator-chosen string, cut to a sane length."""
    if value is None:
        return None
    value = str(value)
    return value if len(value) <= MAX_TEXT else value[: MAX_TEXT - 3] + "..."


def note_id(rollout_id: str, *parts: object) -> str:
    return str(uuid.uuid5(NAMESPACE, json.dumps([rollout_id, "audit", *map(str, parts)])))


class WorkingCopy:
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
            request_id=note_id(r.rollout_id, what, *key),
            command=f"ota.{what}",
            principal=str(Principal.orchestrator()),
            action=Action.ota_control,
            decision=AuditDecision.applied,
            authorization=AUTOMATIC,
            reason=f"rollout {r.rollout_id}: {reason}",
            device_id=device_id,
        )

    def _emit(self, device_id: str, ident: str, action: CommandAction, payload: str) -> None:
        if self.issued(ident):
            return  # never twice
        if self._issued is None:
            self._issued = set(self.rollout.issued)
        self._issued.add(ident)
        body = payload.encode("utf-8")
        self.commands.append(Command(self.rollout.rollout_id, device_id, ident, action, body))
