"""Governed OTA rollouts on real services: controller, bridge, broker and simulated devices."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Message, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient

from infra.api.client import HotPathClient
from infra.demo import DEMO_ORG, DEMO_PROJECT, DEMO_ROLLOUT_PLAN, DemoRollout, prepare_rollout
from infra.keys import key_passphrase
from infra.pki import CertificateAuthority
from infra.provision import DeviceCredentials, load_or_provision, register
from infra.services.base import wait_until
from infra.settings import Settings
from infra.simulator.stats import FleetStats
from infra.stack import Stack
from schemas.codec import CodecRegistry, Decoded, load_schema
from streams.ota.events import OtaRequest
from streams.ota.model import Progress, Rollout, RolloutState
from streams.ota.summary import rollout_summary
from streams.registry.rbac import Principal
from streams.runtime.tables import read_to_end
from tests.support.fleet import BackgroundFleet, start_fleet

# Health windows long enough that telemetry queued behind a busy bridge (CI runs everything on
# two cores) still arrives inside them: a device is judged silent only if it really is.
# The cohort timeout only bounds a stalled cohort: 45 s was once too short on a loaded CI
# machine for 45 simulated devices to download, install and pass the health window.
TEST_PLAN = replace(DEMO_ROLLOUT_PLAN, health_window_s=8.0, cohort_timeout_s=120.0)


@pytest.fixture
def client(stack: Stack, settings: Settings) -> Iterator[HotPathClient]:
    hot = HotPathClient(settings, timeout=60)
    yield hot
    hot.close()


def fleet_of(
    client: HotPathClient, settings: Settings, tmp_path: Path, devices: int
) -> tuple[str, list[DeviceCredentials]]:
    ca = CertificateAuthority.load_or_create(settings.pki_dir, passphrase=key_passphrase(settings))
    group = f"ota{uuid.uuid4().hex[:6]}"
    creds = load_or_provision(ca, [f"{group}-{i:04d}" for i in range(devices)], tmp_path, "ec")
    register(client, creds, DEMO_ORG, DEMO_PROJECT, group)
    return group, creds


def run_devices(
    settings: Settings,
    creds: list[DeviceCredentials],
    ota: DemoRollout,
    duration: float,
    fail_rate: float = 0.0,
) -> BackgroundFleet:
    """The fleet, running in the background once every device is connected (its session and
    subscriptions in place, so the first cohort's commands reach it)."""
    online: list[FleetStats] = []
    fleet = start_fleet(
        settings,
        creds,
        rate=1.0,
        duration=duration,
        artifact_root=ota.artifact_root,
        release_public_key=ota.release_public_key,
        ota_fail_rate=fail_rate,
        on_start=online.append,
    )
    assert wait_until(lambda: bool(online), timeout=120, interval=0.2)
    return fleet


def rollout(client: HotPathClient, rollout_id: str) -> Rollout:
    return client.rollouts()[rollout_id]


def final(client: HotPathClient, rollout_id: str) -> bool:
    return rollout(client, rollout_id).final


def ota_commands(settings: Settings, rollout_id: str) -> list[tuple[str, str]]:
    """(device, command id) of every OTA command of the rollout on `mqtt.downlink`."""
    downlink = CodecRegistry(SchemaRegistryClient({"url": settings.registry_url})).codec(
        "mqtt.downlink", load_schema("Downlink")
    )
    found: list[tuple[str, str]] = []

    def keep(msg: Message) -> None:
        decoded = downlink.decode(msg.value() or b"")
        if not isinstance(decoded, Decoded):
            return
        topic = str(decoded.record["topic"])
        if not topic.endswith("/ota/command"):
            return
        document = json.loads(decoded.record["payload"])
        if document.get("rollout_id") == rollout_id:
            found.append((topic.split("/")[1], str(document["command_id"])))

    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": f"test-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "isolation.level": "read_committed",
        }
    )
    try:
        meta = consumer.list_topics("mqtt.downlink", timeout=30).topics["mqtt.downlink"]
        tps = [TopicPartition("mqtt.downlink", p) for p in sorted(meta.partitions)]
        read_to_end(consumer, tps, keep, 60)
    finally:
        consumer.close()
    return found


