"""`fleet`: the operator's command line."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from infra.keys import key_passphrase, token_authority
from infra.pki import KeyKind
from infra.services.base import ServiceError
from infra.settings import Settings, load_settings
from infra.stack import Stack, StackStatus

if TYPE_CHECKING:
    from infra.api.client import HotPathClient

app = typer.Typer(help="fleetstream: IoT fleet telemetry on Kafka.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)


def _settings(brokers: int | None = None) -> Settings:
    settings = load_settings()
    if brokers is not None and brokers != settings.brokers:
        settings = settings.model_copy(update={"brokers": brokers})
    return settings


def _fail(exc: Exception) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {exc}")
    return typer.Exit(code=1)


def _print_status(status: StackStatus) -> None:
    table = Table(title="services")
    for column in ("service", "state", "address", "pid", "version", "restarts"):
        table.add_column(column)
    colours = {"up": "green", "starting": "yellow", "down": "red", "backoff": "red"}
    for s in status.services:
        table.add_row(
            s.name,
            f"[{colours.get(s.state, 'white')}]{s.state}[/]",
            f"{s.host}:{s.port}",
            str(s.pid or "-"),
            s.version or "-",
            str(s.restarts),
        )
    console.print(table)
    if status.topics:
        topics = Table(title="kafka topics")
        topics.add_column("topic")
        topics.add_column("partitions", justify="right")
        for name, partitions in status.topics.items():
            topics.add_row(name, str(partitions))
        console.print(topics)
    for group, lag in status.consumer_lag.items():
        console.print(f"consumer group [bold]{group}[/]: lag {lag}")


@app.command()
def up(
    brokers: int = typer.Option(None, help="Kafka brokers (3 gives replication factor 3)."),
) -> None:
    """Start the services in the background; return when every one answers."""
    stack = Stack(_settings(brokers))
    try:
        with console.status("starting Kafka, schema registry, Mosquitto…"):
            status = stack.up()
    except ServiceError as exc:
        raise _fail(exc) from exc
    _print_status(status)


@app.command()
def down() -> None:
    """Stop, by pid, exactly what `fleet up` started."""
    stopped = Stack(_settings()).down()
    console.print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")


@app.command()
def status(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Each service (state, address, pid, version) and Kafka's topics."""
    result = Stack(_settings()).status()
    if as_json:
        sys.stdout.write(json.dumps(result.to_dict()) + "\n")
    else:
        _print_status(result)
    if not result.all_up:
        raise typer.Exit(code=3)


@app.command()
def bridge(replica: int = typer.Option(0, help="Replica number: its MQTT client id.")) -> None:
    """Run the MQTT -> Kafka bridge in the foreground (`fleet up` runs it in the background)."""
    from infra.entrypoints.bridge import main as bridge_main

    bridge_main(replica)


