"""Ingest benchmark: bridge throughput beside a bare MQTT subscriber, on the same stream.

Both consumers hold persistent sessions with shared subscriptions in groups of their own, so one
publish run queues every message for both while they are offline. Each then connects and
drains its queue; the rate is the drain rate. The bridge's clock is the `received_at` it stamps
on every record (first to last), the bare subscriber's is its own first-to-last message time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import statistics
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import gmqtt
from confluent_kafka import Consumer
from gmqtt.mqtt.constants import MQTTv50

from infra.keys import key_passphrase
from infra.pki import CertificateAuthority
from infra.provision import load_or_provision
from infra.services.base import wait_until
from infra.services.mosquitto import BrokerFiles
from infra.settings import Settings
from infra.simulator.fleet import run_fleet
from infra.stack import Stack
from ingest.mqtt_client import client_tls_context
from schemas.codec import AvroCodec, Decoded, load_schema

BARE_CLIENT = "bench-bare"


@dataclass(frozen=True)
class Result:
    stage: str
    value: float
    unit: str
    baseline: float
    ratio: float

    def to_dict(self) -> dict[str, object]:
        return {
            "stage": self.stage,
            "value": round(self.value, 2),
            "unit": self.unit,
            "baseline": round(self.baseline, 2),
            "ratio": round(self.ratio, 3),
        }


class BareSubscriber:
    """The raw ceiling: receives from the broker, acks at once, does nothing else."""

    def __init__(self, settings: Settings) -> None:
        files = BrokerFiles(settings.state_dir / "mosquitto", settings.pki_dir)
        self.tls = client_tls_context(
            files.ca_cert, files.orchestrator_cert, files.orchestrator_key
        )
        self.settings = settings
        self.times: list[float] = []
        self.client = gmqtt.Client(
            BARE_CLIENT,
            clean_session=False,
            session_expiry_interval=3600,
            receive_maximum=settings.mqtt_max_inflight,
        )
        self.client.on_message = self._on_message

    def _on_message(self, *_args: object) -> int:
        self.times.append(time.perf_counter())
        return 0

    async def connect(self, subscribe: bool) -> None:
        await self.client.connect(
            self.settings.host, self.settings.mqtt_port, ssl=self.tls, version=MQTTv50
        )
        if subscribe:
            self.client.subscribe("$share/bare/devices/+/telemetry", qos=1)

    async def disconnect(self) -> None:
        # The broker may still be sending (queued messages) as the TLS session closes.
        with contextlib.suppress(ssl.SSLError):
            await self.client.disconnect()


async def _prime_bare(settings: Settings) -> None:
    """Register the bare subscriber's persistent session and subscription, then go offline."""
    bare = BareSubscriber(settings)
    await bare.connect(subscribe=True)
    await asyncio.sleep(0.5)  # let the SUBACK land before leaving (one-off set-up, not timing)
    await bare.disconnect()


async def _drain_bare(settings: Settings, expected: int, timeout: float) -> float:
    bare = BareSubscriber(settings)
    await bare.connect(subscribe=False)
    deadline = time.monotonic() + timeout
    while len(bare.times) < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await bare.disconnect()
    if len(bare.times) < expected:
        raise RuntimeError(f"bare subscriber got {len(bare.times)} of {expected}")
    return (expected - 1) / (bare.times[expected - 1] - bare.times[0])


def _bridge_records(settings: Settings, prefix: str, expected: int, timeout: float) -> list[bytes]:
    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": f"bench-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe(["telemetry.raw"])
    values: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(values) < expected and time.monotonic() < deadline:
        for msg in consumer.consume(1000, 0.5):
            if msg.error() is None and (msg.key() or b"").startswith(prefix.encode()):
                values.append(msg.value() or b"")
    consumer.close()
    return values


def run(settings: Settings, devices: int = 500, messages: int = 200) -> list[Result]:
    # 100k messages: a drain of a few seconds, long enough that scheduling noise on a shared
    # 2-core machine does not decide the ratio (20k-message drains swung from 0.34 to 0.81).
    stack = Stack(settings)
    stack.up()
    ca = CertificateAuthority.load_or_create(settings.pki_dir, passphrase=key_passphrase(settings))
    prefix = f"bench{uuid.uuid4().hex[:4]}"
    creds = load_or_provision(
        ca,
        [f"{prefix}-{i:04d}" for i in range(devices)],
        settings.state_dir / "bench-devices",
        "ec",
    )
    asyncio.run(_prime_bare(settings))
    for bridge in stack.bridges:  # their persistent sessions queue the run meanwhile
        bridge.stop()
    stats, fleet = asyncio.run(
        run_fleet(
            settings, creds, rate=1000, duration=120, max_messages=messages, drain_timeout=120
        )
    )
    expected = devices * messages
    if stats.acked < expected:
        raise RuntimeError(f"publisher got {stats.acked} acks of {expected}")
    json_bytes = statistics.fmean(
        len(
            json.dumps(
                {"seq": 1, "ts": int(time.time() * 1000), **d.model.reading(d.rng, 1, time.time())}
            ).encode()
        )
        for d in fleet[:50]
    )
    bare_rate = asyncio.run(_drain_bare(settings, expected, timeout=300))
    for bridge in stack.bridges:
        bridge.launch()
    for bridge in stack.bridges:
        bridge.wait_ready(settings.startup_timeout_s)
    values = _bridge_records(settings, prefix, expected, timeout=300)
    if len(values) < expected:
        raise RuntimeError(f"bridge delivered {len(values)} of {expected}")
    codec = AvroCodec(load_schema("Telemetry"), int.from_bytes(values[0][1:5], "big"))
    stamps = sorted(
        r.record["received_at"] for v in values if isinstance(r := codec.decode(v), Decoded)
    )
    bridge_rate = (len(stamps) - 1) / max((stamps[-1] - stamps[0]) / 1000.0, 1e-3)
    avro_bytes = statistics.fmean(len(v) for v in values)
    wait_until(lambda: all(b.ready() for b in stack.bridges), 10)
    replicas = len(stack.bridges)
    bridges = "1 bridge" if replicas == 1 else f"{replicas} bridge replicas"
    results = [
        Result(
            f"ingest: {bridges} MQTT->Kafka (baseline: bare MQTT subscriber, 1 connection)",
            bridge_rate,
            "msgs/s",
            bare_rate,
            bridge_rate / bare_rate,
        ),
        Result(
            "ingest: bytes per message, Avro in Kafka (baseline: device JSON)",
            avro_bytes,
            "bytes",
            json_bytes,
            avro_bytes / json_bytes,
        ),
    ]
    return results if replicas == 1 else results[:1]


def bench_settings(root: Path) -> Settings:
    return Settings(
        state_dir=root,
        kafka_port=39092,
        registry_port=38081,
        registry_management_port=39001,
        mqtt_port=38883,
        query_port=38124,
        jobs_web_port=36066,
        metrics_port=39400,
        prometheus_port=39390,
        mqtt_max_queued=1_000_000,  # each offline consumer queues the whole run
    )
