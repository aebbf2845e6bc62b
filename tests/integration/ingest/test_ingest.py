"""MQTT -> Kafka through the real bridge: exact sets, crash recovery, dead letters, ACL."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Message

from infra.pki import CertificateAuthority
from infra.provision import load_or_provision
from infra.services.base import wait_until
from infra.services.bridge import BridgeService
from infra.settings import Settings
from infra.simulator.fleet import run_fleet
from infra.stack import Stack
from schemas.codec import AvroCodec, Decoded, load_schema
from tests.conftest import DeviceIdentity
from tests.support.fleet import start_fleet, telemetry_sent
from tests.support.kafka import collect, collect_keyed
from tests.support.mqtt import connect_device, publish_telemetry


def _codec() -> AvroCodec:
    return AvroCodec(load_schema("Telemetry"), schema_id=0)


def _decode(msg: Message) -> dict[str, object]:
    # The schema id in the wire format is the registry's; decoding only needs the body here.
    result = AvroCodec(load_schema("Telemetry"), int.from_bytes(msg.value()[1:5], "big")).decode(
        msg.value()
    )
    assert isinstance(result, Decoded), result
    return result.record


def _fleet(ca: CertificateAuthority, tmp_path: Path, count: int) -> list:  # type: ignore[type-arg]
    prefix = f"it{uuid.uuid4().hex[:6]}"
    return load_or_provision(ca, [f"{prefix}-{i:03d}" for i in range(count)], tmp_path, "ec")


def _stored(settings: Settings, expected: set[tuple[str, int]], timeout: float = 90) -> list:
    ids = {device for device, _ in expected}
    messages = collect(
        settings,
        "telemetry.raw",
        keep=lambda m: m.key().decode() in ids,
        done=lambda got: {(m.key().decode(), _decode(m)["seq"]) for m in got} >= expected,
        timeout=timeout,
    )
    return [(m.key().decode(), _decode(m)["seq"]) for m in messages]


def downlink_refused(stack: Stack) -> int:
    """Downlinks refused, over every bridge replica (any of them may take the record)."""
    return sum(int(b.counters().get("downlink", {}).get("refused", 0)) for b in stack.bridges)


def test_100_devices_x_50_messages_arrive_exactly(
    stack: Stack, settings: Settings, ca: CertificateAuthority, tmp_path: Path
) -> None:
    creds = _fleet(ca, tmp_path, 100)
    stats, devices = asyncio.run(run_fleet(settings, creds, rate=20, duration=60, max_messages=50))
    published = telemetry_sent(devices)
    assert stats.connect_failures == 0
    assert len(published) == 100 * 50
    stored = _stored(settings, published)
    assert set(stored) == published
    assert len(stored) == len(published)  # no duplicates without a crash


def test_kill_9_of_the_bridge_mid_stream_loses_nothing(
    stack: Stack, settings: Settings, ca: CertificateAuthority, tmp_path: Path
) -> None:
    accepted_before = stack.bridge.counters().get("accepted", 0)
    fleet = start_fleet(
        settings,
        _fleet(ca, tmp_path, 50),
        rate=20,
        duration=60,
        max_messages=100,
        drain_timeout=120,
    )
    # Mid-stream: once the bridge has taken some of this fleet's messages.
    assert wait_until(
        lambda: stack.bridge.counters().get("accepted", 0) > accepted_before + 1000, timeout=60
    )
    stack.bridge.kill()
    stack.bridge.start(settings.startup_timeout_s)
    published = telemetry_sent(fleet.wait()[1])
    assert len(published) == 50 * 100
    stored = _stored(settings, published)
    assert set(stored) == published
    duplicates = sum(n - 1 for n in Counter(stored).values())
    # Only what was in flight at the crash may come twice: at most the receive window.
    assert duplicates <= settings.mqtt_max_inflight
    print(f"duplicates across the crash: {duplicates}")


TS = int(time.time() * 1000)  # device time inside the bridge's window (else bad_timestamp)
MALFORMED = {
    "not_json": b"{not json",
    "not_object": b"[1, 2]",
    "missing_field": json.dumps({"ts": TS}).encode(),
    "wrong_type": json.dumps({"seq": 1, "ts": TS, "temperature": "hot"}).encode(),
    "bad_seq": json.dumps({"seq": -5, "ts": TS}).encode(),
}
# Oversize (> 64 KiB) never reaches the bridge: the broker refuses it with PUBACK 0x95
# (message_size_limit; tests/integration/ingest/test_mosquitto.py).


def test_each_malformed_kind_lands_in_the_dlq_with_its_reason(
    stack: Stack, settings: Settings, make_device: Callable[..., DeviceIdentity]
) -> None:
    device = make_device()
    topic = f"devices/{device.device_id}/telemetry"
    # The bridge keeps running: a good message after the bad ones arrives.
    good = json.dumps({"seq": 1, "ts": TS, "temperature": 21.5}).encode()
    publish_telemetry(settings, device, [*MALFORMED.values(), good])
    dead = collect_keyed(settings, "dlq.ingest", device.device_id, len(MALFORMED))
    by_reason = {dict(m.headers())["error"].decode(): m for m in dead}
    assert set(by_reason) == set(MALFORMED)
    for reason, msg in by_reason.items():
        headers = dict(msg.headers())
        assert msg.value() == MALFORMED[reason]  # the original bytes, kept
        assert headers["mqtt_topic"].decode() == topic
        assert headers["source"] == b"ingest"
        assert int(headers["received_at"]) > 0
    stored = collect_keyed(settings, "telemetry.raw", device.device_id, 1)
    assert [_decode(m)["temperature"] for m in stored] == [21.5]
    not_json = sum(b.counters()["by_reason"].get("not_json", 0) for b in stack.bridges)
    assert not_json >= 1


def test_a_device_cannot_get_messages_into_kafka_under_another_id(
    stack: Stack, settings: Settings, make_device: Callable[..., DeviceIdentity]
) -> None:
    intruder, victim = make_device(), make_device()
    session = connect_device(settings, intruder)
    try:
        forged = json.dumps({"seq": 1, "ts": TS, "temperature": 99.0}).encode()
        assert session.publish(f"devices/{victim.device_id}/telemetry", forged).value == 135
        own = json.dumps({"seq": 1, "ts": TS, "temperature": 20.0}).encode()
        assert session.publish(f"devices/{intruder.device_id}/telemetry", own).value < 128
    finally:
        session.close()
    ids = {intruder.device_id.encode(), victim.device_id.encode()}
    # The intruder's own message arriving shows the bridge got past the forged one.
    got = collect(
        settings,
        "telemetry.raw",
        keep=lambda m: m.key() in ids,
        done=lambda got: any(m.key() == intruder.device_id.encode() for m in got),
    )
    assert [m.key().decode() for m in got] == [intruder.device_id]


@pytest.mark.parametrize("kind", ["Telemetry", "DeviceEvent"])
def test_schemas_are_registered_once_and_compatible_backward(
    stack: Stack, settings: Settings, kind: str
) -> None:
    from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    from schemas.codec import register_schema

    client = SchemaRegistryClient({"url": settings.registry_url})
    subject = f"compat-{uuid.uuid4().hex[:8]}-value"
    schema = load_schema(kind)
    first = register_schema(client, subject, schema)
    assert register_schema(client, subject, schema) == first  # same schema, same id
    optional = {"name": "firmware", "type": ["null", "string"], "default": None}
    added = {**schema, "fields": [*schema["fields"], optional]}
    assert client.test_compatibility(subject, Schema(json.dumps(added), "AVRO"))
    register_schema(client, subject, added)
    removed = {**added, "fields": [f for f in added["fields"] if f["name"] != "seq"]}
    removed["fields"].append({"name": "sequence", "type": "long"})  # a new required field
    with pytest.raises(SchemaRegistryError):
        register_schema(client, subject, removed)


def test_sigterm_stops_the_bridge_cleanly_without_loss_or_duplicates(
    stack: Stack, settings: Settings, ca: CertificateAuthority, tmp_path: Path
) -> None:
    accepted_before = stack.bridge.counters().get("accepted", 0)
    fleet = start_fleet(
        settings, _fleet(ca, tmp_path, 50), rate=20, duration=60, max_messages=60, drain_timeout=120
    )
    assert wait_until(
        lambda: stack.bridge.counters().get("accepted", 0) > accepted_before + 500, timeout=60
    )
    assert stack.bridge.stop(timeout=60)  # SIGTERM, and it exits by itself
    assert "bridge stopped" in stack.bridge.log_path.read_text()
    stack.bridge.start(settings.startup_timeout_s)
    published = telemetry_sent(fleet.wait()[1])
    stored = _stored(settings, published)
    assert set(stored) == published
    assert len(stored) == len(published)  # a clean stop acks exactly what reached Kafka


def test_downlink_records_reach_their_device_and_only_it(
    stack: Stack, settings: Settings, make_device: Callable[..., DeviceIdentity]
) -> None:
    from confluent_kafka import Producer
    from confluent_kafka.schema_registry import SchemaRegistryClient

    from schemas.codec import CodecRegistry
    from schemas.downlink import downlink_record

    target, bystander = make_device(), make_device()
    codec = CodecRegistry(SchemaRegistryClient({"url": settings.registry_url})).codec(
        "mqtt.downlink", load_schema("Downlink")
    )
    sessions = {}
    for device in (target, bystander):
        session = connect_device(settings, device)
        session.subscribe(f"devices/{device.device_id}/#")
        sessions[device.device_id] = session
    refused_before = downlink_refused(stack)
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers})
    # A producer bug: keyed to the target, aimed at the bystander. Refused by the bridge.
    forged = downlink_record(bystander.device_id, "state/desired", b'{"evil": 1}')
    producer.produce("mqtt.downlink", key=target.device_id.encode(), value=codec.encode(forged))
    good = downlink_record(target.device_id, "state/desired", b'{"led": "on"}', command_id="c1")
    producer.produce("mqtt.downlink", key=target.device_id.encode(), value=codec.encode(good))
    assert producer.flush(15) == 0
    try:
        received = sessions[target.device_id].wait_for_messages(1, timeout=30)
        assert [(m.topic, m.payload) for m in received] == [
            (f"devices/{target.device_id}/state/desired", b'{"led": "on"}')
        ]
        assert wait_until(lambda: downlink_refused(stack) > refused_before, timeout=10)
        assert sessions[bystander.device_id].received == []
    finally:
        for session in sessions.values():
            session.close()


def test_reported_state_and_ota_status_reach_their_topics(
    stack: Stack, settings: Settings, make_device: Callable[..., DeviceIdentity]
) -> None:
    device = make_device()
    session = connect_device(settings, device)
    try:
        reported = {"seq": 1, "ts": TS, "reported": {"led": "on"}}
        ota = {"seq": 1, "ts": TS, "status": "succeeded", "version": "2.0.1"}
        base = f"devices/{device.device_id}"
        assert session.publish(f"{base}/state/reported", json.dumps(reported).encode()).value < 128
        assert session.publish(f"{base}/ota/status", json.dumps(ota).encode()).value < 128
    finally:
        session.close()
    twins = collect_keyed(settings, "twin.reported", device.device_id, 1)
    events = collect_keyed(settings, "device.events", device.device_id, 1)
    assert len(twins) == 1
    event_codec = AvroCodec(
        load_schema("DeviceEvent"), int.from_bytes(events[0].value()[1:5], "big")
    )
    event = event_codec.decode(events[0].value())
    assert isinstance(event, Decoded)
    assert (event.record["type"], event.record["attributes"]["version"]) == ("ota_status", "2.0.1")


def test_a_retired_replica_leaves_no_message_stranded_in_its_session(
    stack: Stack, settings: Settings, ca: CertificateAuthority, tmp_path: Path
) -> None:
    # A second replica ran (FLEET_BRIDGE_REPLICAS=2 once), then stopped for good: its
    # persistent session still takes a share of the shared subscription while it is away.
    spare = BridgeService(settings, 1)
    spare.start(settings.startup_timeout_s)
    try:
        assert spare.stop(timeout=60)
        creds = _fleet(ca, tmp_path, 20)
        stats, devices = asyncio.run(
            run_fleet(settings, creds, rate=20, duration=60, max_messages=20)
        )
        published = telemetry_sent(devices)
        assert stats.connect_failures == 0
        assert len(published) == 20 * 20
        # `fleet up` with one replica retires the other: its session drained, then ended.
        Stack(settings).up()
        assert not spare.has_run()
        stored = _stored(settings, published)
        assert set(stored) == published
        assert len(stored) == len(published)
        retired = [
            line for line in spare.log_path.read_text().splitlines() if "bridge-1 retired" in line
        ]
        assert retired, "the spare replica was not retired"
        drained = int(re.search(r"'accepted': (\d+)", retired[-1]).group(1))  # type: ignore[union-attr]
        assert drained > 0  # its session did hold part of the load: stranded without retiring
    finally:
        spare.stop()
