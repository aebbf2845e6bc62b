"""Hot-path benchmark: MQTT publish -> alert on `alerts`, and desired-set -> device receives.

Lean devices (bench/loadgen.py: real certificates and mTLS, pre-framed QoS 1 PUBLISH) offer a
steady load of about 6,000 msgs/s while a rule flaps on a noisy metric (vibration_rms two
standard deviations above its mean, no hysteresis band: about one reading in 20 is a
transition), so alerts flow all the time. A read-committed consumer (what an alerting
consumer sees) stamps each `alerts` record and each `telemetry.raw` record on arrival:

- publish -> alert: arrival of the alert minus the device time of the reading that raised or
  resolved it; baseline: publish -> the same kind of consumer seeing the telemetry record
  itself (what any Kafka consumer of the platform waits anyway).
- desired-set -> device: a few measurement devices subscribe to their desired topic; rounds of
  desired changes go through `twin.desired`, the hot worker, `mqtt.downlink` and the bridge;
  baseline: the orchestrator publishing straight to the same devices over MQTT (the broker
  hop alone).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import gmqtt
from confluent_kafka import Consumer, Message, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient
from gmqtt.mqtt.constants import MQTTv50

from bench.ingest import Result
from bench.loadgen import offer_load
from infra.api.client import HotPathClient
from infra.keys import key_passphrase
from infra.pki import CertificateAuthority
from infra.provision import DeviceCredentials, load_or_provision, register
from infra.services.base import wait_until
from infra.services.mosquitto import BrokerFiles
from infra.settings import Settings
from infra.stack import Stack
from ingest.mqtt_client import client_tls_context
from schemas.codec import CodecRegistry, Decoded, load_schema
from schemas.topics import schema_of
from streams.hot.alerts import AlertRule, RuleKind, ScopeType
from streams.registry.rbac import Resource


def quantile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan  # nothing measured: say so rather than fail the whole run
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Arrivals:
    """(arrival ms, topic, value) of every record, decoded after the run."""

    records: list[tuple[float, str, bytes]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)


UNCOMMITTED = "alerts (read_uncommitted)"


def _collect(
    settings: Settings,
    arrivals: Arrivals,
    ready: threading.Event,
    isolation: str = "read_committed",
    topics: Sequence[str] = ("alerts", "telemetry.raw"),
) -> None:
    """Stamp each record of ``topics`` as a consumer of ``isolation`` gets it. A
    read_uncommitted consumer's records are labelled UNCOMMITTED."""
    label = UNCOMMITTED if isolation == "read_uncommitted" else None

    def stamp(now: float, msg: Message) -> None:
        arrivals.records.append((now, label or msg.topic() or "", msg.value() or b""))

    stamp_new_records(settings, "bench-hot", isolation, topics, ready, arrivals.stop, stamp)


def stamp_new_records(
    settings: Settings,
    group: str,
    isolation: str,
    topics: Sequence[str],
    ready: threading.Event,
    stop: threading.Event,
    stamp: Callable[[float, Message], None],
) -> None:
    """Read ``topics`` from their current end as a new consumer of ``isolation`` (group
    ``group-<uuid>``), set ``ready`` once assigned, and hand ``stamp`` each record with the
    ms it arrived at, until ``stop`` is set."""
    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": f"{group}-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "isolation.level": isolation,
            "fetch.wait.max.ms": 10,
        }
    )
    tps = []
    for topic in topics:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        for p in meta.partitions:
            _, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            tps.append(TopicPartition(topic, p, high))
    consumer.assign(tps)
    ready.set()
    while not stop.is_set():
        msg = consumer.poll(0.1)  # one at a time: each stamped as it is handed over
        if msg is not None and msg.error() is None:
            stamp(time.time() * 1000, msg)
    consumer.close()


class MeasuringDevice:
    """A device that only notes when its desired updates and direct messages arrive."""

    def __init__(self, creds: DeviceCredentials, settings: Settings) -> None:
        self.creds = creds
        self.settings = settings
        self.desired: dict[int, float] = {}  # round -> arrival ms
        self.direct: dict[int, float] = {}
        self.client = gmqtt.Client(f"{creds.device_id}", clean_session=True)
        self.client.on_message = self._on_message

    def _on_message(self, _c: object, topic: str, payload: bytes, _qos: int, _p: object) -> int:
        now = time.time() * 1000
        body = json.loads(payload)
        if topic.endswith("/state/desired"):
            self.desired.setdefault(int(body["state"]["bench_round"]), now)
        else:
            self.direct.setdefault(int(body["round"]), now)
        return 0

    async def connect(self) -> None:
        tls = client_tls_context(self.creds.ca_path, self.creds.cert_path, self.creds.key_path)
        await self.client.connect(
            self.settings.host, self.settings.mqtt_port, ssl=tls, version=MQTTv50
        )
        device = self.creds.device_id
        self.client.subscribe(
            [
                gmqtt.Subscription(f"devices/{device}/state/desired", qos=1),
                gmqtt.Subscription(f"devices/{device}/bench/direct", qos=1),
            ]
        )


