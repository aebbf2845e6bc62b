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
service for good (fewer FLEET_BRIDGE_REPLICAS) is *retired* (`python -m
infra.entrypoints.bridge N --retire`, run by `fleet up`): it resumes its session, unsubscribes
(nothing new comes to it), hands what the session had queued to Kafka like any message, and
leaves with session expiry 0, ending the session. Nothing stays stranded in it.

Mosquitto (2.0.11 at least) does not keep shared subscriptions across its own restart, although
it resumes the session (session present): so the bridge subscribes again after *every* connect,
and its health is "subscribed and receiving" (ingest/health.py), proven by a canary: each
replica publishes one a second on `devices/<its identity>/<kind>`, a topic the shared
subscription covers and no device can use (bridge identities are reserved, and the ACL keeps a
device in its own subtree). Whichever replica receives it produces it to `ingest.canary`, not
to a data topic, so the warehouse never sees it. A replica connected but deaf resubscribes, and
if that does not help it exits non-zero for its supervisor to start a fresh one.

A message the bridge cannot produce as it is (too big for Kafka, say) never escapes its handler:
it is dead-lettered in a bounded form (the first 4 KiB, its size and sha256, the reason) and
acked. Only transient Kafka failures withhold the ack.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import gmqtt
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.schema_registry import SchemaRegistryClient
from gmqtt.mqtt.constants import MQTTv50
from prometheus_client.core import Metric

from ingest.bridge_metrics import BridgeTimings, bridge_metrics
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
from ingest.health import CANARY_INTERVAL_S, STALE_AFTER_S, Heal, StallWatch
from ingest.kafka_delivery import AsyncProducer, Headers, ProducerTuning, permanent_for_record
from ingest.mqtt_client import IdentityFiles, client_tls_context, coalesce_reads
from schemas.codec import AvroCodec, CodecRegistry, load_schema
from schemas.identity import BRIDGE_IDENTITIES, bridge_identity
from schemas.topics import schema_of
from streams.runtime.metrics import counted, counted_by
from streams.runtime.status import write_status

log = logging.getLogger("fleetstream.bridge")

DLQ_TOPIC = "dlq.ingest"
CANARY_TOPIC = "ingest.canary"
SHARE_GROUP = "ingest"
BRIDGE_SESSION_EXPIRY_S = 7 * 24 * 3600
# A dead letter keeps the original bytes up to this size (4x the envelope's limit, far below
# Kafka's 1 MB record limit); past it, or when Kafka refuses the record, the bounded form.
DLQ_WHOLE_MAX_BYTES = 256 * 1024
DLQ_HEAD_BYTES = 4 * 1024
HEADER_MAX_BYTES = 1024  # an MQTT topic or an error detail can be far longer
RECONNECT_DELAY_S = 1  # gmqtt waits 6 s by default before each reconnect attempt
EXIT_NOT_INGESTING = 3


@dataclass(frozen=True)
class BridgeConfig:
    """What a bridge replica needs (infra/entrypoints/bridge.py builds it from the settings)."""

    host: str  # the broker's
    mqtt_port: int
    mqtt_max_inflight: int  # the broker's in-flight window (MQTT 5 Receive Maximum)
    read_coalesce_s: float  # the broker's socket is read at most once per this (0: at once)
    bootstrap_servers: str
    registry_url: str
    run_dir: Path  # where the status file goes
    identities: IdentityFiles  # the replicas' certificates and keys
    ts_max_age_s: int
    ts_max_ahead_s: int


@dataclass(frozen=True)
class Route:
    kind: str
    kafka_topic: str

    @property
    def schema(self) -> str:
        """The Avro schema of the topic (the catalogue's, schemas/topics.py)."""
        return schema_of(self.kafka_topic)


ROUTES: Mapping[str, Route] = {
    TELEMETRY: Route(TELEMETRY, "telemetry.raw"),
    EVENTS: Route(EVENTS, "device.events"),
    STATE_REPORTED: Route(STATE_REPORTED, "twin.reported"),
    OTA_STATUS: Route(OTA_STATUS, "device.events"),
}


def subscriptions() -> list[str]:
    return [f"$share/{SHARE_GROUP}/devices/+/{kind}" for kind in ROUTES]


