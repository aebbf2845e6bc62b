"""A device-chosen `ts` far from the receive time is dead-lettered by the real bridge, not
stored: a clock at 1970 or 9999 must not create warehouse partitions (ingest/envelope.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from confluent_kafka import Message

from infra.services.base import wait_until
from infra.settings import Settings
from infra.stack import Stack
from schemas.codec import AvroCodec, Decoded, load_schema
from tests.conftest import DeviceIdentity
from tests.support.kafka import collect
from tests.support.mqtt import connect

YEAR_9999_MS = 253_370_764_800_000  # 9999-01-01T00:00:00Z
DAY_MS = 86_400_000


def _seq(msg: Message, schema: str) -> int:
    # The schema id in the wire format is the registry's; decoding only needs the body here.
    codec = AvroCodec(load_schema(schema), int.from_bytes(msg.value()[1:5], "big"))
    result = codec.decode(msg.value())
    assert isinstance(result, Decoded), result
    return int(result.record["seq"])


def _bad_timestamps(stack: Stack) -> int:
    return sum(int(b.counters()["by_reason"].get("bad_timestamp", 0)) for b in stack.bridges)


def test_a_ts_at_1970_or_9999_is_dead_lettered_and_a_normal_one_stored(
    stack: Stack, settings: Settings, make_device: Callable[..., DeviceIdentity]
) -> None:
    device = make_device("ts")
    now_ms = int(time.time() * 1000)
    bad = {
        ("telemetry", 1): {"seq": 1, "ts": 0, "temperature": 21.0},
        ("telemetry", 2): {"seq": 2, "ts": YEAR_9999_MS, "temperature": 21.0},
        ("events", 3): {"seq": 3, "ts": 0, "type": "reboot"},
        ("events", 4): {"seq": 4, "ts": YEAR_9999_MS, "type": "reboot"},
    }
    good = {
        # A backlog kept offline for days is still accepted.
        ("telemetry", 5): {"seq": 5, "ts": now_ms - 3 * DAY_MS, "temperature": 22.0},
        ("telemetry", 6): {"seq": 6, "ts": now_ms, "temperature": 23.0},
        ("events", 7): {"seq": 7, "ts": now_ms, "type": "reboot"},
    }
    counted_before = _bad_timestamps(stack)
    session = connect(settings, device.cert, device.key, device.device_id)
    assert session is not None
    try:
        for (kind, _), body in [*bad.items(), *good.items()]:
            topic = f"devices/{device.device_id}/{kind}"
            assert session.publish(topic, json.dumps(body).encode()).value < 128
    finally:
        session.close()

    mine = device.device_id.encode()
    dead = collect(
        settings, "dlq.ingest", keep=lambda m: m.key() == mine, done=lambda g: len(g) >= len(bad)
    )
    assert len(dead) == len(bad)
    for msg in dead:
        headers = dict(msg.headers())
        assert headers["error"] == b"bad_timestamp"
        body = json.loads(msg.value())  # the original bytes, kept
        kind = headers["mqtt_topic"].decode().rsplit("/", 1)[1]
        assert bad[(kind, body["seq"])] == body
        detail = headers["detail"].decode()
        when = "1970-01-01T00:00:00.000Z" if body["ts"] == 0 else "9999-01-01T00:00:00.000Z"
        assert when in detail
        assert "accepted: at most 30.0 days before and 300 s after" in detail

    def seqs(got: list[Message], schema: str) -> set[int]:
        return {_seq(m, schema) for m in got}

    telemetry = collect(
        settings,
        "telemetry.raw",
        keep=lambda m: m.key() == mine,
        done=lambda got: seqs(got, "Telemetry") >= {5, 6},
    )
    events = collect(
        settings,
        "device.events",
        keep=lambda m: m.key() == mine,
        done=lambda got: seqs(got, "DeviceEvent") >= {7},
    )
    # Only the good ones: the bad ones went first, on the same device (same partition).
    assert sorted(_seq(m, "Telemetry") for m in telemetry) == [5, 6]
    assert [_seq(m, "DeviceEvent") for m in events] == [7]
    # Counted like every dead letter (the bridge reports its counters every few seconds).
    assert wait_until(lambda: _bad_timestamps(stack) - counted_before >= len(bad), timeout=30)
    assert _bad_timestamps(stack) - counted_before == len(bad)
