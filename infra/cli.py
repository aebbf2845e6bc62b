"""`fleet`: the operator's command line."""

from __future__ import annotations

import json
import sys

import typer
from rich.console import Console
from rich.table import Table

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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
