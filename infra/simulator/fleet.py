"""A simulated fleet: many devices in one asyncio process, connected, run and drained together."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from infra.provision import DeviceCredentials
from infra.settings import Settings
from infra.simulator.device import SimulatedDevice, load_seq, save_seq
from infra.simulator.ota import load_ota
from infra.simulator.stats import FleetStats
from infra.simulator.twin import load_twin, save_twin


async def run_fleet(
    settings: Settings,
    credentials: Sequence[DeviceCredentials],
    rate: float,
    duration: float,
    max_messages: int | None = None,
    drain_timeout: float = 60.0,
    seed: int = 7,
    connect_concurrency: int = 50,
    on_start: Callable[[FleetStats], None] | None = None,
    artifact_root: Path | None = None,
    release_public_key: bytes | None = None,
    ota_fail_rate: float = 0.0,
    bad_share: float = 0.0,
    stop: threading.Event | None = None,
) -> tuple[FleetStats, list[SimulatedDevice]]:
    """Connect every device, publish at `rate` msgs/s each for `duration` s (or `max_messages`
    each), wait until every message is acknowledged, disconnect.

    OTA commands are answered with the artifacts under `artifact_root` (an
    streams.ota.artifacts.ArtifactStore's root), checked against `release_public_key` (the PEM of
    the PKI dir's `release.pub`); without them an install fails (`no_artifact_store`,
    `no_release_key`). A share `ota_fail_rate` of the devices (drawn from each device's rng)
    fails every install with `install_error`. A share `bad_share` of the readings carries a
    value the data-quality gate refuses (humidity past 100 %). Setting `stop` (from any thread)
    ends the publishing early; the drain and disconnect follow as after `duration`."""
    stats = FleetStats(devices=len(credentials))
    rng = random.Random(seed)
    devices = [
        SimulatedDevice(
            c,
            settings,
            stats,
            random.Random(rng.random()),
            load_seq(c),
            twin=load_twin(c),
            report_interval_s=1.0 / rate,
            ota=load_ota(c),
            artifact_root=artifact_root,
            release_public_key=release_public_key,
            ota_fail_rate=ota_fail_rate,
            bad_share=bad_share,
        )
        for c in credentials
    ]

    gate = asyncio.Semaphore(connect_concurrency)  # TLS handshakes cost CPU: pace them

    async def connect(device: SimulatedDevice) -> bool:
        async with gate:
            return await device.connect()

    connected = await asyncio.gather(*(connect(d) for d in devices))
    live = [d for d, ok in zip(devices, connected, strict=True) if ok]
    stats.started_at = time.monotonic()
    if on_start is not None:
        on_start(stats)  # live progress reads the counters while the fleet runs
    until = stats.started_at + duration
    await asyncio.gather(*(d.run(rate, until, max_messages, stop) for d in live))
    await asyncio.gather(*(d.drain(drain_timeout) for d in live))
    await asyncio.gather(*(d.close() for d in live))
    for device in devices:
        save_seq(device.creds, device.seq)
        save_twin(device.creds, device.twin)
    return stats, devices
