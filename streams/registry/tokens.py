"""Bearer tokens signed by the platform: how users and services authenticate to the API.

A token is a JWT signed with the platform's Ed25519 key (``EdDSA``), kept in
``<directory>/token-signing.key`` (mode 0600, created on first use); the composition root
names the directory (``<pki dir>/api``: :func:`infra.keys.token_authority`). Its claims:

- ``sub``: the principal, ``user:<id>`` or ``service:<id>`` (:meth:`Principal.parse`); only
  users and services hold tokens: devices authenticate with their certificate, and the
  orchestrator is the platform itself;
- ``iss``: ``fleetstream``; ``iat`` and ``exp`` (seconds since the epoch); ``jti``: a random id.

:meth:`TokenAuthority.verify` checks the signature (EdDSA only: no algorithm confusion), the
expiry, the issuer and the principal, and returns the :class:`Principal`; anything else raises
:class:`TokenError` with a reason fit for a 401 answer. A token says who the caller is, never
what it may do: that is :func:`streams.registry.rbac.authorize` on the grants of the moment.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from streams.registry.rbac import Principal, PrincipalKind
from streams.runtime.files import create_once

__all__ = [
    "ALGORITHM",
    "DEFAULT_TTL_S",
    "ISSUER",
    "KEY_FILE",
    "MAX_TTL_S",
    "TOKEN_PRINCIPALS",
    "TokenAuthority",
    "TokenError",
]

ISSUER = "fleetstream"
ALGORITHM = "EdDSA"
KEY_FILE = "token-signing.key"
DEFAULT_TTL_S = 3600
MAX_TTL_S = 30 * 24 * 3600
LEEWAY_S = 30.0  # clock skew tolerated on exp and iat
TOKEN_PRINCIPALS = frozenset({PrincipalKind.user, PrincipalKind.service})
_REQUIRED = ["sub", "iat", "exp", "iss"]


class TokenError(ValueError):
    """A token that does not authenticate anyone; the message says why (for a 401)."""


def _check_holder(principal: Principal) -> None:
    if principal.kind not in TOKEN_PRINCIPALS:
        raise TokenError(f"{principal.kind} principals cannot hold tokens: users and services only")


def _load_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), None)
    if not isinstance(key, Ed25519PrivateKey):
        raise TokenError(f"{path}: expected an Ed25519 private key")
    return key


def _create_key(path: Path) -> Ed25519PrivateKey:
    """A new key at ``path``, unless another process made one first (then that one)."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    if not create_once(path, pem, 0o600):  # exclusive: never replaces a key in use
        return _load_key(path)
    return key


class TokenAuthority:
    """Issues and verifies the platform's bearer tokens with one Ed25519 key."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self._public = key.public_key()
        raw = self._public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.key_id = hashlib.sha256(raw).hexdigest()[:16]

    @classmethod
    def load_or_create(cls, directory: Path) -> TokenAuthority:
        """The key in ``directory`` (see :data:`KEY_FILE`), made on first use (idempotent)."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = directory / KEY_FILE
        return cls(_load_key(path) if path.exists() else _create_key(path))

    def issue(
        self, principal: Principal, ttl_s: int = DEFAULT_TTL_S, now: float | None = None
    ) -> str:
        """A token for ``principal`` valid ``ttl_s`` seconds from ``now`` (default: now)."""
        _check_holder(principal)
        if not 1 <= ttl_s <= MAX_TTL_S:
            raise TokenError(f"a token lives 1 to {MAX_TTL_S} seconds, not {ttl_s}")
        issued = int(time.time() if now is None else now)
        claims = {
            "sub": str(principal),
            "iss": ISSUER,
            "iat": issued,
            "exp": issued + ttl_s,
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, self._key, algorithm=ALGORITHM, headers={"kid": self.key_id})

    def claims(self, token: str) -> dict[str, Any]:
        """The verified claims of ``token``; raises TokenError."""
        if not isinstance(token, str) or not token:
            raise TokenError("empty token")
        try:
            return jwt.decode(
                token,
                self._public,
                algorithms=[ALGORITHM],
                issuer=ISSUER,
                leeway=LEEWAY_S,
                options={"require": _REQUIRED},
            )
        except jwt.ExpiredSignatureError:
            raise TokenError("token expired") from None
        except jwt.InvalidIssuerError:
            raise TokenError(f"token not issued by {ISSUER}") from None
        except jwt.InvalidSignatureError:
            raise TokenError("token signature does not verify") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenError(f"token lacks the {exc.claim!r} claim") from None
        except jwt.InvalidTokenError as exc:
            raise TokenError(f"invalid token: {exc}") from None

    def verify(self, token: str) -> Principal:
        """The principal ``token`` authenticates; raises TokenError."""
        subject = self.claims(token).get("sub")
        if not isinstance(subject, str):
            raise TokenError("token subject is not a principal")
        try:
            principal = Principal.parse(subject)
        except ValueError as exc:
            raise TokenError(f"token subject: {exc}") from None
        _check_holder(principal)
        return principal
