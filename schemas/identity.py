"""Identity naming rules shared by every layer: device ids and the platform's reserved MQTT
identities (certificate CN = MQTT username = client id, see infra/services/mosquitto.py).

The broker makes a connection's client id its certificate CN (`use_username_as_clientid`), so
one identity holds one connection at a time: every bridge replica has its own
(`bridge-<replica>`, as many as Settings.bridge_replicas allows), and an enforcer
(ingest/enforcement.py, allowed only to end device sessions through the broker's control API)
takes the first free of a few. Reserved: no device may ever be issued one.
"""

from __future__ import annotations

import re
from enum import StrEnum

__all__ = [
    "BRIDGE_IDENTITIES",
    "DEVICE_ID_PATTERN",
    "ENFORCER",
    "ENFORCER_IDENTITIES",
    "MAX_BRIDGE_REPLICAS",
    "ORCHESTRATOR",
    "RESERVED_IDENTITIES",
    "RevocationState",
    "bridge_identity",
]

ORCHESTRATOR = "orchestrator"
MAX_BRIDGE_REPLICAS = 8
BRIDGE_IDENTITIES = tuple(f"bridge-{replica}" for replica in range(MAX_BRIDGE_REPLICAS))
ENFORCER_IDENTITIES = ("enforcer", "enforcer-1", "enforcer-2", "enforcer-3")
ENFORCER = ENFORCER_IDENTITIES[0]
RESERVED_IDENTITIES = frozenset({ORCHESTRATOR, "broker", *ENFORCER_IDENTITIES, *BRIDGE_IDENTITIES})
# At most 64 characters: RFC 5280 caps commonName at 64 (ub-common-name) and cryptography
# refuses longer CNs. No '/', '+', '#' so an id is safe inside MQTT topics and file names.
DEVICE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def bridge_identity(replica: int) -> str:
    """The identity (certificate CN, hence MQTT client id) of bridge replica ``replica``."""
    if not 0 <= replica < len(BRIDGE_IDENTITIES):
        raise ValueError(f"bridge replica {replica} out of range 0..{len(BRIDGE_IDENTITIES) - 1}")
    return BRIDGE_IDENTITIES[replica]


class RevocationState(StrEnum):
    """How a listed certificate serial is refused: for good, or on hold until released."""

    revoked = "revoked"
    on_hold = "on_hold"
