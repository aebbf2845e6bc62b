"""`fleet device suspend|revoke|activate` on the real stack: the commands go to the registry
agent (authorized and audited there, as the API's do), and the enforcer carries them to the
broker: a suspended device's certificate is on hold, a revoked one's revoked for good."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from infra.api.client import HotPathClient
from infra.pki import CertificateAuthority
from infra.provision import provision_device, register
from infra.services.base import wait_until
from infra.settings import Settings
from schemas.identity import RevocationState
from streams.registry.devices import DeviceStatus
from tests.support.cli import fleet_cli
from tests.support.mqtt import connect

pytestmark = pytest.mark.integration

ENFORCED_WITHIN_S = 30.0  # the enforcer acts within seconds; generous on a loaded machine


def device_command(settings: Settings, *args: str) -> tuple[int, dict[str, object]]:
    """Run `fleet device ...`; its exit code and the audit record it printed."""
    result = fleet_cli(settings, "device", *args, timeout=180)
    assert result.stdout.strip(), result.stderr
    return result.returncode, json.loads(result.stdout)


def status_of(client: HotPathClient, device_id: str) -> Callable[[], DeviceStatus | None]:
    def current() -> DeviceStatus | None:
        record = client.devices().get(device_id)
        return None if record is None else record.status

    return current


def test_fleet_device_suspend_activate_revoke_through_the_registry_agent(
    client: HotPathClient, settings: Settings, ca: CertificateAuthority, tmp_path: Path
) -> None:
    creds = provision_device(ca, f"cli-{uuid.uuid4().hex[:10]}", tmp_path, "ec")
    audits = register(client, [creds], "acme", "cli", "g1")
    assert audits[creds.device_id].decision == "applied", audits
    device, status = creds.device_id, status_of(client, creds.device_id)

    # Same RBAC as the API: a principal without a grant is denied by the agent, and audited.
    code, audit = device_command(settings, "suspend", device, "--as", "user:nobody-cli")
    assert (code, audit["decision"]) == (6, "denied")
    assert status() is DeviceStatus.provisioned

    code, audit = device_command(settings, "suspend", device, "--reason", "maintenance")
    assert (code, audit["decision"], audit["device_id"]) == (0, "applied", device)
    assert status() is DeviceStatus.suspended
    assert wait_until(
        lambda: ca.revocation_states().get(creds.serial) is RevocationState.on_hold,
        timeout=ENFORCED_WITHIN_S,
    ), "the enforcer never put the suspended device's certificate on hold"

    code, audit = device_command(settings, "activate", device)
    assert (code, audit["decision"]) == (0, "applied")
    assert status() is DeviceStatus.active
    assert wait_until(
        lambda: creds.serial not in ca.revocation_states(), timeout=ENFORCED_WITHIN_S
    ), "the hold was never lifted"
    session = connect(settings, creds.cert_path, creds.key_path, device, timeout=30)
    assert session is not None, "an active device is refused"
    session.client.disconnect()
    session.client.loop_stop()

    code, audit = device_command(settings, "revoke", device, "--reason", "stolen")
    assert (code, audit["decision"]) == (0, "applied")
    assert status() is DeviceStatus.revoked
    assert wait_until(
        lambda: ca.revocation_states().get(creds.serial) is RevocationState.revoked,
        timeout=ENFORCED_WITHIN_S,
    ), "the enforcer never revoked the certificate"
    assert connect(settings, creds.cert_path, creds.key_path, device, timeout=30) is None

    # Revoked is for good: activating it is refused (exit 7), and so is an unknown device.
    code, audit = device_command(settings, "activate", device)
    assert (code, audit["decision"]) == (7, "refused")
    assert status() is DeviceStatus.revoked
    code, audit = device_command(settings, "suspend", f"ghost-{uuid.uuid4().hex[:8]}")
    assert (code, audit["decision"]) == (7, "refused")
    assert "unknown device" in str(audit["reason"])