@app.command()
def provision(
    org: str = typer.Option(..., help="Organization."),
    project: str = typer.Option(..., help="Project."),
    group: str = typer.Option(..., help="Device group."),
    count: int = typer.Option(1, min=1, help="How many devices."),
    out: Path = typer.Option(..., help="Where each device's key, certificate and ca.crt go."),
    key: str = typer.Option("rsa", help="Key type made on the device side: rsa or ec."),
    principal: str = typer.Option(
        "orchestrator", "--as", help="Who provisions (user:<id>, service:<id>): authorized."
    ),
) -> None:
    """Make device identities (key pair and CSR on the device side, certificate from the CA)
    and record them in the registry through its agent (authorized, audited)."""
    import time

    from infra.api.client import HotPathClient, HotPathError
    from infra.pki import CertificateAuthority, PkiError
    from infra.provision import provision_device, register
    from streams.registry.rbac import Action, Principal, Resource, authorize

    settings = _settings()
    ca = CertificateAuthority.load_or_create(settings.pki_dir, passphrase=key_passphrase(settings))
    kind: KeyKind = "ec" if key == "ec" else "rsa"
    try:
        who = Principal.parse(principal)
        client = HotPathClient(settings)
        # Ask first: no certificate is issued to a principal the registry would refuse.
        decision = authorize(
            who, Action.device_provision, Resource(org, project, group), client.grant_sets()
        )
        if not decision.allowed:
            raise ValueError(f"denied: {decision.reason}")
        started = time.perf_counter()
        creds = [
            provision_device(ca, f"{group}-{uuid.uuid4().hex[:10]}", out, kind)
            for _ in range(count)
        ]
        signed_s = time.perf_counter() - started
        audits = register(client, creds, org, project, group, who)
        for c in creds:  # refused by the agent after all (grant revoked meanwhile...)
            if audits[c.device_id].decision != "applied":
                ca.revoke(c.serial, "registry refused the device")
    except (PkiError, ValueError, HotPathError) as exc:
        raise _fail(exc) from exc
    manifest = []
    for c in creds:
        audit = audits[c.device_id]
        manifest.append(
            {
                "device_id": c.device_id,
                "org": org,
                "project": project,
                "group": group,
                "serial": str(c.serial),
                "registry": str(audit.decision),
            }
        )
        console.print(f"{c.device_id}: {c.cert_path} ({audit.decision}: {audit.reason})")
    (out / "devices.json").write_text(json.dumps(manifest, indent=2))
    console.print(
        f"{count} key pairs + CSRs made and signed in {signed_s:.2f}s "
        f"({count / max(signed_s, 1e-9):,.0f}/s, {kind})"
    )
    if any(m["registry"] != "applied" for m in manifest):
        raise typer.Exit(code=6)  # some entries denied or refused: see the audit reasons


