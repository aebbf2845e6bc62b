"""What a simulated fleet's telemetry became in the warehouse, checked with SQL."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path

from infra.keys import key_passphrase
from infra.pki import CertificateAuthority
from infra.provision import DeviceCredentials, load_or_provision
from infra.services.base import wait_until
from infra.settings import Settings
from infra.simulator.device import SimulatedDevice
from infra.stack import Stack
from infra.warehouse import fetch, warehouse_counts
from tests.support.fleet import telemetry_sent


def provision_fleet(
    settings: Settings, tag: str, count: int, out: Path
) -> tuple[str, list[DeviceCredentials]]:
    """``count`` devices under a fresh prefix (``tag`` and four hex digits), with EC keys and
    certificates of the stack's CA in ``out``: the prefix and their credentials."""
    ca = CertificateAuthority.load_or_create(settings.pki_dir, passphrase=key_passphrase(settings))
    prefix = f"{tag}{uuid.uuid4().hex[:4]}-"
    return prefix, load_or_provision(ca, [f"{prefix}{i:03d}" for i in range(count)], out, "ec")


def stored_rows(stack: Stack) -> int:
    """Rows the cold worker has stored so far (its counter)."""
    return int(stack.cold_worker.counters().get("stored_rows", 0))


def assert_stored_exactly_once(
    settings: Settings,
    prefix: str,
    devices: Sequence[SimulatedDevice],
    published: int,
    timeout: float,
) -> None:
    """Within ``timeout`` the warehouse holds ``published`` rows under ``prefix``, no
    duplicate, and exactly the (device, seq) pairs of telemetry the fleet sent."""

    def drained() -> bool:
        return warehouse_counts(settings, device_prefix=prefix).stored >= published

    assert wait_until(drained, timeout=timeout, interval=1.0)
    counts = warehouse_counts(settings, device_prefix=prefix)
    assert (counts.stored, counts.duplicates) == (published, 0)
    # Every (device, seq) the fleet sent is there: not just the right number of rows.
    rows = fetch(
        settings,
        "SELECT device_id, seq FROM telemetry FINAL WHERE startsWith(device_id, {p:String})",
        {"p": prefix},
    ).rows
    assert {(r[0], int(r[1])) for r in rows} == telemetry_sent(devices)
