"""`fleet up`, `down`, `status`: the services on this machine; `fleet bridge` in the foreground."""

from __future__ import annotations

import json
import sys

import typer
from rich.markup import escape
from rich.table import Table

from infra.cli.common import cli_settings, console, fail
from infra.services.base import ServiceError
from infra.stack import Stack, StackStatus


def _print_status(status: StackStatus) -> None:
    table = Table(title="services")
    for column in ("service", "state", "address", "metrics", "pid", "version", "restarts"):
        table.add_column(column)
    colours = {"up": "green", "starting": "yellow", "down": "red", "backoff": "red"}
    for s in status.services:
        table.add_row(
            s.name,
            f"[{colours.get(s.state, 'white')}]{s.state}[/]",
            f"{s.host}:{s.port}",
            str(s.metrics_port or "-"),
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
    prometheus = next((s for s in status.services if s.name == "prometheus"), None)
    if prometheus is not None and prometheus.state == "up":
        console.print(f"prometheus: http://{prometheus.host}:{prometheus.port}")
        if not status.alerts:
            console.print("alerts: [green]none firing[/]")
    for alert in status.alerts:
        colour = "red" if alert["state"] == "firing" else "yellow"
        labels = alert["labels"] if isinstance(alert["labels"], dict) else {}
        where = ", ".join(f"{k}={v}" for k, v in sorted(labels.items()))
        console.print(
            f"[{colour}]{alert['state']}[/] "
            + escape(f"{alert['name']} ({alert['severity']}): ")
            + escape(f"{alert['summary']} ({where})")
        )


def up(
    brokers: int = typer.Option(None, help="Kafka brokers (3 gives replication factor 3)."),
) -> None:
    """Start the services in the background; return when every one answers."""
    stack = Stack(cli_settings(brokers))
    try:
        with console.status("starting Kafka, schema registry, Mosquitto…"):
            status = stack.up()
    except ServiceError as exc:
        raise fail(exc) from exc
    _print_status(status)


def down() -> None:
    """Stop, by pid, exactly what `fleet up` started."""
    stopped = Stack(cli_settings()).down()
    console.print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")


def status(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Each service (state, address, pid, version) and Kafka's topics."""
    result = Stack(cli_settings()).status()
    if as_json:
        sys.stdout.write(json.dumps(result.to_dict()) + "\n")
    else:
        _print_status(result)
    if not result.all_up:
        raise typer.Exit(code=3)


def bridge(replica: int = typer.Option(0, help="Replica number: its MQTT client id.")) -> None:
    """Run the MQTT -> Kafka bridge in the foreground (`fleet up` runs it in the background)."""
    from infra.entrypoints.bridge import main as bridge_main

    bridge_main(replica)
