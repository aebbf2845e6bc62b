"""`fleet demo`: the whole pipeline against a simulated fleet, then the numbers, from SQL.

It brings the stack up (Kafka, registry, Mosquitto, bridge, hot and cold workers), provisions
a fresh fleet (ids `demo<run>-NNNNN`, so this run's rows are counted apart from earlier runs)
into the registry's device group `demo`, installs the demo's alert rules on that group, runs
the simulator while showing live progress, changes every device's desired state a third of
the way in, waits until the warehouse holds every published message and the twins have
converged (or a deadline passes), prints the analyst queries' results and, last, one JSON
summary line: `quarantined` counts the messages the quality gate held (a share `bad_share` of
the readings is made bad on purpose), so `stored + quarantined == published`; `alerts` counts
the alerts raised on this run's devices, `twins` the twins
whose delta is empty at the end.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from infra.api.client import HotPathClient
from infra.keys import key_passphrase
from infra.pki import CertificateAuthority
from infra.provision import load_or_provision, register
from infra.quality import quarantined
from infra.release_key import open_artifact_store
from infra.settings import Settings
from infra.simulator.device import SimulatedDevice
from infra.simulator.fleet import run_fleet
from infra.simulator.stats import FleetStats
from infra.stack import Stack
from infra.warehouse import fetch, warehouse_counts
from queries.runner import QueryError, render
from sinks.doris import is_doris_dsn
from streams.hot.alerts import AlertRule, AlertStatus, RuleKind, ScopeType, Severity
from streams.hot.twin import delta
from streams.ota.events import OtaRequest
from streams.ota.plan import RolloutPlan
from streams.ota.summary import rollout_summary
from streams.registry.devices import AuditRecord
from streams.registry.rbac import GrantSet, Principal, Resource, Role

DEMO_ORG, DEMO_PROJECT = "demo", "fleet"
DEMO_OPERATOR, DEMO_APPROVER = "user:demo-operator", "user:demo-approver"


def demo_rules(group: str) -> tuple[AlertRule, ...]:
    """The alert rules of one demo run, scoped to its device group (by its full path)."""
    scope = str(Resource(DEMO_ORG, DEMO_PROJECT, group))
    return (
        # Failing devices vibrate at about 6x normal; a band keeps a noisy one from flapping.
        AlertRule(
            f"{group}-vibration",
            ScopeType.group,
            scope,
            "vibration_rms",
            RuleKind.above,
            threshold=3.0,
            clear_threshold=2.0,
        ),
        # Drifting sensors warm steadily.
        AlertRule(
            f"{group}-overheat",
            ScopeType.group,
            scope,
            "temperature",
            RuleKind.above,
            threshold=30.0,
            clear_threshold=28.0,
            severity=Severity.critical,
        ),
        AlertRule(
            f"{group}-battery-low",
            ScopeType.group,
            scope,
            "battery",
            RuleKind.below,
            threshold=15.0,
            clear_threshold=20.0,
        ),
    )


DESIRED_CHANGE = {"sampling": {"vibration_hz": 200}, "led": "green"}

ANALYST_QUERIES = (
    "latest_reading.sql",
    "metric_percentiles.sql",
    "messages_per_minute.sql",
    "silent_devices.sql",
    "battery_drain.sql",
)

LATENCY_SQL = """
SELECT
    quantileExact(0.5)(dateDiff('millisecond', ts, stored_at)) AS p50,
    quantileExact(0.99)(dateDiff('millisecond', ts, stored_at)) AS p99
FROM telemetry FINAL
WHERE startsWith(device_id, {prefix:String})
"""
# The same for Apache Doris (UNIQUE KEY tables hold one row per message: no FINAL).
DORIS_LATENCY_SQL = """
SELECT
    percentile(milliseconds_diff(stored_at, ts), 0.5) AS p50,
    percentile(milliseconds_diff(stored_at, ts), 0.99) AS p99
