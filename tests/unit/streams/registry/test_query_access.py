"""Who may use the SQL port (streams/registry/query_access.py): platform tokens and
telemetry.read grants."""

from __future__ import annotations

import time
from collections.abc import Mapping
from http import HTTPStatus
from pathlib import Path

import pytest

from sinks.query_server import AccessDenied
from sinks.row_filters import EVERY_ROW, ReadScope
from streams.registry.query_access import TokenAccess, may_read_telemetry, telemetry_scopes
from streams.registry.rbac import GrantSet, Principal, Resource, Role
from streams.registry.tokens import TokenAuthority

ALICE = Principal.user("alice")
BOB = Principal.user("bob")


@pytest.fixture
def tokens(tmp_path: Path) -> TokenAuthority:
    return TokenAuthority.load_or_create(tmp_path / "pki" / "api")


def grants() -> Mapping[str, GrantSet]:
    return {
        str(ALICE): GrantSet.of(ALICE, (Role.viewer, Resource("acme", "plant-1"))),
        str(BOB): GrantSet(BOB),  # a principal with an empty grant set
    }


def test_a_telemetry_read_grant_is_needed() -> None:
    assert may_read_telemetry(ALICE, grants())
    assert "viewer on org/acme/project/plant-1" in may_read_telemetry(ALICE, grants()).reason
    assert not may_read_telemetry(BOB, grants())
    assert not may_read_telemetry(Principal.service("nobody"), grants())
    assert may_read_telemetry(Principal.orchestrator(), {})


def test_the_authenticator_denies_by_default(tokens: TokenAuthority, tmp_path: Path) -> None:
    access = TokenAccess(tokens, grants, platform_secret="s" * 43)
    assert access.authenticate(tokens.issue(ALICE)).principal == "user:alice"
    assert access.authenticate("s" * 43).principal == "orchestrator"
    stranger = TokenAuthority.load_or_create(tmp_path / "elsewhere")
    expired = tokens.issue(ALICE, ttl_s=60, now=time.time() - 3600)
    for bad in (None, "", "garbage", "s" * 42, stranger.issue(ALICE), expired):
        with pytest.raises(AccessDenied) as denied:
            access.authenticate(bad)
        assert denied.value.status == HTTPStatus.UNAUTHORIZED
    with pytest.raises(AccessDenied) as denied:
        access.authenticate(tokens.issue(BOB))
    assert denied.value.status == HTTPStatus.FORBIDDEN
    assert denied.value.principal == "user:bob"
    assert "telemetry.read" in denied.value.reason


def test_no_platform_secret_no_platform_access(tokens: TokenAuthority) -> None:
    with pytest.raises(AccessDenied):
        TokenAccess(tokens, grants, platform_secret=None).authenticate("anything")


def test_until_the_grants_are_read_token_holders_wait(tokens: TokenAuthority) -> None:
    access = TokenAccess(tokens, lambda: None)
    with pytest.raises(AccessDenied) as denied:
        access.authenticate(tokens.issue(ALICE))
    assert denied.value.status == HTTPStatus.SERVICE_UNAVAILABLE


def test_a_caller_reads_the_rows_of_its_granted_scopes_only(tokens: TokenAuthority) -> None:
    held = {
        str(ALICE): GrantSet.of(
            ALICE,
            (Role.viewer, Resource("acme", "plant-1")),
            (Role.viewer, Resource("globex", "p", "line-2")),
        ),
        str(BOB): GrantSet(BOB),
    }
    assert telemetry_scopes(ALICE, held) == (
        ("acme", "plant-1"),
        ("globex", "p", "line-2"),
    )
    assert telemetry_scopes(BOB, held) == ()
    access = TokenAccess(tokens, lambda: held, platform_secret="s" * 43)
    assert access.authenticate(tokens.issue(ALICE)).scope == ReadScope(
        (("acme", "plant-1"), ("globex", "p", "line-2"))
    )
    assert access.authenticate("s" * 43).scope == EVERY_ROW