def test_without_approval_nothing_is_sent_and_only_an_approver_approves(
    client: HotPathClient, settings: Settings, tmp_path: Path
) -> None:
    group, creds = fleet_of(client, settings, tmp_path, 10)
    ota = prepare_rollout(settings, client, group)
    fleet = run_devices(settings, creds, ota, duration=6)
    operator = client.ota_request(
        OtaRequest(rollout_id=ota.rollout_id, kind="approve"), Principal.user("demo-operator")
    )
    assert operator.decision == "denied"  # operators create; only an ota-approver approves
    stats, _ = fleet.wait()
    assert rollout(client, ota.rollout_id).state is RolloutState.pending_approval
    assert ota_commands(settings, ota.rollout_id) == []
    assert stats.summary()["ota_commands"] == 0


def test_a_rollout_reaches_every_device_and_a_controller_crash_sends_nothing_twice(
    client: HotPathClient, stack: Stack, settings: Settings, tmp_path: Path
) -> None:
    group, creds = fleet_of(client, settings, tmp_path, 500)
    ota = prepare_rollout(settings, client, group, TEST_PLAN)
    fleet = run_devices(settings, creds, ota, duration=100)
    ota.approve(client)
    assert ota.approved

    def past_the_canary() -> bool:
        return rollout(client, ota.rollout_id).cohort_index >= 1

    assert wait_until(past_the_canary, timeout=60, interval=0.5)
    stack.ota.kill()  # mid-cohort
    stack.ota.start(settings.startup_timeout_s)
    assert wait_until(lambda: final(client, ota.rollout_id), timeout=120, interval=1.0)
    fleet.stop()

    done = rollout(client, ota.rollout_id)
    summary = rollout_summary(done)
    why = Counter(d.reason for d in done.devices.values() if d.reason)
    assert done.state is RolloutState.completed, (summary, why)
    assert summary["updated"] == 500
    commands = ota_commands(settings, ota.rollout_id)
    assert len(commands) == 500
    assert len({command for _, command in commands}) == 500  # none twice
    assert {device for device, _ in commands} == {c.device_id for c in creds}


def test_a_failing_canary_rolls_back_and_touches_nobody_else(
    client: HotPathClient, settings: Settings, tmp_path: Path
) -> None:
    group, creds = fleet_of(client, settings, tmp_path, 60)
    ota = prepare_rollout(settings, client, group, TEST_PLAN)
    # Every install fails: the canary is sure to cross the error threshold.
    fleet = run_devices(settings, creds, ota, duration=40, fail_rate=1.0)
    ota.approve(client)
    assert wait_until(lambda: final(client, ota.rollout_id), timeout=60, interval=1.0)
    fleet.stop()

    done = rollout(client, ota.rollout_id)
    assert done.state is RolloutState.rolled_back
    canary = set(done.cohorts[0])
    assert len(canary) == 5
    commanded = {device for device, _ in ota_commands(settings, ota.rollout_id)}
    assert commanded <= canary
    untouched = [d for d in done.devices.values() if d.device_id not in canary]
    assert untouched
    assert all(d.status is Progress.planned for d in untouched)


def test_a_tampered_artifact_is_refused_by_devices_and_counted(
    client: HotPathClient, settings: Settings, tmp_path: Path
) -> None:
    group, creds = fleet_of(client, settings, tmp_path, 20)
    ota = prepare_rollout(settings, client, group)
    image = bytearray(ota.artifact_path.read_bytes())
    image[100] ^= 0xFF  # after signing: the store now serves a corrupted image
    ota.artifact_path.write_bytes(bytes(image))
    fleet = run_devices(settings, creds, ota, duration=30)
    ota.approve(client)
    assert wait_until(lambda: final(client, ota.rollout_id), timeout=60, interval=1.0)
    stats, _ = fleet.stop()

    done = rollout(client, ota.rollout_id)
    reasons = Counter(d.reason for d in done.devices.values() if d.reason)
    assert reasons["digest_mismatch"] >= 1
    assert stats.summary()["ota_refused"] >= 1
    assert rollout_summary(done)["refused"] >= 1
    assert done.state is RolloutState.rolled_back