@dataclass
class BridgeCounters:
    accepted: int = counted("Device messages stored in Kafka and acked")
    dead_lettered: int = 0  # the sum of by_reason
    redelivered: int = counted("Messages the broker sent again")
    kafka_retries: int = counted("Kafka deliveries failed and retried")
    refused_while_stopping: int = counted("Messages left to the broker while the bridge stopped")
    # Refused by Kafka as they were: dead-lettered bounded instead.
    unproducible: int = counted("Messages Kafka refused as they were (dead-lettered bounded)")
    subscribes: int = counted("Subscriptions made (at each connect)")
    resubscribes_when_deaf: int = counted("Subscriptions renewed after the bridge heard nothing")
    by_reason: dict[str, int] = counted_by(
        "reason", "Device messages sent to a dead-letter topic, by reason", metric="dead_lettered"
    )

    def dead_letter(self, reason: str) -> None:
        self.dead_lettered += 1
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1


@dataclass
class CanaryStats:
    sent: int = 0
    received: int = 0  # canaries (of any replica) this replica took to Kafka
    last_at: float = 0.0  # epoch seconds of the last one stored
    last_from: str = ""
    last_round_trip_ms: float = -1.0  # publish -> broker -> this bridge -> Kafka's ack


@dataclass(frozen=True, slots=True)
class Outgoing:
    """What one MQTT message becomes in Kafka."""

    topic: str
    key: bytes
    value: bytes
    headers: Headers
    reason: str | None  # None: accepted (or a canary); else the dead-letter reason
    bounded: bool = False  # a bounded dead letter: the last form a message can take
    canary_sent_at_ms: int | None = None  # set on a canary only


@dataclass(frozen=True, slots=True)
class Incoming:
    """One MQTT message as received, kept until Kafka has what it became."""

    topic: str
    payload: bytes
    received_at_ms: int


def _header_text(text: str) -> bytes:
    data = text.encode("utf-8", "replace")
    if len(data) <= HEADER_MAX_BYTES:
        return data
    return data[:HEADER_MAX_BYTES].decode("utf-8", "ignore").encode()  # whole characters only


def dead_letter(
    mqtt_topic: str,
    device_id: str,
    payload: bytes,
    reason: str,
    detail: str,
    received_at_ms: int,
    whole_max_bytes: int = DLQ_WHOLE_MAX_BYTES,
) -> Outgoing:
    """The dead letter of a message: its bytes whole up to ``whole_max_bytes``, else bounded.

    The bounded form keeps the first DLQ_HEAD_BYTES and says what was cut (``truncated``,
    ``original_size``, ``sha256`` of the whole payload), so it always fits a Kafka record.
    """
    bounded = len(payload) > whole_max_bytes
    headers = [
        ("error", reason.encode()),
        ("detail", _header_text(detail)),
        ("source", b"ingest"),
        ("mqtt_topic", _header_text(mqtt_topic)),
        ("received_at", str(received_at_ms).encode()),
        ("original_size", str(len(payload)).encode()),
        ("sha256", hashlib.sha256(payload).hexdigest().encode()),
    ]
    value = payload
    if bounded:
        value = payload[:DLQ_HEAD_BYTES]
        if len(value) < len(payload):
            headers.append(("truncated", b"true"))
    return Outgoing(DLQ_TOPIC, device_id.encode(), value, headers, reason, bounded=bounded)


def unproducible(incoming: Incoming, error: str) -> Outgoing:
    """The bounded dead letter of a message Kafka refused in the form it took."""
    parsed = parse_uplink_topic(incoming.topic)
    device_id = parsed[0] if parsed else ""
    detail = f"kafka refused the record: {error}"
    out = dead_letter(
        incoming.topic,
        device_id,
        incoming.payload,
        "unproducible",
        detail,
        incoming.received_at_ms,
        whole_max_bytes=0,
    )
    return replace(out, bounded=True)  # even an empty payload: never bounded twice


def canary_payload(sender: str, number: int, sent_at_ms: int) -> bytes:
    return json.dumps({"canary": sender, "n": number, "sent_at_ms": sent_at_ms}).encode()


