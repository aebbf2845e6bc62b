"""What every command group of `fleet` shares: the consoles, the settings, failing, the clients."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.table import Table

from infra.settings import Settings, load_settings

if TYPE_CHECKING:
    from infra.api.client import HotPathClient

console = Console()
err_console = Console(stderr=True)

# Requests judged by an agent (`fleet ota`, `fleet device`): 0 applied or unchanged, 6 denied
# (HTTP 403), 7 refused (HTTP 409).
EXIT_DENIED, EXIT_REFUSED = 6, 7


def print_records(
    title: str, columns: Sequence[str], records: Sequence[Mapping[str, Any]], as_json: bool
) -> None:
    """Records as one JSON line (``--json``) or as a table of ``columns``."""
    if as_json:
        sys.stdout.write(json.dumps(list(records)) + "\n")
        return
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for record in records:
        table.add_row(*(str(record[c]) for c in columns))
    console.print(table)


def cli_settings(brokers: int | None = None) -> Settings:
    loaded = load_settings()
    if brokers is not None and brokers != loaded.brokers:
        loaded = loaded.model_copy(update={"brokers": brokers})
    return loaded


def fail(exc: Exception) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {exc}")
    return typer.Exit(code=1)


def hot_client() -> HotPathClient:
    from infra.api.client import HotPathClient

    return HotPathClient(cli_settings())


def audit_answer(audit_decision: str, payload: dict[str, object]) -> None:
    """Print an agent's answer; exit 6 if it denied the request, 7 if it refused it."""
    sys.stdout.write(json.dumps(payload) + "\n")
    if audit_decision == "denied":
        raise typer.Exit(code=EXIT_DENIED)
    if audit_decision == "refused":
        raise typer.Exit(code=EXIT_REFUSED)
