"""`fleet twin`: device twins (desired, reported, delta, version)."""

from __future__ import annotations

import json
import sys

import typer

from infra.cli.common import console, fail, hot_client

app = typer.Typer(help="Device twins: desired, reported, delta, version.")

# `fleet twin set` exit codes: 4 = version conflict (HTTP 409), 5 = invalid patch (HTTP 400).
EXIT_CONFLICT, EXIT_INVALID = 4, 5


@app.command("get")
def twin_get(
    device_id: str = typer.Argument(..., help="Device id."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON document only."),
) -> None:
    """A device's twin: {"desired", "reported", "delta", "version"} (all empty: no twin yet)."""
    from streams.hot.twin import Twin, twin_view

    twin = hot_client().twin(device_id) or Twin(device_id=device_id)
    text = json.dumps(twin_view(twin))
    if as_json:
        sys.stdout.write(text + "\n")
    else:
        console.print_json(text)


@app.command("set")
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
        raise fail(ValueError(f"the patch is not JSON: {exc}")) from exc
    if not isinstance(document, dict):
        raise fail(ValueError("the patch must be a JSON object"))
    try:
        answer = hot_client().set_desired(device_id, document, version)
    except HotPathError as exc:
        raise fail(exc) from exc
    sys.stdout.write(
        json.dumps({"status": answer.status, "version": answer.version, "detail": answer.detail})
        + "\n"
    )
    if answer.status == "conflict":
        raise typer.Exit(code=EXIT_CONFLICT)
    if answer.status == "invalid":
        raise typer.Exit(code=EXIT_INVALID)