FROM telemetry
WHERE starts_with(device_id, {prefix:String})
"""


@dataclass(frozen=True)
class DemoPlan:
    devices: int
    duration: float
    rate: float
    drain_timeout: float = 180.0
    ota: bool = False
    ota_fail_rate: float = 0.0
    bad_share: float = 0.01  # readings the quality gate quarantines (see "quarantined")


@dataclass
class DemoRollout:
    """The demo's OTA rollout: a fresh firmware image for this run's device group."""

    rollout_id: str
    artifact_root: Path
    release_public_key: bytes
    artifact_path: Path  # the stored image devices download
    approved: bool = False

    def approve(self, client: HotPathClient) -> None:
        audit = client.ota_request(
            OtaRequest(rollout_id=self.rollout_id, kind="approve"), Principal.parse(DEMO_APPROVER)
        )
        self.approved = audit.decision in ("applied", "unchanged")

    def summary(self, client: HotPathClient) -> dict[str, Any]:
        rollout = client.rollouts().get(self.rollout_id)
        if rollout is None:
            return {"state": "missing", "updated": 0, "failed": 0, "rolled_back": 0}
        full = rollout_summary(rollout)
        return {k: full[k] for k in ("state", "updated", "failed", "rolled_back", "refused")}


def _until_decided(ask: Callable[[], AuditRecord], deadline_s: float = 30.0) -> AuditRecord:
    """Ask until the controller's tables (grants, artifacts, followed from Kafka) have caught
    up with what the demo has just written."""
    deadline = time.monotonic() + deadline_s
    while True:
        audit = ask()
        if audit.decision in ("applied", "unchanged") or time.monotonic() > deadline:
            return audit
        time.sleep(0.5)


DEMO_ROLLOUT_PLAN = RolloutPlan(
    canary_size=5,
    percentages=(1.0, 10.0, 100.0),
    success_threshold=0.9,
    error_threshold=0.05,
    health_window_s=5.0,
    cohort_timeout_s=30.0,
    rollback_timeout_s=20.0,
)


def prepare_rollout(
    settings: Settings, client: HotPathClient, group: str, plan: RolloutPlan = DEMO_ROLLOUT_PLAN
) -> DemoRollout:
    """Sign a new firmware image, grant the demo's operator and approver, create the rollout
    (pending approval: nothing is sent yet)."""
    store = open_artifact_store(
        settings.state_dir / "artifacts", settings.pki_dir, passphrase=key_passphrase(settings)
    )
    image = f"fleetstream demo firmware 2.0.0 for {group}\n".encode() * 2048
    artifact = store.add_bytes(image, "firmware", "2.0.0", name=f"{group}.bin")
    client.put_artifact(artifact)
    project = Resource(DEMO_ORG, DEMO_PROJECT)
    operator, approver = Principal.parse(DEMO_OPERATOR), Principal.parse(DEMO_APPROVER)
    client.put_grants(GrantSet.of(operator, (Role.operator, project)))
    client.put_grants(GrantSet.of(approver, (Role.ota_approver, project)))
    rollout_id = f"{group}-fw-2.0.0"
    target = str(Resource(DEMO_ORG, DEMO_PROJECT, group))
    audit = _until_decided(
        lambda: client.ota_request(
            OtaRequest(
                rollout_id=rollout_id,
                kind="create",
                artifact_id=artifact.artifact_id,
                target=target,
                plan=plan.to_record(),
            ),
            operator,
        )
    )
    if audit.decision not in ("applied", "unchanged"):
        raise RuntimeError(f"the demo rollout was not created: {audit.reason}")
    return DemoRollout(
        rollout_id,
        store.root,
        store.release_key.public_key_pem,
        store.root / artifact.path,
    )


def _bridges_total(stack: Stack, counter: str) -> int:
    """A counter summed over the bridge replicas."""
    return sum(int(b.counters().get(counter, 0)) for b in stack.bridges)


def _progress(stats: FleetStats, stack: Stack, stored: int) -> Table:
    elapsed = max(time.monotonic() - stats.started_at, 1e-9)
    accepted = _bridges_total(stack, "accepted")
    table = Table(title="fleetstream demo")
    for column in (
        "devices",
        "published",
        "acked by broker",
        "in Kafka (bridge)",
        "stored",
        "publish rate",
    ):
        table.add_column(column, justify="right")
    table.add_row(
        str(stats.connected),
        str(stats.published),
        str(stats.acked),
        str(accepted),
        str(stored),
        f"{stats.published / elapsed:,.0f}/s",
    )
    return table


def _stored(settings: Settings, prefix: str) -> int:
    try:
        return warehouse_counts(settings, device_prefix=prefix).stored
    except QueryError:
        return 0


def _quarantined(settings: Settings, prefix: str) -> int:
    try:
        return quarantined(settings, prefix)
    except QueryError:
        return 0


def _converged_twins(client: HotPathClient, prefix: str, devices: int, deadline: float) -> int:
    """Twins of this run whose delta is empty, once all are or the deadline passed."""
    while True:
        twins = [t for d, t in client.twins().items() if d.startswith(prefix)]
        converged = sum(1 for t in twins if not delta(t))
        if converged >= devices or time.monotonic() > deadline:
            return converged
        time.sleep(1.0)


def run_demo(settings: Settings, plan: DemoPlan, console: Console) -> dict[str, Any]:
    stack = Stack(settings)
    with console.status("starting the stack…"):
        stack.up()
    prefix = f"demo{uuid.uuid4().hex[:4]}-"
    ca = CertificateAuthority.load_or_create(settings.pki_dir, passphrase=key_passphrase(settings))
    with console.status(f"provisioning {plan.devices} devices (key + CSR on the device side)…"):
        creds = load_or_provision(
            ca,
            [f"{prefix}{i:05d}" for i in range(plan.devices)],
            settings.state_dir / "devices",
            "ec",
        )
    client = HotPathClient(settings)
    started_ms = int(time.time() * 1000)
    group = prefix.rstrip("-")  # this run's device group: its rules and rollout target
    rules = demo_rules(group)
    with console.status("registering the fleet and its alert rules…"):
        register(client, creds, DEMO_ORG, DEMO_PROJECT, group)
        for rule in rules:
            client.put_rule(rule)
    ota = prepare_rollout(settings, client, group) if plan.ota else None
    dead_before = _bridges_total(stack, "dead_lettered")
    result: list[tuple[FleetStats, list[SimulatedDevice]]] = []
    stats_box: list[FleetStats] = []

    def simulate() -> None:
        result.append(
            asyncio.run(
                run_fleet(
                    settings,
                    creds,
                    plan.rate,
                    plan.duration,
                    on_start=stats_box.append,
                    artifact_root=ota.artifact_root if ota else None,
                    release_public_key=ota.release_public_key if ota else None,
                    ota_fail_rate=plan.ota_fail_rate,
                    bad_share=plan.bad_share,
                )
            )
        )

    runner = threading.Thread(target=simulate, name="simulator")
    runner.start()
    stored = 0
    desired_sent = False
    with Live(console=console, refresh_per_second=2, transient=False) as live:
        while runner.is_alive():
            if stats_box:
                stored = _stored(settings, prefix)
                live.update(_progress(stats_box[0], stack, stored))
                running_s = time.monotonic() - stats_box[0].started_at
                if ota is not None and not ota.approved and running_s > 2:
                    ota.approve(client)  # the fleet is online: the canary can start
                if not desired_sent and running_s > plan.duration / 3:
                    desired_sent = True  # devices get the delta live, or on reconnect
                    client.set_desired_many({c.device_id: DESIRED_CHANGE for c in creds})
            runner.join(timeout=1.0)
        stats, _ = result[0]
        deadline = time.monotonic() + plan.drain_timeout
        held = 0  # quarantined by the quality gate: landed too
        while stored + held < stats.published and time.monotonic() < deadline:
            stored = _stored(settings, prefix)
            held = _quarantined(settings, prefix) if stored < stats.published else 0
            live.update(_progress(stats, stack, stored))
            time.sleep(0.5)
    for name in ANALYST_QUERIES:
        try:
            console.print(f"[bold]queries/{name}[/]")
            console.print(render(fetch(settings, f"queries/{name}")), highlight=False)
        except QueryError as exc:
            console.print(f"[red]{exc}[/]")
    converged = _converged_twins(client, prefix, plan.devices, deadline=time.monotonic() + 60)
    for rule in rules:  # this run's rules go with it (tombstones on alerts.rules)
        client.delete_rule(rule.rule_id)
    raised = [
        a
        for a in client.alerts(since_ms=started_ms)
        if a.device_id.startswith(prefix) and a.status is AlertStatus.raised
    ]
    counts = warehouse_counts(settings, device_prefix=prefix)
    latency_sql = DORIS_LATENCY_SQL if is_doris_dsn(settings.warehouse_dsn) else LATENCY_SQL
    latency = fetch(settings, latency_sql, {"prefix": prefix}).rows[0]
    return {
        "devices": plan.devices,
        "published": stats.published,
        "stored": counts.stored,
        "duplicates": counts.duplicates,
        "quarantined": quarantined(settings, prefix),
        "dead_lettered": _bridges_total(stack, "dead_lettered") - dead_before,
        "alerts": len(raised),
        "twins": converged,
        "e2e_latency_ms": {"p50": latency[0], "p99": latency[1]},
        "events": stats.events,
        "duration_s": plan.duration,
        **({"ota": ota.summary(client)} if ota is not None else {}),
    }
