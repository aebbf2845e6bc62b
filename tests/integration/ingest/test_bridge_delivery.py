"""The bridge on its own, in this process, against the real Kafka and Mosquitto of the stack.

Defence in depth: whatever the broker in front lets through, a record Kafka refuses is
dead-lettered bounded and acked; and a replica whose subscriptions vanish heals itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import Callable

from infra.entrypoints.bridge import bridge_config
from infra.settings import Settings
from infra.stack import Stack
from ingest.bridge import DLQ_HEAD_BYTES, Bridge, subscriptions
from ingest.health import STALE_AFTER_S
from ingest.kafka_delivery import ProducerTuning
from tests.support.kafka import collect


async def _until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.1)
    return predicate()


def test_a_record_kafka_refuses_is_dead_lettered_bounded_and_acked(
    stack: Stack, settings: Settings
) -> None:
    device_id = f"big-{uuid.uuid4().hex[:8]}"
    topic = f"devices/{device_id}/telemetry"
    # Over the envelope limit (a dead letter) and over this producer's record limit: as a
    # deployment whose broker admits more than its Kafka takes.
    payload = json.dumps({"seq": 1, "ts": 1, "pad": "z" * 200_000}).encode()

    async def scenario() -> Bridge:
        bridge = Bridge(bridge_config(settings), 7, ProducerTuning(message_max_bytes=100_000))
        bridge.start_kafka()
        acked = asyncio.get_running_loop().create_future()
        assert bridge.accept(topic, payload, {}, lambda: acked.set_result(True))
        await asyncio.wait_for(acked, 30)
        assert bridge.close_kafka(10) == 0
        return bridge

    bridge = asyncio.run(scenario())
    assert bridge.counters.unproducible == 1
    assert bridge.counters.by_reason == {"unproducible": 1}
    [dead] = collect(
        settings,
        "dlq.ingest",
        keep=lambda m: m.key() == device_id.encode(),
        done=lambda got: len(got) >= 1,
    )
    headers = dict(dead.headers())
    assert headers["error"] == b"unproducible"
    assert b"MSG_SIZE_TOO_LARGE" in headers["detail"]
    assert headers["sha256"] == hashlib.sha256(payload).hexdigest().encode()
    assert int(headers["original_size"]) == len(payload)
    assert dead.value() == payload[:DLQ_HEAD_BYTES]


def test_a_replica_whose_subscriptions_vanish_subscribes_again_by_itself(
    stack: Stack, settings: Settings
) -> None:
    replica = 6  # a spare identity: its session is ended (retired) at the end

    async def scenario() -> tuple[int, int]:
        bridge = Bridge(bridge_config(settings), replica)
        running = asyncio.create_task(bridge.run())
        try:
            assert await _until(lambda: bridge.canary.received >= 1, timeout=30)
            assert bridge._client is not None
            # What a broker restart did: the session is there, its subscriptions are not.
            bridge._client.unsubscribe(subscriptions())
            assert await _until(
                lambda: bridge.counters.resubscribes_when_deaf >= 1, timeout=STALE_AFTER_S + 30
            )
            healed = bridge.canary.received
            assert await _until(lambda: bridge.canary.received > healed, timeout=30)
            return bridge.counters.resubscribes_when_deaf, bridge.canary.received - healed
        finally:
            bridge.stopping.set()
            assert await running == 0

    try:
        resubscribes, canaries = asyncio.run(scenario())
        print(f"resubscribed {resubscribes}x, then {canaries} canaries received")
    finally:
        # No session left behind.
        assert asyncio.run(Bridge(bridge_config(settings), replica).retire())
        (settings.run_dir / f"bridge-{replica}.json").unlink(missing_ok=True)
