"""`fleet sql`: an analyst query against the warehouse."""

from __future__ import annotations

import sys

import typer

from infra.cli.common import cli_settings, fail


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
    from infra.keys import token_authority
    from infra.warehouse import run_sql
    from queries.runner import QueryError
    from streams.registry.rbac import Principal

    params = dict(p.split("=", 1) for p in param if "=" in p)
    if fmt not in ("table", "json", "csv"):
        raise fail(ValueError(f"--format must be table, json or csv, not {fmt!r}"))
    settings = cli_settings()
    try:
        if principal and not token:
            token = token_authority(settings).issue(Principal.parse(principal), 300)
        sys.stdout.write(run_sql(settings, query, params, fmt, token) + "\n")  # type: ignore[arg-type]
    except (QueryError, ValueError) as exc:
        raise fail(exc) from exc
