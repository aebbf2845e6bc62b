"""What a platform MQTT client needs: its identity's files, a TLS context, an exclusive claim.

Platform identities (schemas/identity.py) are issued by `fleet up` into the PKI folder, one
subfolder per identity (``<pki>/<name>/<name>.crt`` and ``.key``), beside the fleet's
``ca.crt``. The broker's own files (config, ACL, server certificate) are the composition
root's (``BrokerFiles`` in infra/services/mosquitto.py).
"""

from __future__ import annotations

import asyncio
import fcntl
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

__all__ = [
    "DYNSEC_RESPONSE_TOPIC",
    "DYNSEC_TOPIC",
    "IdentityClaim",
    "IdentityFiles",
    "claim_identity",
    "client_tls_context",
    "coalesce_reads",
]

# The dynamic-security plugin's control API (Mosquitto 2.0): commands in, responses out. Only
# the enforcer identities may use it (the broker's ACL, infra/services/mosquitto.py).
DYNSEC_TOPIC = "$CONTROL/dynamic-security/v1"
DYNSEC_RESPONSE_TOPIC = f"{DYNSEC_TOPIC}/response"


@dataclass(frozen=True)
class IdentityFiles:
    """Where the platform identities' certificates and keys live (the PKI folder)."""

    pki_dir: Path

    @property
    def ca_cert(self) -> Path:
        return self.pki_dir / "ca.crt"

    def identity_cert(self, name: str) -> Path:
        """The certificate of platform identity ``name``."""
        return self.pki_dir / name / f"{name}.crt"

    def identity_key(self, name: str) -> Path:
        return self.pki_dir / name / f"{name}.key"

    def identity_lock(self, name: str) -> Path:
        return self.pki_dir / name / f"{name}.lock"


def client_tls_context(ca_cert: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """TLS context of an MQTT client holding a fleet certificate."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_cert))
    context.load_cert_chain(str(cert), str(key))
    return context


def coalesce_reads(client: Any, window_s: float) -> None:
    """Let the connection of gmqtt ``client`` read its socket at most once per ``window_s``.

    Mosquitto writes each message as it comes, so a subscriber reading on every arrival wakes,
    reads TLS and runs gmqtt's read loop once per message. Pausing the transport between reads
    lets a window's messages arrive as one read: at 3,000 msgs/s the bridge spent about a fifth
    less CPU per message with a 10 ms window (README, CPU ledger). A message waits at most the
    window; one arriving after a quiet spell is read at once, and a read that fills its buffer
    is followed by the next at once (large messages or a backlog). Call it on every connect (a
    reconnect makes a new protocol). Pinned to gmqtt 0.8's internals: its protocol's read loop
    calls ``self.read`` for every chunk.
    """
    connection = getattr(client, "_connection", None)
    if window_s <= 0 or connection is None:
        return
    protocol = connection._protocol
    transport = connection._transport
    read = protocol.read
    loop = asyncio.get_running_loop()
    last_read = -window_s
    more_waiting = False  # the last read filled its buffer: read on without a pause

    async def coalesced_read(n: int = -1) -> bytes:
        nonlocal last_read, more_waiting
        wait = last_read + window_s - loop.time()
        if wait > 0 and not more_waiting and not transport.is_closing():
            transport.pause_reading()
            try:
                await asyncio.sleep(wait)
            finally:
                if not transport.is_closing():
                    transport.resume_reading()
        data: bytes = await read(n)
        last_read = loop.time()
        more_waiting = 0 < n <= len(data)
        return data

    protocol.read = coalesced_read


@dataclass
class IdentityClaim:
    """A platform identity this process holds (an exclusive lock) until :meth:`release`."""

    name: str
    _lock: IO[str]

    def release(self) -> None:
        self._lock.close()  # closing the file drops the lock


def claim_identity(files: IdentityFiles, names: Sequence[str]) -> IdentityClaim | None:
    """The first of ``names`` that no other live holder has claimed, or None if all are taken.

    With the client id bound to the identity, two connections of one identity take each other
    over; an exclusive `flock` per identity keeps concurrent holders apart (enforcers: the
    service and, in tests, one more). The kernel drops the lock when its holder dies.
    """
    for name in names:
        path = files.identity_lock(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = path.open("a")
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        except OSError:
            lock.close()
            raise
        return IdentityClaim(name, lock)
    return None