async def _measure_desired(
    settings: Settings,
    creds: Sequence[DeviceCredentials],
    rounds: int,
    sent: dict[str, dict[int, float]],
) -> list[MeasuringDevice]:
    devices = [MeasuringDevice(c, settings) for c in creds]
    for device in devices:
        await device.connect()
    files = BrokerFiles(settings.state_dir / "mosquitto", settings.pki_dir)
    orchestrator = gmqtt.Client(f"bench-orchestrator-{uuid.uuid4().hex[:6]}")
    await orchestrator.connect(
        settings.host,
        settings.mqtt_port,
        ssl=client_tls_context(files.ca_cert, files.orchestrator_cert, files.orchestrator_key),
        version=MQTTv50,
    )
    await asyncio.sleep(1.0)  # SUBACKs land (set-up, not a measurement)
    client = HotPathClient(settings)
    loop = asyncio.get_running_loop()
    for r in range(rounds):
        sent["desired"][r] = time.time() * 1000
        patches = {d.creds.device_id: {"bench_round": r} for d in devices}
        await loop.run_in_executor(None, client.set_desired_many, patches)
        sent["direct"][r] = time.time() * 1000
        for d in devices:
            topic = f"devices/{d.creds.device_id}/bench/direct"
            orchestrator.publish(topic, json.dumps({"round": r}).encode(), qos=1)
        await asyncio.sleep(1.0)  # pacing between rounds
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(
        len(d.desired) == rounds and len(d.direct) == rounds for d in devices
    ):
        await asyncio.sleep(0.1)
    client.close()
    for d in devices:
        with contextlib.suppress(ssl.SSLError):
            await d.client.disconnect()
    await orchestrator.disconnect()
    return devices


@dataclass
class Latencies:
    alert_ms: list[float] = field(default_factory=list)  # publish -> alert record
    telemetry_ms: list[float] = field(default_factory=list)  # publish -> telemetry record
    # telemetry record -> the alert it raised or resolved: the hot worker's own share
    worker_ms: list[float] = field(default_factory=list)
    # publish -> alert record, seen by a read_uncommitted consumer (before the commit)
    uncommitted_ms: list[float] = field(default_factory=list)


def _latencies(
    records: list[tuple[float, str, bytes]], settings: Settings, prefix: str
) -> Latencies:
    registry = CodecRegistry(SchemaRegistryClient({"url": settings.registry_url}))
    alerts = registry.codec("alerts", load_schema(schema_of("alerts")))
    telemetry = registry.codec("telemetry.raw", load_schema(schema_of("telemetry.raw")))
    out = Latencies()
    seen: dict[tuple[str, int], float] = {}  # (device, seq) -> telemetry record's arrival
    raised: list[tuple[float, tuple[str, int]]] = []
    for arrived, topic, value in records:
        codec = telemetry if topic == "telemetry.raw" else alerts
        decoded = codec.decode(value)
        if not isinstance(decoded, Decoded):
            continue
        record = decoded.record
        device = str(record["device_id"])
        if not device.startswith(prefix):
            continue
        latency = arrived - int(record["ts"])
        if topic == UNCOMMITTED:
            out.uncommitted_ms.append(latency)
        elif topic == "alerts":
            out.alert_ms.append(latency)
            raised.append((arrived, (device, int(record["seq"]))))
        else:
            out.telemetry_ms.append(latency)
            seen[(device, int(record["seq"]))] = arrived
    out.worker_ms = [arrived - seen[key] for arrived, key in raised if key in seen]
    return out


def _quantile_row(
    q: float,
    name: str,
    what: str,
    values: Sequence[float],
    baseline: str,
    baseline_values: Sequence[float],
) -> Result:
    """One latency quantile beside the same quantile of its baseline, in milliseconds."""
    value, base = quantile(values, q), quantile(baseline_values, q)
    return Result(
        f"hot: {name} {what} (baseline: {name} {baseline})",
        value,
        "ms",
        base,
        value / max(base, 1.0),
    )


@dataclass(frozen=True)
class FlapFleet:
    """The stack, bench devices registered in one group, and the CA that issued them."""

    stack: Stack
    ca: CertificateAuthority
    prefix: str
    creds: list[DeviceCredentials]


