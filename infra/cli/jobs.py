"""`fleet jobs`: data engineers' Faust jobs (streams/jobs/, infra/jobs.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.table import Table

from infra.cli.common import cli_settings, console, fail

app = typer.Typer(help="Data engineers' stream jobs: Faust agents on the platform's topics.")


@app.command("run")
def jobs_run(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="The job's .py file."),
    web_port: int = typer.Option(None, help="Serve the worker's Faust web view on this port."),
    loglevel: str = typer.Option("info", help="Faust log level."),
) -> None:
    """Run FILE.py as a Faust worker in the foreground (consumer group: the file's name)."""
    from infra.jobs import run_job

    try:
        run_job(cli_settings(), file, web_port, loglevel)
    except ValueError as exc:
        raise fail(exc) from exc


@app.command("new")
def jobs_new(
    name: str = typer.Argument(..., help="The job's name (a module name: lower_case)."),
    directory: Path = typer.Option(Path("."), "--dir", help="Where the files go."),
) -> None:
    """Write NAME.py (a starting job) and test_NAME.py (its unit test)."""
    from infra.jobs import scaffold

    try:
        job, test = scaffold(directory, name)
    except (ValueError, FileExistsError) as exc:
        raise fail(exc) from exc
    console.print(f"wrote {job} and {test}; run it with: fleet jobs run {job}")


@app.command("list")
def jobs_list(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Jobs that ran on this stack, with state and consumer lag."""
    from infra.jobs import list_jobs

    jobs = list_jobs(cli_settings())
    if as_json:
        sys.stdout.write(json.dumps([job.__dict__ for job in jobs]) + "\n")
        return
    table = Table(title="jobs")
    for column in ("name", "state", "lag", "file"):
        table.add_column(column)
    for job in jobs:
        table.add_row(job.name, job.state, "?" if job.lag is None else str(job.lag), job.file)
    console.print(table)
