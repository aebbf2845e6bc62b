"""Records tests feed to jobs and sinks: a telemetry reading in the Avro ``Telemetry`` shape,
a registry ``DeviceRecord``, and a JSON object nested to a given depth."""

from __future__ import annotations

from typing import Any

from streams.ota.artifacts import Artifact
from streams.ota.model import Rollout, RolloutState
from streams.ota.plan import RolloutPlan
from streams.registry.devices import DeviceRecord, DeviceStatus, ProvisionDevice
from streams.registry.rbac import Principal, Resource


def telemetry_record(
    device: str, seq: int, ts: int, /, received_after_ms: int = 5, **fields: Any
) -> dict[str, Any]:
    """Reading ``seq`` of ``device`` taken at ``ts`` and received ``received_after_ms`` later,
    its metrics null but for ``fields`` (which may also set any other field)."""
    record: dict[str, Any] = {
        "device_id": device,
        "seq": seq,
        "ts": ts,
        "received_at": ts + received_after_ms,
        "temperature": None,
        "humidity": None,
        "battery": None,
        "vibration_rms": None,
        "extra": {},
    }
    record.update(fields)
    return record


def telemetry_reading(device: str, seq: int, temperature: float | None) -> dict[str, Any]:
    """Reading ``seq`` of ``device`` (ts = seq seconds, received 5 ms later); other metrics null."""
    return telemetry_record(device, seq, seq * 1000, temperature=temperature)


def device_record(device_id: str, **fields: Any) -> DeviceRecord:
    """An active device of acme/plant-1/sensors in the registry, but for ``fields``."""
    values: dict[str, Any] = {
        "org": "acme",
        "project": "plant-1",
        "group": "sensors",
        "region": "eu",
        "status": DeviceStatus.active,
        "cert_serial": "1",
        "cert_fingerprint": "ab" * 32,
        "created_ms": 1,
        "updated_ms": 1,
    }
    values.update(fields)
    return DeviceRecord(device_id=device_id, **values)


def nested(levels: int) -> dict[str, Any]:
    """A JSON object ``levels`` objects deep: {"n": {"n": ... {"leaf": 1}}}."""
    doc: dict[str, Any] = {"leaf": 1}
    for _ in range(levels - 1):
        doc = {"n": doc}
    return doc


def provision_command(
    principal: Principal, device_id: str = "d-1", **fields: Any
) -> ProvisionDevice:
    """``principal`` provisions ``device_id`` into acme/p1/g1, but for ``fields``."""
    values: dict[str, Any] = {
        "command_id": "c1",
        "org": "acme",
        "project": "p1",
        "group": "g1",
        "region": "eu",
        "cert_serial": "12345",
        "cert_fingerprint": "ab" * 32,
    }
    values.update(fields)
    return ProvisionDevice(principal=principal, device_id=device_id, **values)


def running_rollout(artifact: Artifact, rollout_id: str = "r-1", **fields: Any) -> Rollout:
    """A running rollout of ``artifact`` to acme/plant-1/sensors, but for ``fields``."""
    values: dict[str, Any] = {
        "state": RolloutState.running,
        "target": Resource("acme", "plant-1", "sensors"),
        "plan": RolloutPlan(),
        "created_by": "user:op",
        "create_request_id": "req-1",
        "created_ms": 1,
        "updated_ms": 1,
    }
    values.update(fields)
    return Rollout(rollout_id=rollout_id, artifact=artifact, **values)
