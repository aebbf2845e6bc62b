"""`fleet`: the operator's command line, one module per command group, wired here.

The order below is the order of `fleet --help`.
"""

from __future__ import annotations

import typer

from infra.cli import access, alerts, dashboard, demo, devices, jobs, ota, sql, stack, twin

app = typer.Typer(help="fleetstream: IoT fleet telemetry on Kafka.", no_args_is_help=True)

for command in (
    stack.up,
    stack.down,
    stack.status,
    stack.bridge,
    devices.provision,
    demo.simulate,
    sql.sql,
    demo.demo,
    access.token,
    access.grant,
    dashboard.dashboard,
):
    app.command()(command)

app.add_typer(twin.app, name="twin")
app.add_typer(alerts.app, name="alerts")
app.add_typer(devices.app, name="device")
app.add_typer(ota.app, name="ota")
app.add_typer(jobs.app, name="jobs")


def main() -> None:
    app()
