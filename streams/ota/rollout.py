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
:func:`streams.registry.rbac.authorize` on the rollout's target and audited (applied, unchanged,
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

import json
import re
from bisect import insort
from collections.abc import Iterable, Mapping
from dataclasses import replace

from streams.ota.artifacts import ArtifactKind
from streams.ota.events import (
    Abort,
    AlertRaised,
    Approve,
    CreateRollout,
    DeviceJoined,
    DeviceReport,
    Event,
    OperatorEvent,
    Pause,
    Resume,
    Step,
    Telemetry,
    Tick,
    canonical_json,
    command_id,
    install_parts,
)
from streams.ota.model import (
    IN_FLIGHT,
    INSTALL_DONE,
    ROLLBACK_STATUSES,
    Approval,
    ApprovalDecision,
    CommandAction,
    OtaStatus,
    Progress,
    Rollout,
    RolloutDevice,
    RolloutState,
)
from streams.ota.plan import ELIGIBLE_STATUSES, in_target, plan_cohorts
from streams.ota.working import WorkingCopy, clip_text, to_ms
from streams.registry.devices import AuditDecision, DeviceRecord
from streams.registry.rbac import Action, GrantSet, Resource, authorize

_ROLLOUT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class _Work(WorkingCopy):
    """The transitions of one batch (dispatch, operators, devices, commands, gates)."""

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
            comment=clip_text(event.comment),
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
                f": {clip_text(event.reason)}" if event.reason else ""
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
            and device.status not in ROLLBACK_STATUSES
        ):
            self.send_rollback(device.device_id)
            self.check_rolled_back()
        elif r.state is RolloutState.running and device.cohort == r.cohort_index:
            self.evaluate()

    def _install_report(self, device: RolloutDevice, event: DeviceReport) -> RolloutDevice:
        status = Progress(str(event.status))
        if device.status in ROLLBACK_STATUSES:
            return device  # a late report of the install, after it was commanded back
        if device.status in INSTALL_DONE and not (
            device.status is Progress.succeeded and status is Progress.failed
        ):
            return device  # only succeeded -> failed follows a final status
        installed = device.installed or status in (Progress.installing, Progress.succeeded)
        reason = clip_text(event.reason) if status is Progress.failed else None
        expected = self.rollout.artifact.version
        if status is Progress.succeeded and event.version is not None and event.version != expected:
            status = Progress.failed
            reported = clip_text(event.version)
            reason = f"reported version {reported} after install, expected {expected}"
        if status is Progress.failed and reason is None:
            reason = "failed"
        return replace(
            device,
            status=status,
            installed=installed,
            reported_version=clip_text(event.version) or device.reported_version,
            reason=reason,
        )

    def _rollback_report(self, device: RolloutDevice, event: DeviceReport) -> RolloutDevice:
        if device.status is not Progress.rollback_sent:
            return device
        version = clip_text(event.version)
        if event.status is OtaStatus.failed:
            reason = f"rollback failed: {clip_text(event.reason) or 'no reason given'}"
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
            self._install_parts = install_parts(r)
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
        if device is None or device.status in ROLLBACK_STATUSES or device.sent_ms is None:
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
        self._emit(device_id, ident, CommandAction.rollback, canonical_json(document))
        self.put(replace(device, updated_ms=self.now, status=Progress.rollback_sent))

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
            if timeout is not None and started is not None and self.now >= started + to_ms(timeout):
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
            if device is not None and device.status in IN_FLIGHT:
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
        if self.now < start + to_ms(r.plan.health_window_s):
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
        deadline = self.now + to_ms(r.plan.rollback_timeout_s)
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
