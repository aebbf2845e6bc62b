"""Provisioning through the registry agent, and the stream worker's tables after a crash."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

from infra.api.client import HotPathClient
from infra.settings import Settings
from infra.stack import Stack
from streams.registry.devices import AuditDecision, DeviceStatus, SuspendDevice
from streams.registry.rbac import Principal
from tests.support.cli import fleet_cli


def provision(
    settings: Settings, out: Path, group: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    return fleet_cli(
        settings, "provision", "--org", "acme", "--project", "p1", "--group", group,
        "--count", "2", "--out", str(out), "--key", "ec", *extra,
    )  # fmt: skip


def test_fleet_provision_writes_flashable_files_and_registers_each_device(
    client: HotPathClient, settings: Settings, tmp_path: Path
) -> None:
    group = f"g{uuid.uuid4().hex[:6]}"
    result = provision(settings, tmp_path, group)
    assert result.returncode == 0, result.stdout + result.stderr
    manifest = json.loads((tmp_path / "devices.json").read_text())
    assert [m["registry"] for m in manifest] == ["applied", "applied"]
    registry = client.devices()
    for entry in manifest:
        device_id = entry["device_id"]
        assert (tmp_path / f"{device_id}.key").exists()
        assert (tmp_path / f"{device_id}.crt").exists()
        record = registry[device_id]
        assert (record.org, record.project, record.group) == ("acme", "p1", group)
        assert record.status is DeviceStatus.provisioned
        assert record.cert_serial == entry["serial"]
    assert (tmp_path / "ca.crt").exists()


def test_a_principal_without_a_grant_gets_no_certificate(
    settings: Settings, tmp_path: Path
) -> None:
    result = provision(settings, tmp_path / "out", "g-denied", "--as", "user:mallory")
    assert result.returncode == 1
    assert "denied" in result.stderr
    assert not (tmp_path / "out").exists()  # refused before any key was signed


def test_tables_rebuild_from_their_changelogs_after_a_worker_crash(
    client: HotPathClient, stack: Stack, settings: Settings, tmp_path: Path
) -> None:
    result = provision(settings, tmp_path, f"g{uuid.uuid4().hex[:6]}")
    assert result.returncode == 0, result.stderr
    device_id = json.loads((tmp_path / "devices.json").read_text())[0]["device_id"]
    assert client.set_desired(device_id, {"led": "red"}, None).version == 1

    stack.hot_worker.kill()
    stack.hot_worker.start(settings.startup_timeout_s)

    # The registry agent still knows the device (else: "unknown device", refused)...
    suspend = SuspendDevice(
        command_id=uuid.uuid4().hex,
        principal=Principal.orchestrator(),
        device_id=device_id,
        reason="lost",
    )
    audit = client.registry_commands([suspend])[suspend.command_id]
    assert audit.decision is AuditDecision.applied, audit.reason
    assert client.devices()[device_id].status is DeviceStatus.suspended
    # ... and the twin agent its version: a write naming version 1 is accepted.
    answer = client.set_desired(device_id, {"led": "green"}, 1)
    assert (answer.status, answer.version) == ("accepted", 2)
