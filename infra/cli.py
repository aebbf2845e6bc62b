"""`fleet`: the operator's command line."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from infra.pki import KeyKind
from infra.services.base import ServiceError
from infra.settings import Settings, load_settings
from infra.stack import Stack, StackStatus

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
    for column in ("service", "state", "address", "pid", "version"):
        table.add_column(column)
    colours = {"up": "green", "starting": "yellow", "down": "red"}
    for s in status.services:
        table.add_row(
            s.name,
            f"[{colours.get(s.state, 'white')}]{s.state}[/]",
            f"{s.host}:{s.port}",
            str(s.pid or "-"),
            s.version or "-",
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
    from ingest.bridge import main as bridge_main

    bridge_main(replica)


@app.command()
def provision(
    org: str = typer.Option(..., help="Organization."),
    project: str = typer.Option(..., help="Project."),
    group: str = typer.Option(..., help="Device group."),
    count: int = typer.Option(1, min=1, help="How many devices."),
    out: Path = typer.Option(..., help="Where each device's key, certificate and ca.crt go."),
    key: str = typer.Option("rsa", help="Key type made on the device side: rsa or ec."),
) -> None:
    """Make device identities: key pair and CSR on the device side, certificate from the CA."""
    from infra.pki import CertificateAuthority, PkiError
    from infra.provision import provision_device

    settings = _settings()
    ca = CertificateAuthority.load_or_create(settings.pki_dir)
    kind: KeyKind = "ec" if key == "ec" else "rsa"
    manifest = []
    try:
        for _ in range(count):
            device_id = f"{group}-{uuid.uuid4().hex[:10]}"
            creds = provision_device(ca, device_id, out, kind)
            manifest.append(
                {
                    "device_id": device_id,
                    "org": org,
                    "project": project,
                    "group": group,
                    "serial": str(creds.serial),
                }
            )
            console.print(f"{device_id}: {creds.cert_path}")
    except PkiError as exc:
        raise _fail(exc) from exc
    (out / "devices.json").write_text(json.dumps(manifest, indent=2))


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
    ca = CertificateAuthority.load_or_create(settings.pki_dir)
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
) -> None:
    """Run an analyst query against the warehouse (through the pipeline while it runs)."""
    from queries.runner import QueryError, run_sql

    params = dict(p.split("=", 1) for p in param if "=" in p)
    if fmt not in ("table", "json", "csv"):
        raise _fail(ValueError(f"--format must be table, json or csv, not {fmt!r}"))
    try:
        sys.stdout.write(run_sql(_settings(), query, params, fmt) + "\n")  # type: ignore[arg-type]
    except QueryError as exc:
        raise _fail(exc) from exc


@app.command()
def demo(
    devices: int = typer.Option(500, min=1, help="Simulated devices."),
    duration: float = typer.Option(60.0, min=1, help="Seconds of publishing."),
    rate: float = typer.Option(1.0, min=0.01, help="Telemetry messages per second per device."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON summary as the last line."),
) -> None:
    """The whole pipeline against a simulated fleet; the summary is counted with SQL."""
    from infra.demo import DemoPlan, run_demo

    try:
        summary = run_demo(_settings(), DemoPlan(devices, duration, rate), console)
    except ServiceError as exc:
        raise _fail(exc) from exc
    if as_json:
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        console.print_json(json.dumps(summary))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
