"""The bridge under faults (issue 12, findings 2 and 5), on the real stack.

A Mosquitto restart must not leave the bridge connected but deaf, and its status must say so
while it cannot ingest; a payload Kafka cannot take must be dead-lettered in a bounded form,
not wedge an in-flight slot (and every SIGTERM after it).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable

import pytest

from infra.services.base import wait_until
from infra.settings import Settings
from infra.stack import Stack
from tests.conftest import DeviceIdentity
from tests.support.kafka import collect
from tests.support.mqtt import MqttSession, connect

# Bigger than the envelope's 64 KiB and the Kafka producer's 1,000,000-byte record limit,
# smaller than the broker's 1 MiB packet limit (as configured before issue 12).
HUGE_PAD = 1_000_000
# How long the bridge may take to notice it is not ingesting (its staleness window) and
# report it, with room for a loaded CI machine.
NOT_UP_WITHIN_S = 30


def _reading(seq: int) -> bytes:
    return json.dumps({"seq": seq, "ts": int(time.time() * 1000), "temperature": 20.0}).encode()


def _huge(seq: int) -> bytes:
    return b'{"seq": %d, "ts": 1700000000000, "pad": "%s"}' % (seq, b"x" * HUGE_PAD)


def _session(settings: Settings, device: DeviceIdentity) -> MqttSession:
    session = connect(settings, device.cert, device.key, device.device_id)
    assert session is not None
    return session


def _bridge_up(stack: Stack) -> bool:
    return stack.bridge.status().state == "up"


def _telemetry_seqs(settings: Settings, device_id: str, count: int) -> list[int]:
    from tests.integration.test_ingest import _decode

    mine = device_id.encode()
    got = collect(
        settings,
        "telemetry.raw",
        keep=lambda m: m.key() == mine,
        done=lambda got: len(got) >= count,
        timeout=60,
    )
    return sorted(int(_decode(m)["seq"]) for m in got)  # type: ignore[call-overload]


def test_after_a_mosquitto_restart_every_message_reaches_kafka(
    stack: Stack, settings: Settings, make_device: Callable[..., DeviceIdentity]
) -> None:
    assert wait_until(lambda: _bridge_up(stack), timeout=60)
    try:
        assert stack.mosquitto.stop(timeout=60)  # SIGTERM: a clean broker restart
    finally:
        stack.mosquitto.start(settings.startup_timeout_s)
    # `up` means ingesting: once the stack says so, nothing a device sends is lost.
    assert wait_until(lambda: _bridge_up(stack), timeout=60)
    device = make_device()
    session = _session(settings, device)
    count = 50
    try:
        codes = [
            session.publish(f"devices/{device.device_id}/telemetry", _reading(seq)).value
            for seq in range(count)
        ]
    finally:
        session.close()
    assert codes == [0] * count  # success, not 0x10 "no matching subscribers"
    assert _telemetry_seqs(settings, device.device_id, count) == list(range(count))


def test_the_bridge_is_not_up_while_the_broker_is_away_and_up_again_after(
    stack: Stack, settings: Settings
) -> None:
    assert wait_until(lambda: _bridge_up(stack), timeout=60)
    try:
        assert stack.mosquitto.stop(timeout=60)
        started = time.monotonic()
        assert wait_until(lambda: not _bridge_up(stack), timeout=NOT_UP_WITHIN_S)
        print(f"bridge not up {time.monotonic() - started:.1f}s after the broker stopped")
        assert not stack.status().all_up
    finally:
        stack.mosquitto.start(settings.startup_timeout_s)
    started = time.monotonic()
    assert wait_until(lambda: _bridge_up(stack), timeout=60)
    print(f"bridge up again {time.monotonic() - started:.1f}s after the broker was back")
    canary = stack.bridge.counters()["canary"]
    assert canary["received"] >= 1
    assert canary["last_at"] >= time.time() - NOT_UP_WITHIN_S
    assert 0 <= canary["last_round_trip_ms"] < NOT_UP_WITHIN_S * 1000


def _dead_letters(settings: Settings, device_id: str, count: int) -> list:  # type: ignore[type-arg]
    mine = device_id.encode()
    return collect(
        settings,
        "dlq.ingest",
        keep=lambda m: m.key() == mine,
        done=lambda got: len(got) >= count,
        timeout=60,
    )


def _publish_huge(session: MqttSession, topic: str, payload: bytes) -> None:
    code = session.publish(topic, payload, timeout=30)
    if code.is_failure:
        # A broker whose message_size_limit matches the envelope refuses it first (the
        # in-process test in test_bridge_delivery.py still covers the bridge on its own).
        pytest.skip(f"the broker refused a {len(payload)}-byte payload: {code}")


def test_a_payload_kafka_cannot_take_is_dead_lettered_bounded_and_ingest_goes_on(
    stack: Stack, settings: Settings, make_device: Callable[..., DeviceIdentity]
) -> None:
    device = make_device()
    topic = f"devices/{device.device_id}/telemetry"
    huge = _huge(1)
    session = _session(settings, device)
    try:
        _publish_huge(session, topic, huge)
        assert session.publish(topic, _reading(2)).value == 0
    finally:
        session.close()
    [dead] = _dead_letters(settings, device.device_id, 1)
    headers = dict(dead.headers())
    assert headers["error"] == b"oversize"
    assert headers["mqtt_topic"] == topic.encode()
    assert int(headers["original_size"]) == len(huge)
    assert headers["sha256"] == hashlib.sha256(huge).hexdigest().encode()
    assert headers["truncated"] == b"true"
    assert 0 < len(dead.value()) <= 4096
    assert huge.startswith(dead.value())
    assert _telemetry_seqs(settings, device.device_id, 1) == [2]
    # Nothing of it is left holding an in-flight slot.
    assert wait_until(lambda: stack.bridge.counters().get("inflight") == 0, timeout=30)


def test_sigterm_of_the_bridge_returns_promptly_after_an_oversized_payload(
    stack: Stack, settings: Settings, make_device: Callable[..., DeviceIdentity]
) -> None:
    device = make_device()
    topic = f"devices/{device.device_id}/telemetry"
    session = _session(settings, device)
    try:
        _publish_huge(session, topic, _huge(1))
        assert session.publish(topic, _reading(2)).value == 0
    finally:
        session.close()
    assert _telemetry_seqs(settings, device.device_id, 1) == [2]
    started = time.monotonic()
    try:
        assert stack.bridge.stop(timeout=60)
        elapsed = time.monotonic() - started
    finally:
        stack.bridge.start(settings.startup_timeout_s)
    print(f"bridge SIGTERM -> exit: {elapsed:.2f}s")
    assert elapsed < 5
