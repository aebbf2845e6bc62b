"""`fleet dashboard`: where the running stack's dashboard (and Prometheus, when it runs) is,
and how to sign in to it."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request

import typer

from infra.cli.common import cli_settings, console, fail

# The services whose web pages `fleet dashboard` lists besides the dashboard, when the stack
# runs them (by their name in `fleet status`).
WEB_SERVICES = ("prometheus",)


def _check(url: str, token: str) -> str | None:
    """Why ``token`` cannot read the dashboard's data (None: it can)."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
            response.read()
            return None
    except urllib.error.HTTPError as exc:
        try:
            return str(json.load(exc).get("reason", exc.reason))
        except ValueError:
            return str(exc.reason)
    except (urllib.error.URLError, OSError) as exc:
        return f"the API does not answer: {exc}"


def dashboard(
    as_principal: str = typer.Option(
        None,
        "--as",
        help="Also print a sign-in link for this user:<id> or service:<id> (a token, 1 h, in "
        "the link's #fragment: the browser keeps it, no server or log sees the address part).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """The fleet dashboard's address (served by the API) and the other web pages of the stack."""
    from infra.keys import token_authority
    from infra.stack import Stack
    from streams.registry.rbac import Principal

    settings = cli_settings()
    base = f"http://{settings.host}:{settings.api_port}"
    pages = {"dashboard": f"{base}/dashboard"}
    for service in Stack(settings).services:
        if service.name in WEB_SERVICES:
            status = service.status()
            if status.state == "up":
                pages[service.name] = f"http://{status.host}:{status.port}"
    if as_json:
        sys.stdout.write(json.dumps(pages) + "\n")
    else:
        for name, url in pages.items():
            console.print(f"{name}: {url}", highlight=False, soft_wrap=True)
    if as_principal is None:
        if not as_json:
            console.print(
                "sign in with a token of a user who may read telemetry of every organization: "
                "`fleet token --principal user:<id>` (grant it with `fleet grant`), or "
                "`fleet dashboard --as user:<id>` for a sign-in link",
                highlight=False,
            )
        return
    try:
        token = token_authority(settings).issue(Principal.parse(as_principal), 3600)
    except ValueError as exc:
        raise fail(exc) from exc
    refused = _check(f"{base}/dashboard/data", token)
    if refused is not None:
        raise fail(ValueError(f"{as_principal} cannot read the dashboard: {refused}"))
    sys.stdout.write(f"sign-in link for {as_principal} (1 h): {base}/dashboard#token={token}\n")
