"""The bridge under a broker restart (issue 12, finding 2), on the real stack.

A Mosquitto restart must not leave the bridge connected but deaf, and its status must say so
while it cannot ingest. (Finding 5, an oversize payload: the broker now refuses it,
test_mosquitto.py; the bridge's own bounded dead letter is test_bridge_delivery.py.)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from infra.services.base import wait_until
from infra.settings import Settings
from infra.stack import Stack
from tests.conftest import DeviceIdentity
from tests.support.kafka import collect_keyed
from tests.support.mqtt import publish_telemetry

# Bigger than the envelope's 64 KiB and the Kafka producer's 1,000,000-byte record limit,
# smaller than the broker's 1 MiB packet limit (as configured before issue 12).
HUGE_PAD = 1_000_000
# How long the bridge may take to notice it is not ingesting (its staleness window) and
# report it, with room for a loaded CI machine.
NOT_UP_WITHIN_S = 30


def _reading(seq: int) -> bytes:
    return json.dumps({"seq": seq, "ts": int(time.time() * 1000), "temperature": 20.0}).encode()


def _bridge_up(stack: Stack) -> bool:
    return stack.bridge.status().state == "up"


def _telemetry_seqs(settings: Settings, device_id: str, count: int) -> list[int]:
    from tests.integration.ingest.test_ingest import _decode

    got = collect_keyed(settings, "telemetry.raw", device_id, count, timeout=60)
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
    count = 50
    acks = publish_telemetry(settings, device, (_reading(seq) for seq in range(count)))
    codes = [code.value for code in acks]
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
