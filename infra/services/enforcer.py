"""The broker enforcer (ingest/enforcement.py) as a service of `fleet up`
(`python -m infra.entrypoints.enforcer`).

One instance per broker: it writes the CA's CRL from the registry, reloads Mosquitto and ends
the sessions of suspended and revoked devices.
"""

from __future__ import annotations

from collections.abc import Sequence

from infra.services.platform import PlatformProcess
from infra.settings import Settings


class EnforcerService(PlatformProcess):
    def __init__(self, settings: Settings) -> None:
        # Shown at the broker address it acts on; it listens on no port of its own.
        super().__init__("enforcer", settings, settings.mqtt_port, "infra.entrypoints.enforcer")

    def bound_ports(self) -> Sequence[int]:
        return ()

    def ready(self) -> bool:
        return self.reported_by_me() and bool(self.counters().get("ready"))
