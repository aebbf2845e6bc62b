"""`fleet quality`: the quarantine (status), releasing rows from it, the great-expectations
report."""

from __future__ import annotations

import json
import sys

import typer

from infra.cli.common import cli_settings, console, fail

app = typer.Typer(help="The data-quality gate: quarantine, release, report.", no_args_is_help=True)


@app.command()
def status(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Rows held in quarantine, per rule."""
    from infra.quality import pending_by_rule
    from queries.runner import QueryError

    try:
        counts = pending_by_rule(cli_settings())
    except QueryError as exc:
        raise fail(exc) from exc
    if as_json:
        sys.stdout.write(json.dumps(counts) + "\n")
        return
    for rule, rows in counts.items():
        console.print(f"{rule}: {rows}")
    console.print(f"in quarantine: {sum(counts.values())}")


@app.command()
def release(
    rule: str = typer.Option(None, "--rule", help="Only rows quarantined under this rule."),
    device: str = typer.Option(None, "--device", help="Only this device's rows."),
    principal: str = typer.Option(None, "--as", help="Who asks (user:<id>); default: you."),
    wait: float = typer.Option(60.0, min=0, help="Seconds to wait for the cold worker."),
) -> None:
    """Move quarantined rows into telemetry (all, or of a rule and/or device); idempotent."""
    from confluent_kafka import KafkaException

    from infra.quality import request_release

    try:
        outcome = request_release(cli_settings(), rule, device, principal, wait)
    except KafkaException as exc:
        raise fail(exc) from exc
    if outcome.moved is None:
        console.print(
            f"release {outcome.request_id} requested; the cold worker applies it when it runs"
        )
        raise typer.Exit(2)
    sys.stdout.write(
        json.dumps({"request_id": outcome.request_id, "released": outcome.moved}) + "\n"
    )


@app.command()
def report(
    minutes: int = typer.Option(60, min=1, help="Validate the telemetry stored this recently."),
    rows: int = typer.Option(100_000, min=1, help="At most this many rows (the newest)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Validate recent telemetry with great-expectations; write the Data Docs (HTML)."""
    from infra.quality import quality_report
    from queries.runner import QueryError

    with console.status("validating with great-expectations…"):
        try:
            summary = quality_report(cli_settings(), minutes, rows)
        except QueryError as exc:
            raise fail(exc) from exc
    if as_json:
        sys.stdout.write(json.dumps(summary.to_json()) + "\n")
        return
    verdict = "passed" if summary.success else "FAILED"
    console.print(
        f"{summary.rows} rows, {summary.successful}/{summary.evaluated} expectations met: {verdict}"
    )
    for item in summary.expectations:
        mark = "ok " if item["success"] else "BAD"
        console.print(
            f"  {mark} {item['expectation']} {item['column']} ({item['rule']}): "
            f"{item['unexpected']} unexpected"
        )
    console.print(f"report: {summary.report}")
