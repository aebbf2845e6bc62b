"""The MQTT -> Kafka bridge (ingest/bridge.py) as a background service of `fleet up`."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from infra.services.base import Service
from infra.settings import Settings, settings_env


class BridgeService(Service):
    def __init__(self, settings: Settings, replica: int = 0) -> None:
        # Shown at the broker address it consumes from; it listens on no port of its own.
        super().__init__(f"bridge-{replica}", settings.host, settings.mqtt_port, settings.run_dir)
        self.settings = settings
        self.replica = replica

    def bound_ports(self) -> Sequence[int]:
        return ()

    def command(self) -> Sequence[str]:
        return [sys.executable, "-m", "ingest.bridge", str(self.replica)]

    def environment(self) -> Mapping[str, str]:
        return settings_env(self.settings)

    def counters(self) -> dict[str, Any]:
        """What the running bridge last reported (accepted, dead_lettered, redelivered, ...)."""
        try:
            data = json.loads((self.run_dir / f"{self.name}.json").read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def ready(self) -> bool:
        proc = self.process()
        counters = self.counters()
        return (
            proc is not None and counters.get("pid") == proc.pid and bool(counters.get("connected"))
        )

    def version(self) -> str | None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("fleetstream")
        except PackageNotFoundError:
            return None
