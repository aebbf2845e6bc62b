"""streams.ota: approval, cohorts and gates, health window, rollback, pause/abort, replays."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.envelope import Accepted, validate_ota_status
from schemas.codec import AvroCodec, Decoded, load_schema
from streams.hot.alerts import AlertEvent, AlertStatus, Severity
from streams.ota.artifacts import Artifact, ArtifactKind, ReleaseKey, signed_message
from streams.ota.events import (
    Abort,
    AlertRaised,
    Approve,
    Command,
    CreateRollout,
    DeviceJoined,
    DeviceReport,
    Event,
    Pause,
    Resume,
    Step,
    Telemetry,
    Tick,
    command_id,
    install_document,
    report_from_event,
)
from streams.ota.model import (
    ApprovalDecision,
    CommandAction,
    OtaStatus,
    Progress,
    Rollout,
    RolloutState,
    from_record,
    to_record,
)
from streams.ota.plan import RolloutPlan, plan_cohorts
from streams.ota.rollout import run, step
from streams.registry.devices import AuditDecision, AuditRecord, DeviceRecord, DeviceStatus
from streams.registry.rbac import GrantSet, Principal, Resource, Role, index_grants
from tests.support.records import device_record

T0 = 1_700_000_000_000
S = 1000  # one second in ms
ORG, PROJECT, GROUP = "acme", "plant-1", "sensors"
TARGET = Resource(ORG, PROJECT, GROUP)
OPERATOR = Principal.user("oscar")
APPROVER = Principal.user("aria")
ADMIN = Principal.user("ada")
VIEWER = Principal.service("viz")
GRANTS = index_grants(
    [
        GrantSet.of(OPERATOR, (Role.operator, Resource(ORG, PROJECT))),
        GrantSet.of(APPROVER, (Role.ota_approver, Resource(ORG, PROJECT))),
        GrantSet.of(ADMIN, (Role.admin, Resource(ORG))),  # admin, but no ota.approve
        GrantSet.of(VIEWER, (Role.viewer, Resource(ORG))),
    ]
)
KEY = ReleaseKey.generate()
OLD, NEW = "1.0.0", "2.0.0"


def make_artifact(version: str = NEW) -> Artifact:
    sha = f"{abs(hash(version)) % 10**8:08d}".ljust(64, "0")
    size = 1234
    return Artifact(
        artifact_id=sha,
        kind=ArtifactKind.firmware,
        version=version,
        sha256=sha,
        size=size,
        signature=KEY.sign(signed_message(ArtifactKind.firmware, version, sha, size)),
        signature_alg=KEY.algorithm,
        key_id=KEY.key_id,
        created_ms=T0,
        path=f"sha256/{sha}",
        name="fw.bin",
    )


ARTIFACT = make_artifact()


def device(
    device_id: str,
    *,
    group: str = GROUP,
    version: str | None = OLD,
    status: DeviceStatus = DeviceStatus.active,
) -> DeviceRecord:
    return device_record(
        device_id,
        org=ORG,
        project=PROJECT,
        group=group,
        status=status,
        firmware_version=version,
        created_ms=T0,
        updated_ms=T0,
    )


def fleet(n: int, prefix: str = "d") -> dict[str, DeviceRecord]:
    return {f"{prefix}-{i:04d}": device(f"{prefix}-{i:04d}") for i in range(n)}


FAST = RolloutPlan(canary_size=2, percentages=(50, 100), health_window_s=60)


@dataclass
class Harness:
    """Drives one rollout like the controller would, keeping every effect."""

    devices: dict[str, DeviceRecord]
    plan: RolloutPlan = FAST
    grants: Mapping[str, GrantSet] = field(default_factory=lambda: GRANTS)
    now: int = T0
    rollout: Rollout | None = None
    commands: list[Command] = field(default_factory=list)
    audits: list[AuditRecord] = field(default_factory=list)
    seqs: Counter[str] = field(default_factory=Counter)
    round_trip: bool = True

    def send(self, *events: Event, at: int | None = None) -> Step:
        if at is not None:
            self.now = at
        result = run(
            self.rollout, events, now_ms=self.now, grants=self.grants, devices=self.devices
        )
        self.commands += result.commands
        self.audits += result.audits
        self.rollout = result.rollout
        if self.round_trip and self.rollout is not None:
            restored = avro_round_trip(self.rollout)
            assert restored == self.rollout
            self.rollout = restored
        return result

    @property
    def r(self) -> Rollout:
        assert self.rollout is not None
        return self.rollout

    def state(self) -> RolloutState:
        return self.r.state

    def decision(self) -> AuditDecision:
        """The decision of the last audit record (a call, so mypy does not narrow it)."""
        return self.audits[-1].decision

    def create(self, principal: Principal = OPERATOR) -> Step:
        event = CreateRollout(
            request_id="req-create",
            principal=principal,
            rollout_id="ro-1",
            artifact=ARTIFACT,
            target=TARGET,
            plan=self.plan,
        )
        return self.send(event)

    def approve(self, principal: Principal = APPROVER, request_id: str = "req-approve") -> Step:
        return self.send(Approve(request_id=request_id, principal=principal))

    def start(self) -> Step:
        self.create()
        self.approve()
        return self.tick()

    def tick(self, after_s: float = 0, **seen: int) -> Step:
        self.now += int(after_s * S)
        return self.send(Tick(last_seen_ms=seen))

    def report(
        self,
        device_id: str,
        status: OtaStatus,
        version: str | None = None,
        reason: str | None = None,
        command: str | None = None,
    ) -> Step:
        self.seqs[device_id] += 1
        if version is None and status is OtaStatus.succeeded:
            version = NEW
        event = DeviceReport(
            device_id=device_id,
            status=status,
            seq=self.seqs[device_id],
            version=version,
            reason=reason,
            command_id=command,
            rollout_id="ro-1",
        )
        return self.send(event)

    def succeed(self, device_ids: Iterable[str]) -> None:
        for device_id in device_ids:
            self.report(device_id, OtaStatus.downloading)
            self.report(device_id, OtaStatus.installing)
            self.report(device_id, OtaStatus.succeeded)

    def seen(self, device_ids: Iterable[str]) -> None:
        self.send(*(Telemetry(device_id=d, seen_ms=self.now) for d in device_ids))

    def pass_cohort(self) -> None:
        """Every device of the current cohort succeeds and stays healthy."""
        cohort = self.r.current_cohort
        self.succeed(cohort)
        self.tick(1)
        self.seen(cohort)
        self.tick(self.plan.health_window_s)

    def commanded(self, action: CommandAction = CommandAction.install) -> list[str]:
        return [c.device_id for c in self.commands if c.action is action]


def avro_round_trip(rollout: Rollout) -> Rollout:
    codec = AvroCodec(load_schema("Rollout"), schema_id=7)
    decoded = codec.decode(codec.encode(to_record(rollout)))
    assert isinstance(decoded, Decoded)
    return from_record(decoded.record)


# --------------------------------------------------------------------------- planning


def test_default_plan_is_a_canary_then_1_10_100_percent() -> None:
    cohorts = plan_cohorts(fleet(1000), RolloutPlan(), seed="ro-1")
    assert [len(c) for c in cohorts] == [5, 5, 90, 900]
    assert sorted(d for c in cohorts for d in c) == sorted(fleet(1000))


@pytest.mark.parametrize(("n", "sizes"), [(1, [1]), (2, [2]), (3, [3]), (7, [5, 2]), (0, [])])
def test_tiny_fleets_still_get_a_canary(n: int, sizes: list[int]) -> None:
    assert [len(c) for c in plan_cohorts(fleet(n), RolloutPlan(), seed="x")] == sizes
    one = RolloutPlan(canary_size=1)
    assert [len(c) for c in plan_cohorts(fleet(3), one, seed="x")] == [1, 2]


def test_cohort_order_is_deterministic_and_depends_on_the_rollout() -> None:
    ids = list(fleet(200))
    first = plan_cohorts(ids, RolloutPlan(), seed="ro-1")
    assert plan_cohorts(reversed(ids), RolloutPlan(), seed="ro-1") == first
    assert plan_cohorts(ids, RolloutPlan(), seed="ro-2")[0] != first[0]


@settings(max_examples=200)
@given(
    ids=st.sets(st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True), max_size=300),
    canary=st.integers(1, 20),
    shares=st.lists(st.floats(0.1, 99.9), max_size=4, unique=True),
    seed=st.text(max_size=5),
)
def test_every_device_is_in_exactly_one_cohort(
    ids: set[str], canary: int, shares: list[float], seed: str
) -> None:
    plan = RolloutPlan(canary_size=canary, percentages=(*sorted(shares), 100.0))
    cohorts = plan_cohorts(ids, plan, seed=seed)
    flat = [d for c in cohorts for d in c]
    assert sorted(flat) == sorted(ids)
    assert all(cohorts)
    if ids:
        assert len(cohorts[0]) == min(canary, len(ids))


@pytest.mark.parametrize(
    "bad",
    [
        {"canary_size": 0},
        {"percentages": (10, 50)},
        {"percentages": (50, 10, 100)},
        {"percentages": ()},
        {"success_threshold": 1.5},
        {"error_threshold": -0.1},
        {"health_window_s": float("nan")},
        {"rollback_timeout_s": -1},
    ],
)
def test_invalid_plans_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must"):
        RolloutPlan(**bad)


# --------------------------------------------------------------------------- authorization


def test_create_needs_ota_create_on_the_target() -> None:
    h = Harness(fleet(4))
    h.create(principal=VIEWER)
    assert h.rollout is None
    assert [(a.decision, a.action, a.principal) for a in h.audits] == [
        (AuditDecision.denied, "ota.create", "service:viz")
    ]
    h.create()
    assert h.state() is RolloutState.pending_approval
    assert h.decision() is AuditDecision.applied
    assert h.audits[-1].resource == str(TARGET)
    h.create()  # the same request again
    assert h.decision() is AuditDecision.unchanged


def test_no_command_before_approval() -> None:
    h = Harness(fleet(4))
    h.create()
    for d in h.devices:
        h.report(d, OtaStatus.succeeded)
        h.send(
            DeviceJoined(device_id=d),
            AlertRaised(device_id=d, severity=Severity.critical, alert_id="a"),
        )
    h.tick(3600)
    assert h.commands == []
    assert h.state() is RolloutState.pending_approval
    assert h.r.devices == {}


@pytest.mark.parametrize("principal", [ADMIN, OPERATOR, VIEWER])
def test_approval_without_ota_approve_is_refused_and_audited(principal: Principal) -> None:
    h = Harness(fleet(4))
    h.create()
    before = h.r
    result = h.approve(principal)
    assert result.audits[-1].decision is AuditDecision.denied  # the API's 403
    assert result.audits[-1].action == "ota.approve"
    assert h.r == before
    assert not before.approvals
    h.tick(60)
    assert h.commands == []
    h.approve()
    assert h.state() is RolloutState.approved
    assert [a.principal for a in h.r.approvals] == ["user:aria"]
    assert h.commands == []  # approval alone sends nothing: the next tick starts it
    h.tick(1)
    assert h.state() is RolloutState.running
    assert len(h.commands) == 2  # the canary


def test_an_approver_may_reject() -> None:
    h = Harness(fleet(4))
    h.create()
    h.send(Approve(request_id="r", principal=APPROVER, decision=ApprovalDecision.rejected))
    assert h.state() is RolloutState.rejected
    h.approve()
    assert h.decision() is AuditDecision.refused
    h.tick(60)
    assert h.commands == []


def test_approving_twice_is_unchanged_and_unknown_rollouts_are_refused() -> None:
    h = Harness(fleet(4))
    h.create()
    h.approve(request_id="x")
    h.approve(request_id="x")
    assert h.decision() is AuditDecision.unchanged
    result = step(None, Pause(request_id="p", principal=OPERATOR), now_ms=T0, grants=GRANTS)
    assert result.rollout is None
    assert result.audits[0].decision is AuditDecision.refused


def test_control_needs_ota_control() -> None:
    h = Harness(fleet(4))
    h.start()
    h.send(Pause(request_id="p", principal=VIEWER))
    assert h.decision() is AuditDecision.denied
    assert h.state() is RolloutState.running
    h.send(Abort(request_id="a", principal=APPROVER))  # approvers do not operate
    assert h.decision() is AuditDecision.denied


# --------------------------------------------------------------------------- delivery and gates


def test_canary_then_1_10_100_percent_with_gates() -> None:
    plan = RolloutPlan(health_window_s=120)
    h = Harness(fleet(1000), plan=plan, round_trip=False)
    h.start()
    sizes = [len(c) for c in h.r.cohorts]
    assert sizes == [5, 5, 90, 900]
    for index, size in enumerate(sizes):
        assert h.r.cohort_index == index
        sent = h.commanded()
        assert len(sent) == sum(sizes[: index + 1])
        cohort = h.r.current_cohort
        assert set(sent[-size:]) == set(cohort)
        h.succeed(cohort)
        h.tick(1)
        assert h.r.window_started_ms is not None
        h.seen(cohort)
        h.tick(plan.health_window_s - 2)  # the window has not passed
        assert h.r.cohort_index == index
        assert len(h.commanded()) == len(sent)
        h.tick(1)
    assert h.state() is RolloutState.completed
    assert Counter(h.commanded()) == Counter(dict.fromkeys(h.devices, 1))
    assert {c.command_id for c in h.commands} == h.r.issued
    passed = [a for a in h.audits if a.command == "ota.cohort_passed"]
    assert len(passed) == 4
    assert all(a.principal == "orchestrator" for a in passed)
    assert avro_round_trip(h.r) == h.r


def test_commands_name_the_artifact_and_go_to_the_ota_topic() -> None:
    h = Harness(fleet(3))
    h.start()
    command = h.commands[0]
    doc = command.document
    assert doc["action"] == "install"
    assert doc["version"] == NEW
    assert doc["rollout_id"] == "ro-1"
    assert doc["command_id"] == command.command_id
    assert doc["artifact"]["sha256"] == ARTIFACT.sha256
    assert command.command_id == command_id("ro-1", command.device_id, CommandAction.install)
    canonical = json.dumps(
        install_document(h.r, command.device_id), sort_keys=True, separators=(",", ":")
    )
    assert command.payload == canonical.encode()  # the same bytes on every replay
    downlink = command.to_downlink()
    assert downlink["topic"] == f"devices/{command.device_id}/ota/command"
    assert downlink["command_id"] == command.command_id
    assert h.r.devices[command.device_id].previous_version == OLD


def test_a_success_threshold_below_one_lets_stragglers_lag() -> None:
    plan = RolloutPlan(
        canary_size=10, percentages=(100,), success_threshold=0.8, health_window_s=10
    )
    h = Harness(fleet(20), plan=plan)
    h.start()
    cohort = h.r.current_cohort
    h.succeed(cohort[:7])
    h.tick(60)
    assert h.r.window_started_ms is None  # 7/10 < 0.8
    h.succeed(cohort[7:8])
    assert h.r.window_started_ms == h.now
    h.seen(cohort[:8])
    h.tick(10)
    assert h.r.cohort_index == 1


def canary_installed(size: int, success_threshold: float) -> tuple[Harness, tuple[str, ...]]:
    """A rollout over 2 * size devices (error threshold 0.25, 60 s window) whose canary
    of `size` has just installed the update."""
    plan = RolloutPlan(
        canary_size=size,
        percentages=(100,),
        success_threshold=success_threshold,
        error_threshold=0.25,
        health_window_s=60,
    )
    h = Harness(fleet(2 * size), plan=plan)
    h.start()
    canary = h.r.current_cohort
    h.succeed(canary)
    return h, canary


def test_the_health_window_blocks_until_elapsed_and_restarts_on_an_alert() -> None:
    h, canary = canary_installed(5, success_threshold=0.8)
    opened = h.now
    assert h.r.window_started_ms == opened
    h.seen(canary)
    h.tick(30)
    h.send(AlertRaised(device_id=canary[0], severity=Severity.warning, alert_id="w"))
    assert h.r.devices[canary[0]].status is Progress.succeeded  # not a watched severity
    h.send(AlertRaised(device_id=canary[0], severity=Severity.critical, alert_id="c1"))
    assert h.r.devices[canary[0]].status is Progress.failed
    assert "c1" in (h.r.devices[canary[0]].reason or "")
    assert h.r.window_started_ms == opened + 30 * S  # restarted
    h.tick(30)  # 60 s after the first opening: not after the restart
    assert h.r.cohort_index == 0
    h.seen(canary[1:])
    h.tick(30)
    assert h.r.cohort_index == 1
    assert h.state() is RolloutState.running


def test_a_second_alert_crosses_the_error_threshold() -> None:
    h, canary = canary_installed(5, success_threshold=0.6)
    h.send(AlertRaised(device_id=canary[0], severity=Severity.critical, alert_id="1"))
    assert h.state() is RolloutState.running
    h.send(AlertRaised(device_id=canary[1], severity=Severity.critical, alert_id="2"))
    assert h.state() is RolloutState.rolling_back
    assert set(h.commanded(CommandAction.rollback)) == set(canary)


def test_a_device_silent_through_the_window_fails() -> None:
    h, canary = canary_installed(4, success_threshold=0.75)
    h.seen(canary[:3])
    h.tick(60)
    assert h.r.devices[canary[3]].status is Progress.failed
    assert h.r.devices[canary[3]].reason == "no telemetry during the health window"
    assert h.r.cohort_index == 1  # 3/4 still meets 0.75, 1/4 is not over 0.25


def test_telemetry_before_the_window_does_not_count() -> None:
    plan = RolloutPlan(canary_size=2, percentages=(100,), health_window_s=60, error_threshold=0.5)
    h = Harness(fleet(4), plan=plan)
    h.start()
    canary = h.r.current_cohort
    h.send(*(Telemetry(device_id=d, seen_ms=h.now) for d in canary))
    h.succeed(canary)
    h.tick(60)
    assert h.state() is RolloutState.rolling_back  # both silent: 2/2 failed


def test_error_threshold_rolls_back_only_the_canarys_updated_devices() -> None:
    plan = RolloutPlan(canary_size=5)
    h = Harness(fleet(200), plan=plan)
    h.start()
    canary = h.r.current_cohort
    h.succeed(canary[:3])
    h.report(canary[3], OtaStatus.installing)
    assert h.commanded(CommandAction.rollback) == []
    h.report(canary[3], OtaStatus.failed, reason="boot loop")
    assert h.state() is RolloutState.rolling_back
    assert "1 of 5 failed" in (h.r.reason or "")
    rolled = h.commanded(CommandAction.rollback)
    assert sorted(rolled) == sorted(canary[:4])  # canary[4] never reported installing
    assert set(h.commanded()) == set(canary)  # nobody outside the canary was ever touched
    for command in h.commands:
        if command.action is CommandAction.rollback:
            assert command.document["version"] == OLD
            assert command.command_id == command_id(
                "ro-1", command.device_id, CommandAction.rollback
            )
    # The straggler installs after the decision: it is commanded back too, once.
    h.report(canary[4], OtaStatus.installing)
    h.report(canary[4], OtaStatus.succeeded)
    assert sorted(h.commanded(CommandAction.rollback)) == sorted(canary)
    for d in canary:
        rollback = command_id("ro-1", d, CommandAction.rollback)
        h.report(d, OtaStatus.succeeded, version=OLD, command=rollback)
        h.tick(1)
    assert h.state() is RolloutState.rolled_back
    assert all(h.r.devices[d].status is Progress.rolled_back for d in canary)
    assert all(h.r.devices[d].status is Progress.planned for d in h.r.cohorts[1])
    assert set(h.commanded()) | set(h.commanded(CommandAction.rollback)) == set(canary)


def test_a_failure_before_install_is_not_rolled_back_and_ends_at_once() -> None:
    h = Harness(fleet(20), plan=RolloutPlan(canary_size=5))
    h.start()
    canary = h.r.current_cohort
    h.report(canary[0], OtaStatus.failed, reason="digest_mismatch")
    assert h.state() is RolloutState.rolled_back  # nothing was installed anywhere
    assert h.commanded(CommandAction.rollback) == []


def test_the_rollback_ends_at_its_deadline() -> None:
    plan = RolloutPlan(canary_size=2, percentages=(100,), rollback_timeout_s=600)
    h = Harness(fleet(4), plan=plan)
    h.start()
    canary = h.r.current_cohort
    h.succeed(canary[:1])
    h.report(canary[1], OtaStatus.installing)
    h.report(canary[1], OtaStatus.failed)
    assert h.state() is RolloutState.rolling_back
    h.report(canary[0], OtaStatus.succeeded, version=OLD)  # no command id: the rollback's
    assert h.r.devices[canary[0]].status is Progress.rolled_back
    h.tick(599)
    assert h.state() is RolloutState.rolling_back
    h.tick(1)
    assert h.state() is RolloutState.rolled_back
    assert "did not confirm" in h.audits[-1].reason


def test_a_succeeded_report_of_another_version_counts_as_failed() -> None:
    h = Harness(fleet(4), plan=RolloutPlan(canary_size=2, error_threshold=0.5))
    h.start()
    canary = h.r.current_cohort
    h.report(canary[0], OtaStatus.succeeded, version="1.9.9")
    device = h.r.devices[canary[0]]
    assert device.status is Progress.failed
    assert "1.9.9" in (device.reason or "")


def test_stale_and_foreign_reports_are_ignored() -> None:
    h = Harness(fleet(4), plan=RolloutPlan(canary_size=2, error_threshold=0.5))
    h.start()
    d = h.r.current_cohort[0]
    h.send(DeviceReport(device_id=d, status=OtaStatus.installing, seq=10))
    before = h.r
    h.send(DeviceReport(device_id=d, status=OtaStatus.failed, seq=9))  # older
    h.send(DeviceReport(device_id=d, status=OtaStatus.failed, seq=11, command_id="other"))
    h.send(DeviceReport(device_id=d, status=OtaStatus.failed, seq=12, rollout_id="ro-2"))
    h.send(DeviceReport(device_id="stranger", status=OtaStatus.failed, seq=1))
    assert h.r == before


def test_ineligible_devices_are_skipped_not_commanded() -> None:
    plan = RolloutPlan(canary_size=1, percentages=(100,), health_window_s=0)
    h = Harness(fleet(4), plan=plan)
    h.start()
    (canary,) = h.r.current_cohort
    second, third, fourth = h.r.cohorts[1]
    # Planned while eligible; by the time their cohort starts, one is suspended, one is
    # already up to date and one was deleted from the registry.
    h.devices[second] = device(second, status=DeviceStatus.suspended)
    h.devices[third] = device(third, version=NEW)
    del h.devices[fourth]
    h.succeed([canary])
    assert h.r.cohort_index == 1
    assert h.r.devices[second].status is Progress.skipped
    assert h.r.devices[second].reason == "device is suspended"
    assert h.r.devices[third].reason == f"already at {NEW}"
    assert h.r.devices[fourth].reason == "not in the registry"
    assert h.state() is RolloutState.completed  # nothing left to update in cohort 1
    assert h.commanded() == [canary]


def test_a_cohort_timeout_fails_stragglers() -> None:
    plan = RolloutPlan(canary_size=4, percentages=(100,), cohort_timeout_s=300, error_threshold=0.3)
    h = Harness(fleet(8), plan=plan)
    h.start()
    canary = h.r.current_cohort
    h.succeed(canary[:3])
    h.tick(299)
    assert h.r.devices[canary[3]].status is Progress.sent
    h.tick(1)
    assert h.r.devices[canary[3]].status is Progress.failed
    assert h.state() is RolloutState.running  # 1/4 is under 0.3


# --------------------------------------------------------------------------- operators


def test_pause_stops_new_commands_and_resume_continues() -> None:
    h = Harness(fleet(8))
    h.start()
    canary = h.r.current_cohort
    h.send(Pause(request_id="p", principal=OPERATOR))
    assert h.state() is RolloutState.paused
    h.succeed(canary)
    h.tick(1)
    h.seen(canary)
    h.tick(3600)
    assert h.r.cohort_index == 0
    assert len(h.commands) == len(canary)
    h.send(Pause(request_id="p2", principal=OPERATOR))
    assert h.decision() is AuditDecision.unchanged
    h.send(Resume(request_id="r", principal=OPERATOR))
    assert h.state() is RolloutState.running
    assert h.r.window_started_ms == h.now  # the window opens afresh
    h.seen(canary)
    h.tick(60)
    assert h.r.cohort_index == 1
    assert len(h.commands) == len(canary) + len(h.r.current_cohort)


def test_pause_holds_the_rollback_until_resume() -> None:
    h = Harness(fleet(8), plan=RolloutPlan(canary_size=2, percentages=(100,)))
    h.start()
    canary = h.r.current_cohort
    h.send(Pause(request_id="p", principal=OPERATOR))
    h.report(canary[0], OtaStatus.installing)
    h.report(canary[0], OtaStatus.failed)
    assert h.state() is RolloutState.paused
    assert h.commanded(CommandAction.rollback) == []
    h.send(Resume(request_id="r", principal=OPERATOR))
    assert h.state() is RolloutState.rolling_back
    assert h.commanded(CommandAction.rollback) == [canary[0]]


def test_pause_before_start_and_resume() -> None:
    h = Harness(fleet(4))
    h.create()
    h.approve()
    h.send(Pause(request_id="p", principal=OPERATOR))
    h.tick(60)
    assert h.commands == []
    h.send(Resume(request_id="r", principal=OPERATOR))
    assert h.state() is RolloutState.approved
    h.tick(1)
    assert len(h.commands) == 2


def test_abort_ends_the_rollout() -> None:
    h = Harness(fleet(8))
    h.start()
    canary = h.r.current_cohort
    h.send(Abort(request_id="a", principal=OPERATOR, reason="wrong build"))
    assert h.state() is RolloutState.aborted
    assert h.r.reason == "aborted by user:oscar: wrong build"
    h.pass_cohort()
    h.send(DeviceJoined(device_id=canary[0]))
    h.tick(3600)
    assert len(h.commands) == len(canary)
    h.send(Resume(request_id="r", principal=OPERATOR))
    assert h.decision() is AuditDecision.refused
    h.send(Abort(request_id="a2", principal=OPERATOR))
    assert h.decision() is AuditDecision.unchanged


def test_completed_and_rolling_back_rollouts_cannot_be_aborted() -> None:
    h = Harness(fleet(3), plan=RolloutPlan(canary_size=3, percentages=(100,), health_window_s=0))
    h.start()
    h.succeed(h.r.current_cohort)
    assert h.state() is RolloutState.completed
    h.send(Abort(request_id="a", principal=OPERATOR))
    assert h.decision() is AuditDecision.refused
    assert h.state() is RolloutState.completed


# --------------------------------------------------------------------------- joining devices


def test_a_device_joining_after_completion_gets_the_update() -> None:
    h = Harness(fleet(3), plan=RolloutPlan(canary_size=1, percentages=(100,), health_window_s=10))
    h.start()
    while h.state() is RolloutState.running:
        h.pass_cohort()
    assert h.state() is RolloutState.completed
    sent = len(h.commands)
    h.devices["late-1"] = device("late-1")
    h.devices["elsewhere"] = device("elsewhere", group="pumps")
    h.send(DeviceJoined(device_id="late-1"), DeviceJoined(device_id="elsewhere"))
    assert [c.device_id for c in h.commands[sent:]] == ["late-1"]
    h.send(DeviceJoined(device_id="late-1"))  # a replayed join
    assert len(h.commands) == sent + 1
    h.report("late-1", OtaStatus.succeeded)
    assert h.r.devices["late-1"].status is Progress.succeeded
    assert h.state() is RolloutState.completed


def test_a_device_joining_during_the_rollout_lands_in_the_last_cohort() -> None:
    h = Harness(fleet(10), plan=RolloutPlan(canary_size=2, percentages=(100,), health_window_s=10))
    h.start()
    h.devices["late-1"] = device("late-1")
    h.send(DeviceJoined(device_id="late-1"))
    assert h.r.devices["late-1"].cohort == 1
    assert "late-1" not in h.commanded()
    h.pass_cohort()
    assert "late-1" in h.commanded()
    h.devices["late-2"] = device("late-2")
    h.send(DeviceJoined(device_id="late-2"))  # the last cohort runs: commanded at once
    assert h.commanded()[-1] == "late-2"


def test_an_empty_target_completes_and_later_devices_get_the_update() -> None:
    h = Harness({})
    h.start()
    assert h.state() is RolloutState.completed
    h.devices["d-1"] = device("d-1")
    h.send(DeviceJoined(device_id="d-1"))
    assert h.commanded() == ["d-1"]


# --------------------------------------------------------------------------- replays


def test_replaying_a_batch_against_the_later_state_changes_nothing() -> None:
    h = Harness(fleet(6))
    h.start()
    canary = h.r.current_cohort
    events: list[Event] = [
        DeviceReport(device_id=d, status=s, seq=i, version=NEW)
        for d in canary
        for i, s in enumerate((OtaStatus.installing, OtaStatus.succeeded), start=1)
    ]
    h.send(*events)
    state = h.r
    again = run(state, events, now_ms=h.now, grants=GRANTS, devices=h.devices)
    assert again.rollout is state
    assert not again.changed
    assert again.commands == ()


device_ids = [f"d-{i:04d}" for i in range(5)]
statuses = [*[OtaStatus.succeeded] * 6, *[OtaStatus.installing] * 3, *OtaStatus]


@st.composite
def reports(draw: st.DrawFn) -> DeviceReport:
    """A report from one of the devices, naming its install or rollback command, another
    command, or none."""
    device_id = draw(st.sampled_from(device_ids))
    which = draw(st.sampled_from(["none", "install", "install", "rollback", "foreign"]))
    ident = {
        "none": None,
        "install": command_id("ro-1", device_id, CommandAction.install),
        "rollback": command_id("ro-1", device_id, CommandAction.rollback),
        "foreign": command_id("ro-2", device_id, CommandAction.install),
    }[which]
    return DeviceReport(
        device_id=device_id,
        status=draw(st.sampled_from(statuses)),
        seq=draw(st.integers(1, 12)),
        version=draw(st.sampled_from([NEW, NEW, NEW, NEW, None, OLD])),
        command_id=ident,
    )


replay_events = st.one_of(
    reports(),
    reports(),
    reports(),
    st.builds(
        AlertRaised,
        device_id=st.sampled_from(device_ids),
        severity=st.sampled_from(Severity),
        alert_id=st.sampled_from(["a", "b"]),
    ),
    # Telemetry at the start (before any window) or far ahead (inside every window).
    st.builds(
        Telemetry, device_id=st.sampled_from(device_ids), seen_ms=st.sampled_from([T0, T0 + 10**9])
    ),
    st.builds(DeviceJoined, device_id=st.sampled_from([*device_ids, "late-1", "late-2"])),
    st.just(Tick()),
    st.sampled_from(
        [
            Pause(request_id="p", principal=OPERATOR),
            Resume(request_id="r", principal=OPERATOR),
            Resume(request_id="r2", principal=OPERATOR),
        ]
    ),
)


@dataclass(frozen=True)
class Healthy:
    """Test-only marker: every device of the current cohort succeeds and is seen. It is
    expanded into concrete events once; replays of its batch replay those events."""


def expand(h: Harness, events: list[Event | Healthy]) -> list[Event]:
    out: list[Event] = []
    for event in events:
        if not isinstance(event, Healthy):
            out.append(event)
            continue
        for d in h.r.current_cohort:
            h.seqs[d] = max(h.seqs[d], 12) + 1
            ident = command_id("ro-1", d, CommandAction.install)
            out.append(
                DeviceReport(
                    device_id=d,
                    status=OtaStatus.succeeded,
                    seq=h.seqs[d],
                    version=NEW,
                    command_id=ident,
                )
            )
            out.append(Telemetry(device_id=d, seen_ms=T0 + 10**9))
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batches=st.lists(
        st.tuples(
            st.integers(0, 120),
            st.lists(st.one_of(replay_events, st.just(Healthy()), st.just(Tick())), max_size=6),
        ),
        max_size=25,
    ),
    replays=st.lists(st.tuples(st.integers(0, 25), st.integers(0, 24)), max_size=8),
)
def test_no_command_is_ever_issued_twice(
    batches: list[tuple[int, list[Event | Healthy]]], replays: list[tuple[int, int]]
) -> None:
    """Any interleaving of batches and redelivered (replayed) earlier batches issues each
    command id at most once, only to devices of started cohorts, rollbacks only to devices
    that installed; and applying the events one at a time gives the same result."""
    devices = {**fleet(5), "late-1": device("late-1"), "late-2": device("late-2")}
    plan = RolloutPlan(
        canary_size=1,
        percentages=(40, 100),
        health_window_s=30,
        error_threshold=0.3,
        cohort_timeout_s=1800,
        rollback_timeout_s=300,
    )
    h = Harness(devices, plan=plan)
    h.start()
    played: list[tuple[int, list[Event]]] = []

    def play(delay: int, events: list[Event]) -> None:
        played.append((delay, events))
        h.now += delay * S
        h.send(*events)
        h.tick()

    for position, (delay, raw) in enumerate(batches):
        play(delay, expand(h, raw))
        for at, which in replays:
            if at == position and which < len(batches):
                play(0, played[min(which, len(played) - 1)][1])  # a redelivery
    for at, which in replays:
        if at >= len(batches) and played:
            play(1, played[which % len(played)][1])

    ids = [c.command_id for c in h.commands]
    assert len(ids) == len(set(ids))
    assert set(ids) == h.r.issued
    started = {d for c in h.r.cohorts[: h.r.cohort_index + 1] for d in c}
    assert {c.device_id for c in h.commands} <= started
    for c in h.commands:
        assert c.command_id == command_id("ro-1", c.device_id, c.action)
        assert c.action is CommandAction.install or h.r.devices[c.device_id].installed
    # One event at a time gives the same commands and state as the batches did.
    single = Harness(devices, plan=plan, round_trip=False)
    single.start()
    for delay, concrete in played:
        single.now += delay * S
        for event in concrete:
            single.send(event)
        single.tick()
    assert [c.command_id for c in single.commands] == ids
    assert single.r == h.r


# --------------------------------------------------------------------------- records


def test_reports_parse_from_the_bridges_device_events() -> None:
    rollback = command_id("ro-1", "d-1", CommandAction.rollback)
    payload = {
        "seq": 42,
        "ts": T0,
        "status": "failed",
        "reason": "bad_signature",
        "version": "2.0.0",
        "command_id": rollback,
        "rollout_id": "ro-1",
    }
    accepted = validate_ota_status("d-1", json.dumps(payload).encode(), T0)
    assert isinstance(accepted, Accepted)
    report = report_from_event(accepted.record)
    assert report == DeviceReport(
        device_id="d-1",
        status=OtaStatus.failed,
        seq=42,
        version="2.0.0",
        reason="bad_signature",
        command_id=rollback,
        rollout_id="ro-1",
    )
    other = validate_ota_status("d-1", json.dumps({**payload, "status": "rebooting"}).encode(), T0)
    assert isinstance(other, Accepted)
    assert report_from_event(other.record) is None
    assert report_from_event({"type": "reboot", "device_id": "d-1", "seq": 1}) is None


def test_alerts_become_events_when_raised() -> None:
    alert = AlertEvent(
        alert_id="a-1",
        device_id="d-1",
        rule_id="r",
        status=AlertStatus.raised,
        metric="t",
        value=1.0,
        threshold=0.0,
        severity=Severity.critical,
        seq=1,
        ts=T0,
    )
    assert AlertRaised.from_alert(alert) == AlertRaised(
        device_id="d-1", severity=Severity.critical, alert_id="a-1"
    )
    assert AlertRaised.from_alert(replace(alert, status=AlertStatus.resolved)) is None


def test_every_state_survives_avro() -> None:
    h = Harness(fleet(6), plan=RolloutPlan(canary_size=2, cohort_timeout_s=5.5))
    h.create()
    h.approve()
    h.send(Pause(request_id="p", principal=OPERATOR))
    assert avro_round_trip(h.r).paused_from is RolloutState.approved
    h.send(Resume(request_id="r", principal=OPERATOR))
    h.tick()
    h.succeed(h.r.current_cohort[:1])
    h.send(Telemetry(device_id=h.r.current_cohort[0], seen_ms=h.now))
    record = to_record(h.r)
    assert record["cohort_count"] == len(h.r.cohorts)
    assert record["devices"] == sorted(record["devices"], key=lambda d: d["device_id"])
    assert avro_round_trip(h.r) == h.r
    with pytest.raises(ValueError, match="in cohort"):
        from_record({**record, "cohort_count": 0})