def route_canary(mqtt_topic: str, sender: str, payload: bytes, received_at_ms: int) -> Outgoing:
    """A bridge's canary to `ingest.canary` (never a data topic), keyed by its sender."""
    sent_at: int | None = None
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        value = json.loads(payload)["sent_at_ms"]
        sent_at = value if type(value) is int else None
    headers = [
        ("mqtt_topic", _header_text(mqtt_topic)),
        ("received_at", str(received_at_ms).encode()),
    ]
    value_bytes = payload[:HEADER_MAX_BYTES]  # platform-made and small; bounded all the same
    return Outgoing(
        CANARY_TOPIC, sender.encode(), value_bytes, headers, None, canary_sent_at_ms=sent_at
    )


def route_message(
    mqtt_topic: str,
    payload: bytes,
    received_at_ms: int,
    codecs: Mapping[str, AvroCodec],
    ts_window: TimestampWindow = DEFAULT_TS_WINDOW,
) -> Outgoing:
    """Pure: an MQTT message to the Kafka record it becomes (accepted, dead letter, canary)."""
    parsed = parse_uplink_topic(mqtt_topic)
    if parsed is None or parsed[1] not in codecs:
        return dead_letter(
            mqtt_topic, "", payload, RejectReason.bad_topic, "not an uplink topic", received_at_ms
        )
    device_id, kind = parsed  # the broker's ACL guarantees the id in the topic
    if device_id in BRIDGE_IDENTITIES:  # reserved: only a bridge publishes there
        return route_canary(mqtt_topic, device_id, payload, received_at_ms)
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
    def __init__(
        self, config: BridgeConfig, replica: int = 0, tuning: ProducerTuning | None = None
    ) -> None:
        self.config = config
        self.replica = replica
        # Its own certificate identity: the broker makes the CN the client id, so replicas
        # sharing one identity would take each other's connection over.
        self.client_id = bridge_identity(replica)
        self.counters = BridgeCounters()
        self.timings = BridgeTimings()
        self.ts_window = TimestampWindow(config.ts_max_age_s * 1000, config.ts_max_ahead_s * 1000)
        self.canary = CanaryStats()
        self.stopping = asyncio.Event()
        self.exit_code = 0
        self.connected = False
        self.subscribed = False  # the current connection's SUBSCRIBE was granted
        self._subscribe_mid: int | None = None
        self._ingest_ok_at = 0.0  # epoch s: a message from the subscription stored in Kafka
        self._watch = StallWatch()
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._tuning = tuning
        self._producer: AsyncProducer | None = None
        self._codecs: dict[str, AvroCodec] = {}
        self._downlink_codec: AvroCodec | None = None
        self.downlink = DownlinkCounters()
        self._client: gmqtt.Client | None = None
        self._last_message_at = time.monotonic()

    @property
    def status_path(self) -> Path:
        return self.config.run_dir / f"{self.client_id}.json"

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def last_delivery_at(self) -> float:
        return self._ingest_ok_at

    def metrics(self) -> Iterator[Metric]:
        return bridge_metrics(self)

    def _register_schemas(self) -> None:
        # Once per process, never per message.
        registry = CodecRegistry(SchemaRegistryClient({"url": self.config.registry_url}))
        self._codecs = {
            kind: registry.codec(route.kafka_topic, load_schema(route.schema))
            for kind, route in ROUTES.items()
        }
        downlink = load_schema(schema_of(DOWNLINK_TOPIC))
        self._downlink_codec = registry.codec(DOWNLINK_TOPIC, downlink)

    def start_kafka(self) -> None:
        """Schemas and the Kafka producer (on the running event loop): what `accept` needs."""
        self._register_schemas()
        self._producer = AsyncProducer(
            self.config.bootstrap_servers,
            self.client_id,
            asyncio.get_running_loop(),
            self._tuning,
        )

    def accept(
        self, topic: str, payload: bytes, props: dict[str, Any], ack: Callable[[], None]
    ) -> bool:
        """Route one MQTT message and hand it to Kafka; `ack` runs once Kafka has it.

        False: refused (the bridge is stopping), and the message is left un-acked to the broker.
        Nothing raises out of here: a message that breaks routing is dead-lettered instead.
        """
        if self.stopping.is_set():
            self.counters.refused_while_stopping += 1
            return False
        if props.get("dup"):
            self.counters.redelivered += 1
        incoming = Incoming(topic, payload, int(time.time() * 1000))
        try:
            out = route_message(
                topic, payload, incoming.received_at_ms, self._codecs, self.ts_window
            )
        except Exception as exc:  # a routing bug must not leave the message un-acked forever
            log.exception("routing failed on %s", _header_text(topic))
            out = unproducible(incoming, f"routing failed: {exc!r}")
        self._last_message_at = time.monotonic()
        self._inflight += 1
        self._idle.clear()
        self._send(incoming, out, ack, 0)
        return True

    def _send(
        self, incoming: Incoming, out: Outgoing, ack: Callable[[], None], attempt: int
    ) -> None:
        assert self._producer is not None
        try:
            self._producer.send(
                out.topic,
                out.key,
                out.value,
                out.headers,
                partial(self._delivered, incoming, out, ack, attempt),
            )
        except KafkaException as exc:  # refused at once, before any delivery report
            error = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
            if error is None:
                error = KafkaError(KafkaError._INVALID_ARG, str(exc))
            self._failed(incoming, out, ack, attempt, error)
        except (TypeError, ValueError) as exc:
            self._failed(incoming, out, ack, attempt, KafkaError(KafkaError._INVALID_ARG, str(exc)))

    def _delivered(
        self,
        incoming: Incoming,
        out: Outgoing,
        ack: Callable[[], None],
        attempt: int,
        err: KafkaError | None,
    ) -> None:
        """On the event loop, per delivery report: ack, or retry while Kafka is away."""
        if err is not None:
            self._failed(incoming, out, ack, attempt, err)
            return
        ack()
        now = time.time()
        self._ingest_ok_at = now
        self.timings.kafka_delivery.observe(now - incoming.received_at_ms / 1000)
        if out.canary_sent_at_ms is not None or out.topic == CANARY_TOPIC:
            self._canary_stored(out, now)
        elif out.reason is None:
            self.counters.accepted += 1
        else:
            self.counters.dead_letter(out.reason)
        self._finished_one()

    def _failed(
        self,
        incoming: Incoming,
        out: Outgoing,
        ack: Callable[[], None],
        attempt: int,
        err: KafkaError,
    ) -> None:
        if permanent_for_record(err) and not out.bounded:
            # No retry makes Kafka take it: dead-letter it bounded, and ack that.
            self.counters.unproducible += 1
            log.warning(
                "kafka refused a %d-byte record from %s (%s): dead-lettered bounded",
                len(out.value),
                _header_text(incoming.topic).decode(),
                err.name(),
            )
            self._send(incoming, unproducible(incoming, err.name()), ack, 0)
            return
        # Transient (Kafka away), or a bounded dead letter refused: a configuration fault an
        # operator must see; the message is kept (un-acked) meanwhile.
        self.counters.kafka_retries += 1
        if self.stopping.is_set():
            self._finished_one()  # left un-acked: the persistent session gets it again
            return
        delay = min(0.1 * 2**attempt, 5.0)
        log.warning("kafka delivery failed (%s); retrying in %.1fs", err, delay)
        asyncio.get_running_loop().call_later(delay, self._send, incoming, out, ack, attempt + 1)

    def _canary_stored(self, out: Outgoing, now: float) -> None:
        self.canary.received += 1
        self.canary.last_at = now
        self.canary.last_from = out.key.decode("utf-8", "replace")
        if out.canary_sent_at_ms is not None:
            self.canary.last_round_trip_ms = max(0.0, now * 1000 - out.canary_sent_at_ms)

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
        arrived: list[float] = []  # each pending PUBACK's message arrival (monotonic)
        puback = self.timings.puback

        def flush_acks() -> None:
            # All PUBACKs of one batch of delivery reports in one TLS write: a write (and a
            # syscall) per PUBACK was the largest single cost left. MQTT 5 lets a successful
            # PUBACK without properties be just the packet id (remaining length 2).
            packets = b"".join(b"\x40\x02" + mid.to_bytes(2, "big") for mid in pending)
            pending.clear()
            if client._connection is not None and not client._connection.is_closing():
                client._connection.send_package(packets)
                now = time.monotonic()
                for t in arrived:
                    puback.observe(now - t)
            arrived.clear()

        def queue_ack(mid: int, at: float) -> None:
            if not pending:
                asyncio.get_running_loop().call_soon(flush_acks)
            pending.append(mid)
            arrived.append(at)

        def on_qos1(mid: int, payload: bytes, topic: str, props: dict[str, Any]) -> None:
            self.accept(topic, payload, props, partial(queue_ack, mid, time.monotonic()))

        handler._handle_qos_1_publish_packet = on_qos1

    async def on_message(
        self, client: gmqtt.Client, topic: str, payload: bytes, qos: int, props: dict[str, Any]
    ) -> int:
        """QoS 0 and 2 (devices use 1): the same path, awaited through gmqtt's coroutine."""
        acked: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if not self.accept(topic, payload, props, partial(acked.set_result, 0)):
            raise RuntimeError("bridge stopping: message left to the broker")
        return await acked

    # --- subscriptions and health -------------------------------------------------------

    def _on_connect(
        self, client: gmqtt.Client, flags: int, rc: int, properties: dict[str, Any]
    ) -> None:
        """Every successful CONNACK, first or reconnect: subscribe again, session present or
        not (Mosquitto resumes the session but not its shared subscriptions after a restart;
        subscribing again to the same filter replaces the subscription, it does not add one)."""
        self.connected = True
        self._last_message_at = time.monotonic()  # the stall watch counts from here
        log.info("bridge %s connected (session present: %s)", self.client_id, bool(flags))
        coalesce_reads(client, self.config.read_coalesce_s)
        self._subscribe(client)

    def _on_disconnect(self, client: gmqtt.Client, packet: Any, exc: Any = None) -> None:
        self.connected = False
        self.subscribed = False
        if not self.stopping.is_set():  # else our own DISCONNECT: no reconnect follows
            log.warning("bridge %s disconnected; reconnecting", self.client_id)

    def _subscribe(self, client: gmqtt.Client) -> None:
        topics = subscriptions()
        # gmqtt keeps every subscribe in a list: replace ours rather than grow it per connect.
        client.subscriptions = [s for s in client.subscriptions if s.topic not in topics]
        self.subscribed = False
        self.counters.subscribes += 1
        self._subscribe_mid = client.subscribe([gmqtt.Subscription(t, qos=1) for t in topics])

    def _on_subscribe(
        self, client: gmqtt.Client, mid: int, codes: tuple[int, ...], properties: Any
    ) -> None:
        if mid != self._subscribe_mid:
            return
        self.subscribed = len(codes) == len(ROUTES) and all(code < 0x80 for code in codes)
        if self.subscribed:
            log.info("bridge %s subscribed: %s", self.client_id, subscriptions())
        else:
            log.error("bridge %s: subscription refused: %s", self.client_id, codes)

    async def _canary_forever(self, client: gmqtt.Client) -> None:
        """One canary a second through the shared subscription (see the module docstring)."""
        kinds = list(ROUTES)
        while True:
            await asyncio.sleep(CANARY_INTERVAL_S)
            if not (self.connected and client.is_connected):
                continue
            number = self.canary.sent
            topic = f"devices/{self.client_id}/{kinds[number % len(kinds)]}"
            payload = canary_payload(self.client_id, number, int(time.time() * 1000))
            client.publish(topic, payload, qos=1)
            self.canary.sent += 1

    async def _watch_forever(self, client: gmqtt.Client) -> None:
        """Connected but deaf: resubscribe; still deaf: exit non-zero (a fresh process heals)."""
        while not self.stopping.is_set():
            await asyncio.sleep(1.0)
            heal = self._watch.check(
                time.monotonic(), self._last_message_at, self.connected, self._inflight > 0
            )
            if heal is Heal.resubscribe:
                log.warning(
                    "bridge %s: nothing received for %.0fs while connected; subscribing again",
                    self.client_id,
                    STALE_AFTER_S,
                )
                self.counters.resubscribes_when_deaf += 1
                self._subscribe(client)
            elif heal is Heal.give_up:
                log.error("bridge %s: still receiving nothing; exiting", self.client_id)
                self.exit_code = EXIT_NOT_INGESTING
                self.stopping.set()

    def _write_status(self) -> None:
        write_status(
            self.status_path,
            {
                "client_id": self.client_id,
                "pid": os.getpid(),
                "connected": self.connected,
                "subscribed": self.subscribed,
                "ingest_ok_at": self._ingest_ok_at,
                "stale_after_s": STALE_AFTER_S,
                "written_at": time.time(),
                "inflight": self._inflight,
                **asdict(self.counters),
                "canary": asdict(self.canary),
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
            receive_maximum=self.config.mqtt_max_inflight,
        )
        client.on_message = self.on_message
        client.reconnect_delay = RECONNECT_DELAY_S
        self.install_late_ack(client)
        return client

    async def _connect(self, subscribe: bool) -> gmqtt.Client:
        """Schemas, the Kafka producer, then the MQTT session (resumed if it exists); with
        ``subscribe``, the shared subscriptions are made on this and every later connect."""
        loop = asyncio.get_running_loop()
        self.config.run_dir.mkdir(parents=True, exist_ok=True)
        self.start_kafka()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopping.set)
        files = self.config.identities
        cert, key = files.identity_cert(self.client_id), files.identity_key(self.client_id)
        if not cert.exists():
            raise RuntimeError(f"no certificate {cert} for {self.client_id}: run `fleet up`")
        tls = client_tls_context(files.ca_cert, cert, key)
        self._client = client = self._mqtt_client()
        if subscribe:
            client.on_connect = self._on_connect
            client.on_disconnect = self._on_disconnect
            client.on_subscribe = self._on_subscribe
        await client.connect(
            self.config.host, self.config.mqtt_port, ssl=tls, version=MQTTv50, keepalive=30
        )
        return client

    async def retire(self, quiet_s: float = 2.0, timeout: float = 600.0) -> bool:
        """Drain this replica's session into Kafka and end it (see the module's docstring).

        True once nothing arrived for ``quiet_s`` and everything that did is acked; False if
        ``timeout`` passed first (the session is then kept, to be retired again)."""
        client = await self._connect(subscribe=False)
        # Quiet counts from the connection: counted from start-up (schemas, producer: seconds
        # on a loaded machine) it was already "quiet" before the queued messages came, and the
        # session was ended with them in it.
        self._last_message_at = time.monotonic()
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

    async def run(self) -> int:
        """Bridge until SIGTERM (exit code 0), or until it finds itself deaf (non-zero)."""
        client = await self._connect(subscribe=True)
        reporter = asyncio.create_task(self._report_forever())
        helpers = [
            asyncio.create_task(self._canary_forever(client)),
            asyncio.create_task(self._watch_forever(client)),
        ]
        assert self._downlink_codec is not None

        def publish(out: MqttOut) -> None:
            client.publish(out.topic, out.payload, qos=out.qos)

        relay = DownlinkRelay(
            self.config.bootstrap_servers, self._downlink_codec, publish, self.downlink
        )
        downlink = asyncio.create_task(relay.run(self.stopping))
        await self.stopping.wait()
        for task in helpers:
            task.cancel()
        await downlink
        await self.shutdown(client)
        reporter.cancel()
        self.connected = self.subscribed = False
        self._write_status()
        return self.exit_code

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
        pending = self.close_kafka(timeout)
        await asyncio.sleep(0)  # let the last PUBACKs go out before DISCONNECT
        try:
            if session_expiry_s is None:
                await client.disconnect()
            else:
                await client.disconnect(session_expiry_interval=session_expiry_s)
        except OSError as exc:
            # The DISCONNECT is written before the TLS shutdown; a peer that still sends (an
            # UNSUBACK, a queued message) makes the shutdown raise APPLICATION_DATA_AFTER_
            # CLOSE_NOTIFY after the broker already has it.
            log.warning("bridge %s: TLS close after DISCONNECT: %s", self.client_id, exc)
        log.info("bridge stopped: %s (kafka pending: %d)", asdict(self.counters), pending)

    def close_kafka(self, timeout: float = 30.0) -> int:
        """Flush and close the producer; how many records were still pending."""
        assert self._producer is not None
        return self._producer.close(timeout)


def serve(
    config: BridgeConfig,
    replica: int = 0,
    retire: bool = False,
    expose: Callable[[Bridge], object] = lambda _bridge: None,
) -> int:
    """Run replica ``replica``; its exit code (non-zero if it found itself deaf). With
    ``retire``, drain and end its session instead (0 once retired, 1 if it could not be
    drained in time). `expose` serves its metrics. The entry point is
    infra/entrypoints/bridge.py."""
    bridge = Bridge(config, replica)
    if not retire:
        expose(bridge)
    if retire:
        return 0 if asyncio.run(bridge.retire()) else 1
    return asyncio.run(bridge.run())
