"""The MQTT -> Kafka bridge: at-least-once, acknowledging late.

gmqtt with `optimistic_acknowledgement=False` runs one task per incoming QoS 1 message and sends
its PUBACK with the int the handler returns; a handler that raises never acks, and the broker
redelivers the message when this session reconnects. So a message is acknowledged only after
Kafka's delivery report (acks=all, idempotent producer) for the record it became: the Avro
record on its topic, or the original bytes on `dlq.ingest` with the reason.

The session is persistent (clean_start false, long expiry) and the subscription shared
(`$share/ingest/...`): N replicas split the load, and while every replica is down the broker
queues for them instead of dropping devices' messages.

A shared subscription keeps routing a share of the messages to a persistent session whose
replica is gone (Mosquitto counts an offline session as a member). So a replica taken out of
service for good (fewer FLEET_BRIDGE_REPLICAS) is *retired* (`python -m ingest.bridge N
--retire`, run by `fleet up`): it resumes its session, unsubscribes (nothing new comes to it),
hands what the session had queued to Kafka like any message, and leaves with session expiry 0,
ending the session. Nothing stays stranded in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import gmqtt
from confluent_kafka import KafkaError
from confluent_kafka.schema_registry import SchemaRegistryClient
from gmqtt.mqtt.constants import MQTTv50

from infra.services.mosquitto import BrokerFiles, bridge_identity, client_tls_context
from infra.settings import Settings
from infra.status_file import write_status
from ingest.downlink import DOWNLINK_TOPIC, DownlinkCounters, DownlinkRelay, MqttOut
from ingest.envelope import (
    DEFAULT_TS_WINDOW,
    EVENTS,
    OTA_STATUS,
    STATE_REPORTED,
    TELEMETRY,
    Accepted,
    Rejected,
    RejectReason,
    TimestampWindow,
    parse_uplink_topic,
    validate,
)
from ingest.kafka_delivery import AsyncProducer, Headers
from schemas.codec import AvroCodec, CodecRegistry, load_schema

log = logging.getLogger("fleetstream.bridge")

DLQ_TOPIC = "dlq.ingest"
SHARE_GROUP = "ingest"
BRIDGE_SESSION_EXPIRY_S = 7 * 24 * 3600


@dataclass(frozen=True)
class Route:
    kind: str
    kafka_topic: str
    schema: str


ROUTES: Mapping[str, Route] = {
    TELEMETRY: Route(TELEMETRY, "telemetry.raw", "Telemetry"),
    EVENTS: Route(EVENTS, "device.events", "DeviceEvent"),
    STATE_REPORTED: Route(STATE_REPORTED, "twin.reported", "TwinReported"),
    OTA_STATUS: Route(OTA_STATUS, "device.events", "DeviceEvent"),
}


def subscriptions() -> list[str]:
    return [f"$share/{SHARE_GROUP}/devices/+/{kind}" for kind in ROUTES]


@dataclass
class BridgeCounters:
    accepted: int = 0
    dead_lettered: int = 0
    redelivered: int = 0
    kafka_retries: int = 0
    refused_while_stopping: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)

    def dead_letter(self, reason: str) -> None:
        self.dead_lettered += 1
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1


@dataclass(frozen=True, slots=True)
class Outgoing:
    """What one MQTT message becomes in Kafka."""

    topic: str
    key: bytes
    value: bytes
    headers: Headers
    reason: str | None  # None: accepted; else the dead-letter reason


def dead_letter(
    mqtt_topic: str, device_id: str, payload: bytes, reason: str, detail: str, received_at_ms: int
) -> Outgoing:
    headers = [
        ("error", reason.encode()),
        ("detail", detail.encode("utf-8", "replace")),
        ("source", b"ingest"),
        ("mqtt_topic", mqtt_topic.encode("utf-8", "replace")),
        ("received_at", str(received_at_ms).encode()),
    ]
    return Outgoing(DLQ_TOPIC, device_id.encode(), payload, headers, reason)


def route_message(
    mqtt_topic: str,
    payload: bytes,
    received_at_ms: int,
    codecs: Mapping[str, AvroCodec],
    ts_window: TimestampWindow = DEFAULT_TS_WINDOW,
) -> Outgoing:
    """Pure: an MQTT message to the Kafka record it becomes (accepted or dead letter)."""
    parsed = parse_uplink_topic(mqtt_topic)
    if parsed is None or parsed[1] not in codecs:
        return dead_letter(
            mqtt_topic, "", payload, RejectReason.bad_topic, "not an uplink topic", received_at_ms
        )
    device_id, kind = parsed  # the broker's ACL guarantees the id in the topic
    outcome = validate(kind, device_id, payload, received_at_ms, ts_window)
    if isinstance(outcome, Rejected):
        return dead_letter(
            mqtt_topic, device_id, payload, outcome.reason, outcome.detail, received_at_ms
        )
    assert isinstance(outcome, Accepted)
    try:
        value = codecs[kind].encode(outcome.record)
    except (ValueError, TypeError, OverflowError) as exc:
        return dead_letter(
            mqtt_topic, device_id, payload, "encode_failed", str(exc), received_at_ms
        )
    return Outgoing(ROUTES[kind].kafka_topic, device_id.encode(), value, [], None)


class Bridge:
    def __init__(self, settings: Settings, replica: int = 0) -> None:
        self.settings = settings
        self.replica = replica
        # Its own certificate identity: the broker makes the CN the client id, so replicas
        # sharing one identity would take each other's connection over.
        self.client_id = bridge_identity(replica)
        self.counters = BridgeCounters()
        self.ts_window = TimestampWindow(
            settings.ts_max_age_s * 1000, settings.ts_max_ahead_s * 1000
        )
        self.stopping = asyncio.Event()
        self.connected = False
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._producer: AsyncProducer | None = None
        self._codecs: dict[str, AvroCodec] = {}
        self._downlink_codec: AvroCodec | None = None
        self.downlink = DownlinkCounters()
        self._client: gmqtt.Client | None = None
        self._last_message_at = time.monotonic()

    @property
    def status_path(self) -> Path:
        return self.settings.run_dir / f"{self.client_id}.json"

    def _register_schemas(self) -> None:
        # Once per process, never per message.
        registry = CodecRegistry(SchemaRegistryClient({"url": self.settings.registry_url}))
        self._codecs = {
            kind: registry.codec(route.kafka_topic, load_schema(route.schema))
            for kind, route in ROUTES.items()
        }
        self._downlink_codec = registry.codec(DOWNLINK_TOPIC, load_schema("Downlink"))

    def accept(
        self, topic: str, payload: bytes, props: dict[str, Any], ack: Callable[[], None]
    ) -> bool:
        """Route one MQTT message and hand it to Kafka; `ack` runs once Kafka has it.

        False: refused (the bridge is stopping), and the message is left un-acked to the broker.
        """
        if self.stopping.is_set():
            self.counters.refused_while_stopping += 1
            return False
        if props.get("dup"):
            self.counters.redelivered += 1
        now_ms = int(time.time() * 1000)
        out = route_message(topic, payload, now_ms, self._codecs, self.ts_window)
        self._last_message_at = time.monotonic()
        self._inflight += 1
        self._idle.clear()
        self._send(out, ack, 0)
        return True

    def _send(self, out: Outgoing, ack: Callable[[], None], attempt: int) -> None:
        assert self._producer is not None
        self._producer.send(
            out.topic,
            out.key,
            out.value,
            out.headers,
            partial(self._delivered, out, ack, attempt),
        )

    def _delivered(
        self, out: Outgoing, ack: Callable[[], None], attempt: int, err: KafkaError | None
    ) -> None:
        """On the event loop, per delivery report: ack, or retry while Kafka is away."""
        if err is None:
            ack()
            if out.reason is None:
                self.counters.accepted += 1
            else:
                self.counters.dead_letter(out.reason)
            self._finished_one()
            return
        self.counters.kafka_retries += 1
        if self.stopping.is_set():
            self._finished_one()  # left un-acked: the persistent session gets it again
            return
        delay = min(0.1 * 2**attempt, 5.0)
        log.warning("kafka delivery failed (%s); retrying in %.1fs", err, delay)
        asyncio.get_running_loop().call_later(delay, self._send, out, ack, attempt + 1)

    def _finished_one(self) -> None:
        self._inflight -= 1
        if self._inflight == 0:
            self._idle.set()

    def install_late_ack(self, client: gmqtt.Client) -> None:
        """QoS 1 without a task and a future per message.

        gmqtt (optimistic_acknowledgement=False) runs a coroutine per message and sends its
        PUBACK when it returns; that machinery cost more than the bridge's own work. Here the
        handler's QoS 1 entry point is replaced: the message is routed and produced at once,
        and its PUBACK is sent from the delivery report. Pinned to gmqtt 0.8's internals
        (`_package_handler._handle_qos_1_publish_packet`, `_connection.send_package`); the
        integration tests exercise it.
        """
        handler = client._package_handler
        pending: list[int] = []

        def flush_acks() -> None:
            # All PUBACKs of one batch of delivery reports in one TLS write: a write (and a
            # syscall) per PUBACK was the largest single cost left. MQTT 5 lets a successful
            # PUBACK without properties be just the packet id (remaining length 2).
            packets = b"".join(b"\x40\x02" + mid.to_bytes(2, "big") for mid in pending)
            pending.clear()
            if client._connection is not None and not client._connection.is_closing():
                client._connection.send_package(packets)

        def queue_ack(mid: int) -> None:
            if not pending:
                asyncio.get_running_loop().call_soon(flush_acks)
            pending.append(mid)

        def on_qos1(mid: int, payload: bytes, topic: str, props: dict[str, Any]) -> None:
            self.accept(topic, payload, props, partial(queue_ack, mid))

        handler._handle_qos_1_publish_packet = on_qos1

    async def on_message(
        self, client: gmqtt.Client, topic: str, payload: bytes, qos: int, props: dict[str, Any]
    ) -> int:
        """QoS 0 and 2 (devices use 1): the same path, awaited through gmqtt's coroutine."""
        acked: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if not self.accept(topic, payload, props, partial(acked.set_result, 0)):
            raise RuntimeError("bridge stopping: message left to the broker")
        return await acked

    def _write_status(self) -> None:
        write_status(
            self.status_path,
            {
                "client_id": self.client_id,
                "pid": os.getpid(),
                "connected": self.connected,
                "inflight": self._inflight,
                **asdict(self.counters),
                "downlink": asdict(self.downlink),
            },
        )

    async def _report_forever(self) -> None:
        while True:
            self._write_status()
            await asyncio.sleep(0.5)

    def _mqtt_client(self) -> gmqtt.Client:
        client = gmqtt.Client(
            self.client_id,
            clean_session=False,
            optimistic_acknowledgement=False,
            session_expiry_interval=BRIDGE_SESSION_EXPIRY_S,
            # MQTT 5 Receive Maximum: how many unacknowledged messages the broker may send us.
            # Late acks make this window the throughput cap, so it is sized with the broker's
            # max_inflight_messages (FLEET_MQTT_MAX_INFLIGHT).
            receive_maximum=self.settings.mqtt_max_inflight,
        )
        client.on_message = self.on_message
        self.install_late_ack(client)
        return client

    async def _connect(self) -> gmqtt.Client:
        """Schemas, the Kafka producer, then the MQTT session (resumed if it exists)."""
        loop = asyncio.get_running_loop()
        self.settings.run_dir.mkdir(parents=True, exist_ok=True)
        self._register_schemas()
        self._producer = AsyncProducer(self.settings.bootstrap_servers, self.client_id, loop)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopping.set)
        files = BrokerFiles(self.settings.state_dir / "mosquitto", self.settings.pki_dir)
        cert, key = files.identity_cert(self.client_id), files.identity_key(self.client_id)
        if not cert.exists():
            raise RuntimeError(f"no certificate {cert} for {self.client_id}: run `fleet up`")
        tls = client_tls_context(files.ca_cert, cert, key)
        self._client = client = self._mqtt_client()
        await client.connect(
            self.settings.host, self.settings.mqtt_port, ssl=tls, version=MQTTv50, keepalive=30
        )
        return client

    async def retire(self, quiet_s: float = 2.0, timeout: float = 600.0) -> bool:
        """Drain this replica's session into Kafka and end it (see the module's docstring).

        True once nothing arrived for ``quiet_s`` and everything that did is acked; False if
        ``timeout`` passed first (the session is then kept, to be retired again)."""
        client = await self._connect()
        client.unsubscribe(subscriptions())  # the broker routes nothing new to this session
        log.info("bridge %s retiring: draining its session", self.client_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        drained = False
        while not self.stopping.is_set() and loop.time() < deadline:
            quiet = time.monotonic() - self._last_message_at >= quiet_s
            if quiet and self._inflight == 0:
                drained = True
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), 0.1)
        if not drained:
            self.stopping.set()  # un-acked messages stay in the kept session
        await self.shutdown(client, session_expiry_s=0 if drained else None)
        self._write_status()
        log.info("bridge %s %s: %s", self.client_id,
                 "retired" if drained else "NOT retired", asdict(self.counters))  # fmt: skip
        return drained

    async def run(self) -> None:
        client = await self._connect()
        for topic in subscriptions():
            client.subscribe(topic, qos=1)
        self.connected = True
        log.info("bridge %s up: %s", self.client_id, subscriptions())
        reporter = asyncio.create_task(self._report_forever())
        assert self._downlink_codec is not None

        def publish(out: MqttOut) -> None:
            client.publish(out.topic, out.payload, qos=out.qos)

        relay = DownlinkRelay(
            self.settings.bootstrap_servers, self._downlink_codec, publish, self.downlink
        )
        downlink = asyncio.create_task(relay.run(self.stopping))
        await self.stopping.wait()
        await downlink
        await self.shutdown(client)
        reporter.cancel()
        self.connected = False
        self._write_status()

    async def shutdown(
        self, client: gmqtt.Client, timeout: float = 30.0, session_expiry_s: int | None = None
    ) -> None:
        """Stop taking messages, let in-flight ones reach Kafka and be acked, then leave (with
        ``session_expiry_s`` 0 the broker ends the session: a retired replica's last act)."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            log.warning(
                "%d messages still in flight at shutdown: left to the broker", self._inflight
            )
        assert self._producer is not None
        pending = self._producer.close(timeout)
        await asyncio.sleep(0)  # let the last PUBACKs go out before DISCONNECT
        if session_expiry_s is None:
            await client.disconnect()
        else:
            await client.disconnect(session_expiry_interval=session_expiry_s)
        log.info("bridge stopped: %s (kafka pending: %d)", asdict(self.counters), pending)


def main(replica: int = 0, retire: bool = False) -> None:
    """Run replica ``replica``; with ``retire``, drain and end its session instead (exit 0
    once retired, 1 if it could not be drained in time)."""
    from infra.settings import load_settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    bridge = Bridge(load_settings(), replica)
    if retire:
        raise SystemExit(0 if asyncio.run(bridge.retire()) else 1)
    asyncio.run(bridge.run())


if __name__ == "__main__":
    import sys

    args = sys.argv[1:]
    main(int(args[0]) if args and args[0].isdigit() else 0, retire="--retire" in args)
