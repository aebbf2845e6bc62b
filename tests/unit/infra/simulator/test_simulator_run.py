"""A device's publishing loop ends at its deadline, its message cap, or when told to stop."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from infra.simulator.device import TELEMETRY, SimulatedDevice
from tests.unit.infra.simulator.test_simulator_ota import make_device


def _run(device: SimulatedDevice, stop: threading.Event, stop_after_s: float | None) -> float:
    async def scenario() -> float:
        if stop_after_s is not None:
            asyncio.get_running_loop().call_later(stop_after_s, stop.set)
        started = time.monotonic()
        await device.run(rate=200.0, until=started + 60.0, max_messages=None, stop=stop)
        return time.monotonic() - started

    return asyncio.run(scenario())


def test_a_stop_set_while_running_ends_the_publishing(tmp_path: Path) -> None:
    device = make_device(tmp_path, None, None)
    took = _run(device, threading.Event(), stop_after_s=0.1)
    assert took < 30.0  # the deadline was 60 s away
    assert device.seq[TELEMETRY] > 0
    assert device.stats.published == device.seq[TELEMETRY]


def test_a_stop_set_before_the_start_publishes_nothing(tmp_path: Path) -> None:
    device = make_device(tmp_path, None, None)
    stop = threading.Event()
    stop.set()
    _run(device, stop, stop_after_s=None)
    assert device.stats.published == 0
