"""Running a simulated fleet in a thread while a test crashes or restarts something."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from infra.provision import DeviceCredentials
from infra.settings import Settings
from infra.simulator.device import SimulatedDevice
from infra.simulator.fleet import run_fleet
from infra.simulator.stats import FleetStats


@dataclass
class BackgroundFleet:
    thread: threading.Thread
    outcome: list[tuple[FleetStats, list[SimulatedDevice]]] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)

    def wait(self, timeout: float = 180) -> tuple[FleetStats, list[SimulatedDevice]]:
        self.thread.join(timeout=timeout)
        assert self.outcome, "the simulated fleet did not finish"
        return self.outcome[0]

    def stop(self, timeout: float = 180) -> tuple[FleetStats, list[SimulatedDevice]]:
        """End the publishing now (what was sent is still acked and saved), then wait."""
        self.stopping.set()
        return self.wait(timeout)


def start_fleet(
    settings: Settings, creds: Sequence[DeviceCredentials], **options: Any
) -> BackgroundFleet:
    fleet = BackgroundFleet(threading.Thread(target=lambda: None))

    def simulate() -> None:
        run = run_fleet(settings, creds, stop=fleet.stopping, **options)
        fleet.outcome.append(asyncio.run(run))

    fleet.thread = threading.Thread(target=simulate, name="simulated-fleet")
    fleet.thread.start()
    return fleet


def telemetry_sent(devices: Sequence[SimulatedDevice]) -> set[tuple[str, int]]:
    """Every (device id, seq) of telemetry the fleet handed to the broker."""
    return {(d.device_id, seq) for d in devices for kind, seq in d.sent if kind == "telemetry"}
