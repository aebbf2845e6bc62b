"""Bearer tokens signed by the platform (streams/registry/tokens.py)."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from streams.registry.rbac import Principal
from streams.registry.tokens import ALGORITHM, ISSUER, KEY_FILE, TokenAuthority, TokenError


@pytest.fixture
def authority(tmp_path: Path) -> TokenAuthority:
    return TokenAuthority.load_or_create(tmp_path / "api")


def _signing_key(tmp_path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key((tmp_path / "api" / KEY_FILE).read_bytes(), None)
    assert isinstance(key, Ed25519PrivateKey)
    return key


def test_a_token_round_trips_to_its_principal(authority: TokenAuthority) -> None:
    for principal in (Principal.user("alice@example.com"), Principal.service("ci")):
        token = authority.issue(principal, ttl_s=60)
        assert authority.verify(token) == principal
    claims = authority.claims(authority.issue(Principal.user("alice")))
    assert claims["iss"] == ISSUER
    assert claims["sub"] == "user:alice"
    assert claims["exp"] - claims["iat"] == 3600
    assert jwt.get_unverified_header(authority.issue(Principal.user("a")))["alg"] == "EdDSA"


def test_the_key_is_made_once_private_and_reused(tmp_path: Path) -> None:
    first = TokenAuthority.load_or_create(tmp_path / "api")
    token = first.issue(Principal.user("alice"))
    path = tmp_path / "api" / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "api").stat().st_mode) == 0o700
    second = TokenAuthority.load_or_create(tmp_path / "api")
    assert second.key_id == first.key_id
    assert second.verify(token) == Principal.user("alice")


def test_an_expired_token_is_refused(authority: TokenAuthority) -> None:
    token = authority.issue(Principal.user("alice"), ttl_s=60, now=time.time() - 3600)
    with pytest.raises(TokenError, match="expired"):
        authority.verify(token)


def test_a_tampered_token_is_refused(authority: TokenAuthority) -> None:
    token = authority.issue(Principal.user("alice"))
    header, payload, signature = token.split(".")
    forged = jwt.utils.base64url_encode(
        jwt.utils.base64url_decode(payload).replace(b"user:alice", b"user:admin")
    ).decode()
    with pytest.raises(TokenError, match="signature"):
        authority.verify(f"{header}.{forged}.{signature}")
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    with pytest.raises(TokenError):
        authority.verify(f"{header}.{payload}.{flipped}")
    with pytest.raises(TokenError):
        authority.verify("not-a-token")
    with pytest.raises(TokenError, match="empty"):
        authority.verify("")


def test_a_token_of_another_key_is_refused(authority: TokenAuthority, tmp_path: Path) -> None:
    other = TokenAuthority.load_or_create(tmp_path / "other")
    with pytest.raises(TokenError, match="signature"):
        authority.verify(other.issue(Principal.user("alice")))


def test_only_eddsa_is_accepted(authority: TokenAuthority) -> None:
    now = int(time.time())
    claims = {"sub": "user:alice", "iss": ISSUER, "iat": now, "exp": now + 60}
    hs256 = jwt.encode(claims, "a-guessable-secret-of-32-bytes!!", algorithm="HS256")
    with pytest.raises(TokenError):
        authority.verify(hs256)
    unsigned = jwt.encode(claims, None, algorithm="none")
    with pytest.raises(TokenError):
        authority.verify(unsigned)


def test_a_wrong_issuer_is_refused(authority: TokenAuthority, tmp_path: Path) -> None:
    now = int(time.time())
    key = _signing_key(tmp_path)
    token = jwt.encode(
        {"sub": "user:alice", "iss": "someone-else", "iat": now, "exp": now + 60},
        key,
        algorithm=ALGORITHM,
    )
    with pytest.raises(TokenError, match="issued"):
        authority.verify(token)
    no_issuer = jwt.encode({"sub": "user:alice", "iat": now, "exp": now + 60}, key, ALGORITHM)
    with pytest.raises(TokenError, match="iss"):
        authority.verify(no_issuer)
    no_expiry = jwt.encode({"sub": "user:alice", "iss": ISSUER, "iat": now}, key, ALGORITHM)
    with pytest.raises(TokenError, match="exp"):
        authority.verify(no_expiry)


def test_device_and_orchestrator_principals_hold_no_tokens(
    authority: TokenAuthority, tmp_path: Path
) -> None:
    for principal in (Principal.device("d-1"), Principal.orchestrator()):
        with pytest.raises(TokenError, match="users and services"):
            authority.issue(principal)
    # Even signed with the platform's key, such a token authenticates no one.
    now = int(time.time())
    key = _signing_key(tmp_path)
    for subject in ("device:d-1", "orchestrator"):
        token = jwt.encode(
            {"sub": subject, "iss": ISSUER, "iat": now, "exp": now + 60}, key, ALGORITHM
        )
        with pytest.raises(TokenError, match="users and services"):
            authority.verify(token)
    bad = jwt.encode({"sub": "nobody", "iss": ISSUER, "iat": now, "exp": now + 60}, key, ALGORITHM)
    with pytest.raises(TokenError, match="subject"):
        authority.verify(bad)


def test_a_lifetime_out_of_bounds_is_refused(authority: TokenAuthority) -> None:
    with pytest.raises(TokenError):
        authority.issue(Principal.user("alice"), ttl_s=0)
    with pytest.raises(TokenError):
        authority.issue(Principal.user("alice"), ttl_s=10**9)
