"""The hot path on real services: MQTT -> bridge -> Kafka -> hot worker -> alerts, twins and
downlinks back to devices."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from infra.api.client import HotPathClient
from infra.pki import CertificateAuthority
from infra.provision import load_or_provision
from infra.services.base import wait_until
from infra.settings import Settings
from infra.simulator.fleet import run_fleet
from infra.stack import Stack
from streams.hot.alerts import AlertEvent, AlertRule, AlertStatus, RuleKind, ScopeType
from streams.hot.twin import delta
from tests.conftest import DeviceIdentity
from tests.support.cli import fleet_cli
from tests.support.mqtt import MqttSession, connect_device


@pytest.fixture
def device_session(
    settings: Settings, make_device: Callable[..., DeviceIdentity]
) -> Iterator[tuple[DeviceIdentity, MqttSession]]:
    device = make_device("hot")
    session = connect_device(settings, device)
    yield device, session
    session.close()


def telemetry(seq: int, **metrics: float) -> bytes:
    return json.dumps({"seq": seq, "ts": int(time.time() * 1000), **metrics}).encode()


def reported(seq: int, patch: dict[str, object]) -> bytes:
    return json.dumps({"seq": seq, "ts": int(time.time() * 1000), "reported": patch}).encode()


def worker_has_rule(stack: Stack, rule_id: str) -> bool:
    """The hot worker applies the rule (it follows the rules table between batches)."""
    return rule_id in stack.hot_worker.counters().get("rules", [])


def put_rule_applied(
    client: HotPathClient,
    stack: Stack,
    name: str,
    device_id: str,
    metric: str,
    threshold: float,
    clear_threshold: float,
) -> AlertRule:
    """A new rule, raised above ``threshold`` and cleared below ``clear_threshold``, for one
    device: returned once the hot worker applies it."""
    rule = AlertRule(
        f"{name}-{uuid.uuid4().hex[:6]}",
        ScopeType.device,
        device_id,
        metric,
        RuleKind.above,
        threshold=threshold,
        clear_threshold=clear_threshold,
    )
    client.put_rule(rule)
    assert wait_until(lambda: worker_has_rule(stack, rule.rule_id), timeout=30, interval=0.2)
    return rule


def alerts_of(client: HotPathClient, device_id: str, since_ms: int) -> list[AlertEvent]:
    return [a for a in client.alerts(since_ms) if a.device_id == device_id]


def test_a_threshold_crossing_raises_one_alert_and_later_one_resolve(
    client: HotPathClient, stack: Stack, device_session: tuple[DeviceIdentity, MqttSession]
) -> None:
    device, session = device_session
    since = int(time.time() * 1000) - 1000
    put_rule_applied(client, stack, "hot", device.device_id, "temperature", 30.0, 28.0)
    # 31 raises; 35 and 31.5 stay raised; 29 is inside the band; 27 resolves.
    for seq, temperature in enumerate([20.0, 31.0, 35.0, 29.0, 31.5, 27.0], start=1):
        topic = f"devices/{device.device_id}/telemetry"
        assert session.publish(topic, telemetry(seq, temperature=temperature)) == 0

    def resolved() -> bool:
        return any(
            a.status is AlertStatus.resolved for a in alerts_of(client, device.device_id, since)
        )

    assert wait_until(resolved, timeout=60, interval=0.5)
    events = alerts_of(client, device.device_id, since)
    assert [(a.status, a.seq) for a in events] == [
        (AlertStatus.raised, 2),
        (AlertStatus.resolved, 6),
    ]
    assert events[0].alert_id == events[1].alert_id
    assert events[0].value == 31.0
    assert events[1].value == 27.0


def test_an_offline_device_gets_the_delta_on_reconnect_and_converges(
    client: HotPathClient, settings: Settings, ca: CertificateAuthority, tmp_path: Path
) -> None:
    device_id = f"twin-{uuid.uuid4().hex[:8]}"
    creds = load_or_provision(ca, [device_id], tmp_path, "ec")
    # First session: the device subscribes to its desired topic and reports, then goes away.
    asyncio.run(run_fleet(settings, creds, rate=2, duration=1))
    assert wait_until(lambda: bool((t := client.twin(device_id)) and t.reported), 30)

    answer = client.set_desired(device_id, {"led": "blue", "sampling": {"hz": 50}}, None)
    assert answer.status == "accepted"
    twin = client.twin(device_id)
    assert twin is not None
    assert delta(twin) == {"led": "blue", "sampling": {"hz": 50}}

    # Back online: the broker hands over the queued delta; the device applies and reports.
    stats, _ = asyncio.run(run_fleet(settings, creds, rate=2, duration=3))
    assert stats.desired_received >= 1

    def converged() -> bool:
        current = client.twin(device_id)
        return current is not None and bool(current.desired) and not delta(current)

    assert wait_until(converged, timeout=60, interval=0.5)
    final = client.twin(device_id)
    assert final is not None
    assert final.reported["led"] == "blue"
    assert final.reported["sampling"] == {"hz": 50}


def test_a_stale_version_is_refused_by_the_cli(
    client: HotPathClient, settings: Settings, stack: Stack
) -> None:
    device_id = f"cli-{uuid.uuid4().hex[:8]}"

    def fleet(*args: str) -> subprocess.CompletedProcess[str]:
        return fleet_cli(settings, "twin", *args)

    first = fleet("set", device_id, '{"mode": "eco", "fan": {"speed": 2}}')
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["status"] == "accepted"
    stale = fleet("set", device_id, '{"mode": "boost"}', "--version", "0")
    assert stale.returncode == 4, stale.stdout + stale.stderr
    assert json.loads(stale.stdout)["status"] == "conflict"
    current = fleet("set", device_id, '{"fan": {"speed": null}}', "--version", "1")
    assert current.returncode == 0, current.stderr
    got = fleet("get", device_id, "--json")
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout) == {
        "desired": {"mode": "eco"},
        "reported": {},
        "delta": {"mode": "eco"},
        "version": 2,
    }


def test_out_of_order_reports_do_not_regress_the_twin(
    client: HotPathClient, device_session: tuple[DeviceIdentity, MqttSession]
) -> None:
    device, session = device_session
    topic = f"devices/{device.device_id}/state/reported"
    assert session.publish(topic, reported(5, {"firmware": "2.0"})) == 0
    assert session.publish(topic, reported(3, {"firmware": "1.0"})) == 0  # older: ignored
    assert session.publish(topic, reported(6, {"mode": "eco"})) == 0  # marks the end

    def marker_seen() -> bool:
        twin = client.twin(device.device_id)
        return twin is not None and twin.reported.get("mode") == "eco"

    assert wait_until(marker_seen, timeout=60, interval=0.5)
    twin = client.twin(device.device_id)
    assert twin is not None
    assert twin.reported == {"firmware": "2.0", "mode": "eco"}
    assert (twin.version, twin.last_reported_seq) == (2, 6)


def test_kill_9_of_the_hot_worker_emits_every_alert_exactly_once(
    client: HotPathClient,
    stack: Stack,
    settings: Settings,
    device_session: tuple[DeviceIdentity, MqttSession],
) -> None:
    device, session = device_session
    since = int(time.time() * 1000) - 1000
    put_rule_applied(client, stack, "flip", device.device_id, "humidity", 50.0, 40.0)
    readings = 300  # alternating 60 / 30: every reading is a transition
    sent = threading.Event()

    def publish_all() -> None:
        for seq in range(1, readings + 1):
            humidity = 60.0 if seq % 2 else 30.0
            session.publish(
                f"devices/{device.device_id}/telemetry", telemetry(seq, humidity=humidity)
            )
        sent.set()

    publisher = threading.Thread(target=publish_all)
    publisher.start()
    assert wait_until(lambda: len(alerts_of(client, device.device_id, since)) >= 20, 60, 0.2)
    stack.hot_worker.kill()  # mid-stream, mid-transaction most likely
    stack.hot_worker.start(settings.startup_timeout_s)
    publisher.join(timeout=120)
    assert sent.is_set()

    assert wait_until(lambda: len(alerts_of(client, device.device_id, since)) >= readings, 120, 1.0)
    events = alerts_of(client, device.device_id, since)
    assert len(events) == readings
    assert [a.seq for a in events] == list(range(1, readings + 1))
    expected = [
        AlertStatus.raised if s % 2 else AlertStatus.resolved for s in range(1, readings + 1)
    ]
    assert [a.status for a in events] == expected
