"""`fleet simulate` (a simulated fleet on the running stack) and `fleet demo` (the whole
pipeline against one, summarized with SQL)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from infra.cli.common import cli_settings, console, fail
from infra.keys import key_passphrase
from infra.pki import KeyKind
from infra.services.base import ServiceError


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
    from infra.simulator.fleet import run_fleet

    settings = cli_settings()
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


def demo(
    devices: int = typer.Option(500, min=1, help="Simulated devices."),
    duration: float = typer.Option(60.0, min=1, help="Seconds of publishing."),
    rate: float = typer.Option(1.0, min=0.01, help="Telemetry messages per second per device."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON summary as the last line."),
    ota: bool = typer.Option(False, "--ota", help="Also roll out new firmware to the fleet."),
    ota_fail_rate: float = typer.Option(
        0.0, min=0.0, max=1.0, help="Share of devices whose install fails (--ota)."
    ),
    report: Path | None = typer.Option(
        None,
        "--report",
        help="Also write a self-contained HTML report of the run (charts included) to this file.",
        dir_okay=False,
    ),
) -> None:
    """The whole pipeline against a simulated fleet; the summary is counted with SQL."""
    from infra.demo import DemoPlan, run_demo

    plan = DemoPlan(
        devices, duration, rate, ota=ota or ota_fail_rate > 0, ota_fail_rate=ota_fail_rate
    )
    settings = cli_settings()
    try:
        summary = run_demo(settings, plan, console)
    except ServiceError as exc:
        raise fail(exc) from exc
    if report is not None:
        from infra.api.dashboard.report import write_report

        written = write_report(settings, summary, report)
        console.print(f"report: {written.resolve()}")  # before the JSON line, which stays last
    if as_json:
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        console.print_json(json.dumps(summary))
