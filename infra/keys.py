"""The passphrase that encrypts the platform's signing keys at rest: the fleet CA's
(infra/pki.py) and the OTA release key (infra/release_key.py). Callers pass
``passphrase=key_passphrase(settings)`` to ``CertificateAuthority.load_or_create`` and to
``load_or_create_release_key``/``open_artifact_store``.

The passphrase is ``Settings.key_passphrase`` (``FLEET_KEY_PASSPHRASE``). Unset, as on a
developer's machine or in the tests, it is a random passphrase kept per user in
``$XDG_CONFIG_HOME/fleetstream/key-passphrase`` (default ``~/.config``), created 0600 on first
use, and a warning says so. Why there: a passphrase beside the keys would be read or copied
with them (a tarball of the state folder, a file read through the SQL port), and one derived
from the environment (host name, user id) can be derived again by whoever reads the keys. A
file outside the checkout, readable by its owner only, keeps a copy of ``.state`` useless on
its own while ``make demo`` and ``make test`` need no step on a fresh machine. Deleting that
file makes the existing state's keys unreadable (the error says so): keep it, or set
FLEET_KEY_PASSPHRASE.

The API's token-signing key (:mod:`streams.registry.tokens`) lives in ``<pki dir>/api``
(:func:`token_dir`); :func:`token_authority` opens it (or makes it) for the settings.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from infra.settings import Settings
from streams.runtime.files import create_once

if TYPE_CHECKING:  # imported when used: the CLI imports this module at start
    from streams.registry.tokens import TokenAuthority

__all__ = [
    "MIN_PASSPHRASE_BYTES",
    "KeyPassphraseError",
    "default_passphrase_file",
    "key_passphrase",
    "token_authority",
    "token_dir",
]

_LOG = logging.getLogger(__name__)
_PASSPHRASE_BYTES = 32  # of randomness, as URL-safe text
MIN_PASSPHRASE_BYTES = 8


class KeyPassphraseError(ValueError):
    """The default passphrase file is unusable (unsafe permissions, unreadable, empty)."""


def default_passphrase_file() -> Path:
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "fleetstream" / "key-passphrase"


def _create_passphrase_file(path: Path) -> None:
    """Write a fresh random passphrase to ``path`` (0600) unless it exists; a temp file linked
    into place, so processes starting at once all end up with the same one."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # created once: when another process made it first, its passphrase is kept
    create_once(path, (secrets.token_urlsafe(_PASSPHRASE_BYTES) + "\n").encode("ascii"), 0o600)


def _read_passphrase_file(path: Path) -> bytes:
    if not path.exists():
        _create_passphrase_file(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise KeyPassphraseError(
            f"{path} is readable by others (mode {mode:o}): chmod 600 it, or set "
            "FLEET_KEY_PASSPHRASE"
        )
    passphrase = path.read_bytes().strip()
    if not passphrase:
        raise KeyPassphraseError(f"{path} is empty: remove it or set FLEET_KEY_PASSPHRASE")
    return passphrase


def key_passphrase(settings: Settings) -> bytes:
    """The passphrase of the platform's signing keys (see the module doc). Never logged."""
    if settings.key_passphrase is not None:
        # Checked here, not by a pydantic constraint, whose error would echo the input.
        passphrase = settings.key_passphrase.get_secret_value().encode("utf-8")
        if len(passphrase) < MIN_PASSPHRASE_BYTES:
            raise KeyPassphraseError(
                f"FLEET_KEY_PASSPHRASE is shorter than {MIN_PASSPHRASE_BYTES} bytes"
            )
        return passphrase
    path = default_passphrase_file()
    _LOG.warning(
        "FLEET_KEY_PASSPHRASE is not set: the CA and release keys are encrypted with the "
        "per-user development passphrase in %s; set FLEET_KEY_PASSPHRASE in a deployment",
        path,
    )
    return _read_passphrase_file(path)


def token_dir(settings: Settings) -> Path:
    """Where the API's token-signing key lives: ``<pki dir>/api``."""
    return settings.pki_dir / "api"


def token_authority(settings: Settings) -> TokenAuthority:
    """The platform's bearer-token authority: the key in :func:`token_dir`, made on first use."""
    from streams.registry.tokens import TokenAuthority

    return TokenAuthority.load_or_create(token_dir(settings))