@app.command()
def simulate(
    devices: int = typer.Option(10, min=1, help="Simulated devices."),
    rate: float = typer.Option(1.0, min=0.001, help="Telemetry messages per second per device."),
    duration: float = typer.Option(10.0, min=0, help="Seconds of publishing."),
    messages: int = typer.Option(None, min=1, help="Stop each device after this many messages."),
    key: str = typer.Option("ec", help="Device key type: ec (fast for large fleets) or rsa."),
    prefix: str = typer.Option("sim", help="Device id prefix."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary last."),
) -> None:
    """A simulated fleet over MQTT 5 + mTLS, each device with its own certificate."""
    import asyncio

    from infra.pki import CertificateAuthority
    from infra.provision import load_or_provision
    from infra.simulator import run_fleet

    settings = _settings()
    ca = CertificateAuthority.load_or_create(settings.pki_dir, passphrase=key_passphrase(settings))
    ids = [f"{prefix}-{i:05d}" for i in range(devices)]
    kind: KeyKind = "rsa" if key == "rsa" else "ec"
    with console.status(f"provisioning {devices} devices…"):
        creds = load_or_provision(ca, ids, settings.state_dir / "devices", kind)
    stats, _ = asyncio.run(run_fleet(settings, creds, rate, duration, messages))
    summary = stats.summary()
    if as_json:
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        console.print(summary)


@app.command()
def sql(
    query: str = typer.Argument(..., help="A SQL statement, or a path to a queries/*.sql file."),
    param: list[str] = typer.Option([], "--param", help="Query parameter k=v (repeatable)."),
    fmt: str = typer.Option("table", "--format", help="table, json or csv."),
    token: str = typer.Option(
        None, envvar="FLEET_TOKEN", help="A bearer token (needs telemetry.read)."
    ),
    principal: str = typer.Option(
        None, "--as", help="Query as user:<id> or service:<id> (a short token signed here)."
    ),
) -> None:
    """Run an analyst query against the warehouse (through the pipeline while it runs).
    The query port wants a token: --token, --as, or else the platform's own (this machine)."""
    from infra.warehouse import run_sql
    from queries.runner import QueryError
    from streams.registry.rbac import Principal

    params = dict(p.split("=", 1) for p in param if "=" in p)
    if fmt not in ("table", "json", "csv"):
        raise _fail(ValueError(f"--format must be table, json or csv, not {fmt!r}"))
    settings = _settings()
    try:
        if principal and not token:
            token = token_authority(settings).issue(Principal.parse(principal), 300)
        sys.stdout.write(run_sql(settings, query, params, fmt, token) + "\n")  # type: ignore[arg-type]
    except (QueryError, ValueError) as exc:
        raise _fail(exc) from exc


@app.command()
def demo(
    devices: int = typer.Option(500, min=1, help="Simulated devices."),
    duration: float = typer.Option(60.0, min=1, help="Seconds of publishing."),
    rate: float = typer.Option(1.0, min=0.01, help="Telemetry messages per second per device."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON summary as the last line."),
    ota: bool = typer.Option(False, "--ota", help="Also roll out new firmware to the fleet."),
    ota_fail_rate: float = typer.Option(
        0.0, min=0.0, max=1.0, help="Share of devices whose install fails (--ota)."
    ),
) -> None:
    """The whole pipeline against a simulated fleet; the summary is counted with SQL."""
    from infra.demo import DemoPlan, run_demo

    plan = DemoPlan(
        devices, duration, rate, ota=ota or ota_fail_rate > 0, ota_fail_rate=ota_fail_rate
    )
    try:
        summary = run_demo(_settings(), plan, console)
    except ServiceError as exc:
        raise _fail(exc) from exc
    if as_json:
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        console.print_json(json.dumps(summary))


twin_app = typer.Typer(help="Device twins: desired, reported, delta, version.")
alerts_app = typer.Typer(help="Alert rules (data on alerts.rules) and the alerts they raise.")
app.add_typer(twin_app, name="twin")
app.add_typer(alerts_app, name="alerts")

# `fleet twin set` exit codes: 4 = version conflict (HTTP 409), 5 = invalid patch (HTTP 400).
EXIT_CONFLICT, EXIT_INVALID = 4, 5


def _hot_client() -> HotPathClient:
    from infra.api.client import HotPathClient

    return HotPathClient(_settings())


@twin_app.command("get")
def twin_get(
    device_id: str = typer.Argument(..., help="Device id."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON document only."),
) -> None:
    """A device's twin: {"desired", "reported", "delta", "version"} (all empty: no twin yet)."""
    from streams.hot.twin import Twin, twin_view

    twin = _hot_client().twin(device_id) or Twin(device_id=device_id)
    text = json.dumps(twin_view(twin))
    if as_json:
        sys.stdout.write(text + "\n")
    else:
        console.print_json(text)


@twin_app.command("set")
def twin_set(
    device_id: str = typer.Argument(..., help="Device id."),
    patch: str = typer.Argument(..., help='Desired patch, JSON: \'{"fan": "on", "old": null}\'.'),
    version: int = typer.Option(None, help="Refuse unless the twin is at this version (409)."),
) -> None:
    """Change desired state (a null removes a key); the device gets the delta at QoS 1."""
    from infra.api.client import HotPathError

    try:
        document = json.loads(patch)
    except ValueError as exc:
        raise _fail(ValueError(f"the patch is not JSON: {exc}")) from exc
    if not isinstance(document, dict):
        raise _fail(ValueError("the patch must be a JSON object"))
    try:
        answer = _hot_client().set_desired(device_id, document, version)
    except HotPathError as exc:
        raise _fail(exc) from exc
    sys.stdout.write(
        json.dumps({"status": answer.status, "version": answer.version, "detail": answer.detail})
        + "\n"
    )
    if answer.status == "conflict":
        raise typer.Exit(code=EXIT_CONFLICT)
    if answer.status == "invalid":
        raise typer.Exit(code=EXIT_INVALID)


@alerts_app.command("rules")
def alerts_rules(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """The alert rules in force."""
    from streams.hot.alerts import rule_to_record

    rules = [rule_to_record(r) for r in _hot_client().rules().values()]
    if as_json:
        sys.stdout.write(json.dumps(rules) + "\n")
        return
    table = Table(title="alert rules")
    columns = ("rule_id", "scope_type", "scope", "metric", "kind", "threshold", "clear_threshold")
    for column in (*columns, "severity"):
        table.add_column(column)
    for rule in rules:
        table.add_row(*(str(rule[c]) for c in (*columns, "severity")))
    console.print(table)


@alerts_app.command("add")
def alerts_add(
    rule_id: str = typer.Argument(..., help="Rule id (adding it again replaces the rule)."),
    kind: str = typer.Option(..., help="above, below, rate_of_change or missing_heartbeat."),
    metric: str = typer.Option("", help="Telemetry metric, e.g. temperature."),
    threshold: float = typer.Option(0.0, help="Raise past this value (per second for rates)."),
    clear: float = typer.Option(None, help="Resolve back past this value (hysteresis band)."),
    group: str = typer.Option(
        None, help="Scope: a device group, by path: org/<o>/project/<p>/group/<g>."
    ),
    device: str = typer.Option(None, help="Scope: one device."),
    window: float = typer.Option(None, help="rate_of_change: longest gap between readings, s."),
    heartbeat: float = typer.Option(None, help="missing_heartbeat: silence before raising, s."),
    severity: str = typer.Option("warning", help="info, warning or critical."),
) -> None:
    """Add or replace an alert rule."""
    from streams.hot.alerts import AlertRule, RuleKind, ScopeType, Severity
    from streams.registry.rbac import Level, Resource

    if (group is None) == (device is None):
        raise _fail(ValueError("give exactly one of --group and --device"))
    try:
        if group is not None and Resource.parse(group).level is not Level.group:
            raise ValueError(
                f"--group takes a group's path (org/<o>/project/<p>/group/<g>): {group}"
            )
        rule = AlertRule(
            rule_id=rule_id,
            scope_type=ScopeType.group if group is not None else ScopeType.device,
            scope=group if group is not None else device,
            metric=metric,
            kind=RuleKind(kind),
            threshold=threshold,
            clear_threshold=clear,
            window_s=window,
            heartbeat_s=heartbeat,
            severity=Severity(severity),
        )
    except ValueError as exc:
        raise _fail(exc) from exc
    _hot_client().put_rule(rule)
    console.print(f"rule {rule_id} stored")


@alerts_app.command("rm")
def alerts_rm(rule_id: str = typer.Argument(..., help="Rule id.")) -> None:
    """Delete an alert rule (a tombstone on alerts.rules)."""
    _hot_client().delete_rule(rule_id)
    console.print(f"rule {rule_id} deleted")


@alerts_app.command("list")
def alerts_list(
    since_minutes: float = typer.Option(60.0, help="Alerts of the last N minutes."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Alert lifecycle records (raised, resolved) on the `alerts` topic."""
    import time

    from streams.hot.alerts import alert_to_record

    since = int((time.time() - since_minutes * 60) * 1000)
    events = [alert_to_record(e) for e in _hot_client().alerts(since)]
    if as_json:
        sys.stdout.write(json.dumps(events) + "\n")
        return
    table = Table(title="alerts")
    columns = ("ts", "device_id", "rule_id", "status", "metric", "value", "severity")
    for column in columns:
        table.add_column(column)
    for event in events:
        table.add_row(*(str(event[c]) for c in columns))
    console.print(table)


@app.command()
def token(
    principal: str = typer.Option(..., help="Who the token is for: user:<id> or service:<id>."),
    ttl: int = typer.Option(3600, min=1, help="Seconds the token stays valid."),
) -> None:
    """Print a bearer token for the HTTP API, signed with the platform's key (it says who the
    caller is; what it may do is its grants')."""
    from streams.registry.rbac import Principal

    try:
        signed = token_authority(_settings()).issue(Principal.parse(principal), ttl)
    except ValueError as exc:
        raise _fail(exc) from exc
    sys.stdout.write(signed + "\n")


@app.command()
def grant(
    principal: str = typer.Option(..., help="Who gets it: user:<id> or service:<id>."),
    role: str = typer.Option(..., help="viewer, operator, admin or ota-approver."),
    scope: str = typer.Option(
        ..., help="org/<o>, optionally followed by /project/<p>, /group/<g>, /device/<d>."
    ),
    remove: bool = typer.Option(False, "--remove", help="Take the grant away instead."),
) -> None:
    """Give (or take) a role on a scope, as the platform itself: how the first admin is made.
    Later grants go through the API, authorized and audited."""

    from infra.api.client import HotPathClient
    from streams.registry.rbac import Grant, GrantSet, Principal, Resource, Role

    try:
        who = Principal.parse(principal)
        wanted = Grant(who, Role(role), Resource.parse(scope))
    except ValueError as exc:
        raise _fail(exc) from exc
    client = HotPathClient(_settings())
    current = client.grant_sets().get(who.key, GrantSet(who))
    updated = current.without_grant(wanted) if remove else current.with_grant(wanted)
    client.put_grants(updated)
    client.close()
    sys.stdout.write(json.dumps(updated.to_record()) + "\n")


device_app = typer.Typer(help="A device's lifecycle in the registry (authorized, audited).")
app.add_typer(device_app, name="device")


def _device_command(kind: str, device_id: str, principal: str, reason: str | None) -> None:
    """Send one lifecycle command to the registry agent (which authorizes and audits it, as for
    the API); print its audit record. Exit codes as `fleet ota`: 6 denied, 7 refused."""

    from infra.api.client import HotPathError
    from streams.registry.devices import (
        ActivateDevice,
        RegistryCommand,
        RevokeDevice,
        SuspendDevice,
    )
    from streams.registry.rbac import Principal

    try:
        who = Principal.parse(principal)
        command_id = f"cli-{kind}-{uuid.uuid4().hex}"
        command: RegistryCommand
        if kind == "suspend":
            command = SuspendDevice(
                command_id=command_id, principal=who, device_id=device_id, reason=reason
            )
        elif kind == "revoke":
            command = RevokeDevice(
                command_id=command_id, principal=who, device_id=device_id, reason=reason
            )
        else:
            command = ActivateDevice(command_id=command_id, principal=who, device_id=device_id)
        client = _hot_client()
        try:
            audit = client.registry_commands([command])[command_id]
        finally:
            client.close()
    except (ValueError, HotPathError) as exc:
        raise _fail(exc) from exc
    _ota_answer(audit.decision, audit.to_record())


@device_app.command("suspend")
def device_suspend(
    device_id: str = typer.Argument(..., help="Device id."),
    principal: str = typer.Option("orchestrator", "--as", help="Who asks (device.suspend)."),
    reason: str = typer.Option(None, help="Why (kept in the audit record)."),
) -> None:
    """Suspend a device: the broker refuses it (its certificate on hold) until activated."""
    _device_command("suspend", device_id, principal, reason)


@device_app.command("revoke")
def device_revoke(
    device_id: str = typer.Argument(..., help="Device id."),
    principal: str = typer.Option("orchestrator", "--as", help="Who asks (device.revoke)."),
    reason: str = typer.Option(None, help="Why (kept in the audit record)."),
) -> None:
    """Revoke a device for good: the enforcer revokes its certificate and ends its session."""
    _device_command("revoke", device_id, principal, reason)


@device_app.command("activate")
def device_activate(
    device_id: str = typer.Argument(..., help="Device id."),
    principal: str = typer.Option("orchestrator", "--as", help="Who asks (device.activate)."),
) -> None:
    """Activate a provisioned or suspended device (a revoked one stays revoked: refused)."""
    _device_command("activate", device_id, principal, None)


ota_app = typer.Typer(help="Governed OTA rollouts: artifacts, approval, cohorts, rollback.")
artifact_app = typer.Typer(help="Signed, content-addressed artifacts.")
ota_app.add_typer(artifact_app, name="artifact")
app.add_typer(ota_app, name="ota")
# `fleet ota` requests: 0 applied or unchanged, 6 denied (HTTP 403), 7 refused (HTTP 409).
EXIT_DENIED, EXIT_REFUSED = 6, 7


@artifact_app.command("add")
def ota_artifact_add(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="The artifact file."),
    kind: str = typer.Option(..., help="firmware, config or model."),
    version: str = typer.Option(..., help="The version it installs."),
) -> None:
    """Store FILE content-addressed, sign it with the release key, publish its record."""
    from infra.release_key import open_artifact_store
    from streams.ota.artifacts import ArtifactError

    settings = _settings()
    try:
        store = open_artifact_store(
            settings.state_dir / "artifacts", settings.pki_dir, passphrase=key_passphrase(settings)
        )
        artifact = store.add(file, kind, version)
    except (ArtifactError, ValueError) as exc:
        raise _fail(exc) from exc
    _hot_client().put_artifact(artifact)
    record = artifact.to_record()
    record["signature"] = artifact.signature.hex()
    sys.stdout.write(json.dumps(record) + "\n")


def _ota_answer(audit_decision: str, payload: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    if audit_decision == "denied":
        raise typer.Exit(code=EXIT_DENIED)
    if audit_decision == "refused":
        raise typer.Exit(code=EXIT_REFUSED)


@ota_app.command("create")
def ota_create(
    artifact: str = typer.Option(..., help="Artifact id (its sha256)."),
    target: str = typer.Option(..., help="org/<o>/project/<p>, optionally followed by /group/<g>."),
    rollout_id: str = typer.Option(None, "--id", help="Rollout id (default: generated)."),
    canary: int = typer.Option(5, min=1, help="Canary cohort size."),
    percentages: str = typer.Option("1,10,100", help="Cumulative cohort shares, in %."),
    success: float = typer.Option(0.95, help="Success threshold of a cohort (0-1)."),
    error: float = typer.Option(0.05, help="Error threshold: past it, roll back (0-1)."),
    window: float = typer.Option(300.0, help="Health window per cohort, seconds."),
    principal: str = typer.Option("orchestrator", "--as", help="Who creates it."),
) -> None:
    """Create a rollout (pending approval: nothing is sent before an ota-approver approves)."""

    from infra.api.client import HotPathError
    from streams.ota.plan import RolloutPlan
    from streams.registry.rbac import Principal

    try:
        plan = RolloutPlan(
            canary_size=canary,
            percentages=tuple(float(p) for p in percentages.split(",")),
            success_threshold=success,
            error_threshold=error,
            health_window_s=window,
        )
        who = Principal.parse(principal)
        rid = rollout_id or f"rollout-{uuid.uuid4().hex[:10]}"
        audit = _hot_client().ota_request(
            rid, "create", who, artifact_id=artifact, target=target, plan=plan.to_record()
        )
    except (ValueError, HotPathError) as exc:
        raise _fail(exc) from exc
    _ota_answer(audit.decision, {"rollout_id": rid, **audit.to_record()})


def _ota_control(rollout_id: str, kind: str, principal: str, comment: str | None) -> None:

    from infra.api.client import HotPathError
    from streams.registry.rbac import Principal

    try:
        audit = _hot_client().ota_request(
            rollout_id, kind, Principal.parse(principal), comment=comment
        )
    except (ValueError, HotPathError) as exc:
        raise _fail(exc) from exc
    _ota_answer(audit.decision, {"rollout_id": rollout_id, **audit.to_record()})


@ota_app.command("approve")
def ota_approve(
    rollout_id: str = typer.Argument(...),
    principal: str = typer.Option(..., "--as", help="An ota-approver of the target's project."),
    comment: str = typer.Option(None, help="Why."),
) -> None:
    """Approve a rollout: needs ota.approve (role ota-approver) on its target."""
    _ota_control(rollout_id, "approve", principal, comment)


@ota_app.command("reject")
def ota_reject(
    rollout_id: str = typer.Argument(...),
    principal: str = typer.Option(..., "--as"),
    comment: str = typer.Option(None, help="Why."),
) -> None:
    """Reject a rollout (ota.approve)."""
    _ota_control(rollout_id, "reject", principal, comment)


@ota_app.command("pause")
def ota_pause(
    rollout_id: str = typer.Argument(...), principal: str = typer.Option("orchestrator", "--as")
) -> None:
    """Stop sending commands (ota.control)."""
    _ota_control(rollout_id, "pause", principal, None)


@ota_app.command("resume")
def ota_resume(
    rollout_id: str = typer.Argument(...), principal: str = typer.Option("orchestrator", "--as")
) -> None:
    """Resume a paused rollout (ota.control)."""
    _ota_control(rollout_id, "resume", principal, None)


@ota_app.command("abort")
def ota_abort(
    rollout_id: str = typer.Argument(...),
    principal: str = typer.Option("orchestrator", "--as"),
    reason: str = typer.Option(None, help="Why."),
) -> None:
    """End a rollout; nothing more is sent (ota.control)."""
    _ota_control(rollout_id, "abort", principal, reason)


@ota_app.command("status")
def ota_status(
    rollout_id: str = typer.Argument(None, help="One rollout (default: all)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Rollouts: state, cohort, updated / failed / rolled back devices."""
    from streams.ota.summary import rollout_summary

    rollouts = _hot_client().rollouts()
    chosen = [rollouts[rollout_id]] if rollout_id in rollouts else list(rollouts.values())
    if rollout_id is not None and rollout_id not in rollouts:
        raise _fail(ValueError(f"no rollout {rollout_id!r}"))
    summaries = [rollout_summary(r) for r in chosen]
    if as_json:
        sys.stdout.write(json.dumps(summaries) + "\n")
        return
    table = Table(title="rollouts")
    columns = ("rollout_id", "state", "version", "target", "cohort", "updated", "failed")
    for column in (*columns, "rolled_back"):
        table.add_column(column)
    for summary in summaries:
        table.add_row(*(str(summary[c]) for c in (*columns, "rolled_back")))
    console.print(table)


# --- fleet jobs: data engineers' Faust jobs (streams/jobs/, infra/jobs.py) ----------------------

jobs_app = typer.Typer(help="Data engineers' stream jobs: Faust agents on the platform's topics.")
app.add_typer(jobs_app, name="jobs")


@jobs_app.command("run")
def jobs_run(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="The job's .py file."),
    web_port: int = typer.Option(None, help="Serve the worker's Faust web view on this port."),
    loglevel: str = typer.Option("info", help="Faust log level."),
) -> None:
    """Run FILE.py as a Faust worker in the foreground (consumer group: the file's name)."""
    from infra.jobs import run_job

    try:
        run_job(_settings(), file, web_port, loglevel)
    except ValueError as exc:
        raise _fail(exc) from exc


@jobs_app.command("new")
def jobs_new(
    name: str = typer.Argument(..., help="The job's name (a module name: lower_case)."),
    directory: Path = typer.Option(Path("."), "--dir", help="Where the files go."),
) -> None:
    """Write NAME.py (a starting job) and test_NAME.py (its unit test)."""
    from infra.jobs import scaffold

    try:
        job, test = scaffold(directory, name)
    except (ValueError, FileExistsError) as exc:
        raise _fail(exc) from exc
    console.print(f"wrote {job} and {test}; run it with: fleet jobs run {job}")


@jobs_app.command("list")
def jobs_list(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Jobs that ran on this stack, with state and consumer lag."""
    from infra.jobs import list_jobs

    jobs = list_jobs(_settings())
    if as_json:
        sys.stdout.write(json.dumps([job.__dict__ for job in jobs]) + "\n")
        return
    table = Table(title="jobs")
    for column in ("name", "state", "lag", "file"):
        table.add_column(column)
    for job in jobs:
        table.add_row(job.name, job.state, "?" if job.lag is None else str(job.lag), job.file)
    console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
