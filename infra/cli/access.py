"""`fleet token` and `fleet grant`: who the caller is (a signed bearer token) and what a
principal may do (its grants), as the platform itself."""

from __future__ import annotations

import json
import sys

import typer

from infra.cli.common import cli_settings, fail


def token(
    principal: str = typer.Option(..., help="Who the token is for: user:<id> or service:<id>."),
    ttl: int = typer.Option(3600, min=1, help="Seconds the token stays valid."),
) -> None:
    """Print a bearer token for the HTTP API, signed with the platform's key (it says who the
    caller is; what it may do is its grants')."""
    from infra.keys import token_authority
    from streams.registry.rbac import Principal

    try:
        signed = token_authority(cli_settings()).issue(Principal.parse(principal), ttl)
    except ValueError as exc:
        raise fail(exc) from exc
    sys.stdout.write(signed + "\n")


def grant(
    principal: str = typer.Option(..., help="Who gets it: user:<id> or service:<id>."),
    role: str = typer.Option(..., help="viewer, operator, admin or ota-approver."),
    scope: str = typer.Option(
        ..., help="org/<o>, optionally followed by /project/<p>, /group/<g>, /device/<d>."
    ),
    remove: bool = typer.Option(False, "--remove", help="Take the grant away instead."),
) -> None:
    """Give (or take) a role on a scope, as the platform itself: how the first admin is made.
    Later grants go through the API, authorized and audited."""
    from infra.api.client import HotPathClient
    from streams.registry.rbac import Grant, GrantSet, Principal, Resource, Role

    try:
        who = Principal.parse(principal)
        wanted = Grant(who, Role(role), Resource.parse(scope))
    except ValueError as exc:
        raise fail(exc) from exc
    client = HotPathClient(cli_settings())
    current = client.grant_sets().get(who.key, GrantSet(who))
    updated = current.without_grant(wanted) if remove else current.with_grant(wanted)
    client.put_grants(updated)
    client.close()
    sys.stdout.write(json.dumps(updated.to_record()) + "\n")