def flap_fleet(settings: Settings, tag: str, devices: int) -> FlapFleet:
    """Start the stack, provision and register ``devices`` devices in a fresh group, put a rule
    on the group (vibration above 1.0, so readings flap) and wait until the hot job holds it."""
    stack = Stack(settings)
    stack.up()
    ca = CertificateAuthority.load_or_create(settings.pki_dir, passphrase=key_passphrase(settings))
    prefix = f"{tag}{uuid.uuid4().hex[:4]}-"
    group = f"{prefix}group"
    creds = load_or_provision(
        ca, [f"{prefix}{i:04d}" for i in range(devices)], settings.state_dir / "bench-devices", "ec"
    )
    client = HotPathClient(settings)
    register(client, creds, "bench", "bench", group)
    rule = AlertRule(
        f"{prefix}flap",
        ScopeType.group,
        str(Resource("bench", "bench", group)),
        "vibration_rms",
        RuleKind.above,
        threshold=1.0,
    )
    client.put_rule(rule)
    client.close()
    wait_until(lambda: rule.rule_id in stack.hot_worker.counters().get("rules", []), timeout=60)
    return FlapFleet(stack, ca, prefix, creds)


def run_hot(
    settings: Settings,
    devices: int = 100,
    rate: float = 60.0,
    duration: float = 30.0,
    measuring_devices: int = 20,
    rounds: int = 10,
) -> list[Result]:
    fleet = flap_fleet(settings, "hotb", devices)
    prefix, creds = fleet.prefix, fleet.creds
    probes = load_or_provision(
        fleet.ca,
        [f"{prefix}probe{i:03d}" for i in range(measuring_devices)],
        settings.state_dir / "bench-devices",
        "ec",
    )

    arrivals = Arrivals()
    ready, early = threading.Event(), threading.Event()
    collector = threading.Thread(target=_collect, args=(settings, arrivals, ready))
    # What an alerting consumer that reads uncommitted sees (see README: before the commit).
    early_arrivals = Arrivals(stop=arrivals.stop)
    early_collector = threading.Thread(
        target=_collect,
        args=(settings, early_arrivals, early, "read_uncommitted", ("alerts",)),
    )
    collector.start()
    early_collector.start()
    ready.wait(30)
    early.wait(30)
    sent: dict[str, dict[int, float]] = {"desired": {}, "direct": {}}
    measured: list[list[MeasuringDevice]] = []

    def desired_rounds() -> None:
        time.sleep(duration / 4)  # under load, not during connect storms
        measured.append(asyncio.run(_measure_desired(settings, probes, rounds, sent)))

    prober = threading.Thread(target=desired_rounds)
    prober.start()
    load = asyncio.run(offer_load(settings, creds, rate, duration))
    offered = load.offered_rate
    prober.join(timeout=120)
    time.sleep(2.0)  # the tail of the run reaches the collector
    arrivals.stop.set()
    collector.join(timeout=30)
    early_collector.join(timeout=30)

    latencies = _latencies(arrivals.records + early_arrivals.records, settings, prefix)
    alert_ms, telemetry_ms = latencies.alert_ms, latencies.telemetry_ms
    probed = measured[0] if measured else []
    desired_ms = [d.desired[r] - sent["desired"][r] for d in probed for r in d.desired]
    direct_ms = [d.direct[r] - sent["direct"][r] for d in probed for r in d.direct]
    load_text = f"{offered:,.0f} msgs/s, {len(alert_ms)} alerts"
    rows = (
        (f"publish->alert on `alerts` at {load_text}", alert_ms,
         "publish->telemetry record", telemetry_ms),
        (f"publish->alert seen by a read_uncommitted consumer at {load_text}",
         latencies.uncommitted_ms, "publish->telemetry record", telemetry_ms),
        (f"telemetry record->alert record, the hot worker's share, at {load_text}",
         latencies.worker_ms, "publish->telemetry record, the ingest's share", telemetry_ms),
        ("desired-set->device under load", desired_ms,
         "orchestrator MQTT publish->device", direct_ms),
    )  # fmt: skip
    results = [
        _quantile_row(q, name, what, values, baseline, baseline_values)
        for what, values, baseline, baseline_values in rows
        for q, name in ((0.5, "p50"), (0.99, "p99"))
    ]
    results.append(
        Result(
            "hot: alerts per second emitted (baseline: telemetry msgs/s offered)",
            len(alert_ms) / max(duration, 1e-3),
            "alerts/s",
            offered,
            len(alert_ms) / max(duration, 1e-3) / max(offered, 1e-3),
        )
    )
    return results
