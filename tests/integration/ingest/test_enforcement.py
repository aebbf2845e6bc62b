"""The registry drives the broker: a revoked or suspended device's open session ends within
seconds and it is refused at connect; a device reinstated from suspended connects again."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from confluent_kafka import Producer
from confluent_kafka.schema_registry import SchemaRegistryClient
from cryptography import x509

from infra.entrypoints.enforcer import build_enforcer
from infra.pki import CertificateAuthority, cert_fingerprint_sha256
from infra.services.base import wait_until
from infra.settings import Settings
from infra.stack import Stack
from ingest.enforcement import DEVICES, Enforcer
from schemas.codec import CodecRegistry, load_schema
from schemas.identity import RevocationState
from streams.registry.devices import DeviceStatus
from tests.conftest import DeviceIdentity
from tests.support.mqtt import MqttSession, connect
from tests.support.records import device_record

KICK_DEADLINE_S = 10.0  # the issue asks for "within seconds"; measured well under one

WriteStatus = Callable[[DeviceIdentity, str], float]


@pytest.fixture
def write_status(stack: Stack, settings: Settings) -> Iterator[WriteStatus]:
    """Writes a device's registry record with a status; returns when Kafka has it."""
    registry = CodecRegistry(SchemaRegistryClient({"url": settings.registry_url}))
    codec = registry.codec(DEVICES, load_schema("Device"))
    producer = Producer(
        {"bootstrap.servers": settings.bootstrap_servers, "acks": "all", "linger.ms": 0}
    )

    def write(device: DeviceIdentity, status: str) -> float:
        cert = x509.load_pem_x509_certificate(device.cert.read_bytes())
        now = int(time.time() * 1000)
        record = device_record(
            device.device_id,
            group="enforced",
            status=DeviceStatus(status),
            cert_serial=str(device.serial),
            cert_fingerprint=cert_fingerprint_sha256(cert),
            created_ms=now,
            updated_ms=now,
        )
        producer.produce(DEVICES, key=device.device_id, value=codec.encode(record.to_record()))
        assert producer.flush(10) == 0
        return time.monotonic()

    yield write
    producer.flush(10)


@pytest.fixture
def enforcer(stack: Stack, settings: Settings) -> Iterator[Enforcer]:
    """An Enforcer running in a thread, as `python -m infra.entrypoints.enforcer` would."""
    runner = build_enforcer(settings)
    stopping = threading.Event()
    failures: list[BaseException] = []

    def run() -> None:
        try:
            runner.run(stopping)
        except BaseException as exc:
            failures.append(exc)
            raise

    thread = threading.Thread(target=run, name="enforcer", daemon=True)
    thread.start()
    assert wait_until(lambda: runner.ready or bool(failures), timeout=60)
    assert not failures, failures
    yield runner
    stopping.set()
    thread.join(30)
    assert not thread.is_alive()
    assert not failures, failures


@dataclass(frozen=True)
class Enforced:
    """A running enforcer between the registry (written with `write_status`) and the broker."""

    settings: Settings
    ca: CertificateAuthority
    enforcer: Enforcer
    write_status: WriteStatus
    make_device: Callable[..., DeviceIdentity]

    def device(self) -> DeviceIdentity:
        return self.make_device("enf")

    def connect(self, device: DeviceIdentity, client_id: str | None = None) -> MqttSession | None:
        """A session of ``device`` (asking for ``client_id``, else its own id), or None."""
        return connect(
            self.settings, device.cert, device.key, client_id or device.device_id, timeout=5
        )


@pytest.fixture
def enforced(
    settings: Settings,
    ca: CertificateAuthority,
    make_device: Callable[..., DeviceIdentity],
    write_status: WriteStatus,
    enforcer: Enforcer,
) -> Enforced:
    return Enforced(settings, ca, enforcer, write_status, make_device)


def _ended_within(sessions: list[MqttSession], since: float) -> float:
    """Seconds from `since` until the broker ended every session (fails past the deadline)."""
    deadline = since + KICK_DEADLINE_S
    for session in sessions:
        ended = session.disconnected.wait(max(0.0, deadline - time.monotonic()))
        assert ended, "a session outlived the deadline"
    elapsed = time.monotonic() - since
    for session in sessions:
        session.client.loop_stop()  # no automatic reconnect of the old client
    return elapsed


def test_a_revoked_device_is_disconnected_and_refused(enforced: Enforced) -> None:
    device = enforced.device()
    enforced.write_status(device, "active")
    # A client id of its choosing: the broker names it by its certificate, and so does the kick.
    session = enforced.connect(device, f"any-{uuid.uuid4().hex[:8]}")
    assert session is not None
    assert session.publish(f"devices/{device.device_id}/telemetry", b"{}").value < 128

    written = enforced.write_status(device, "revoked")
    elapsed = _ended_within([session], written)
    print(f"\nrevoked: sessions ended {elapsed:.3f}s after the registry write")

    assert enforced.ca.revocation_states()[device.serial] is RevocationState.revoked
    # The CRL was reloaded before the kick: the very first reconnect is refused.
    assert enforced.connect(device) is None
    assert enforced.enforcer.counters.sessions_ended >= 1
    assert enforced.enforcer.counters.last_end_latency_ms is not None


def test_a_suspended_device_is_refused_until_reinstated(enforced: Enforced) -> None:
    device, bystander = enforced.device(), enforced.device()
    enforced.write_status(device, "active")
    enforced.write_status(bystander, "active")
    session = enforced.connect(device)
    other = enforced.connect(bystander)
    assert session is not None
    assert other is not None

    written = enforced.write_status(device, "suspended")
    elapsed = _ended_within([session], written)
    print(f"\nsuspended: session ended {elapsed:.3f}s after the registry write")
    assert enforced.ca.revocation_states()[device.serial] is RevocationState.on_hold
    assert enforced.connect(device) is None
    # Only the suspended device was touched.
    assert not other.disconnected.is_set()
    assert other.publish(f"devices/{bystander.device_id}/telemetry", b"{}").value < 128

    written = enforced.write_status(device, "active")

    # The hold is lifted (and the broker signalled right after) ...
    def lifted() -> bool:
        return device.serial not in enforced.ca.revocation_states()

    assert wait_until(lifted, KICK_DEADLINE_S, interval=0.01)
    released = time.monotonic() - written
    back: list[MqttSession] = []

    def reconnects() -> bool:
        again = enforced.connect(device)
        if again is not None:
            back.append(again)
        return again is not None

    # ... and the device gets in again.
    assert wait_until(reconnects, timeout=KICK_DEADLINE_S, interval=0.05)
    print(
        f"reinstated: hold lifted {released:.3f}s after the write, "
        f"connected {time.monotonic() - written:.3f}s after it"
    )
    try:
        assert back[0].publish(f"devices/{device.device_id}/telemetry", b"{}").value < 128
        assert not back[0].disconnected.is_set()  # a reinstated device is not kicked again
    finally:
        back[0].close()
        other.close()


def test_a_revoked_device_cannot_come_back(enforced: Enforced) -> None:
    device = enforced.device()
    enforced.write_status(device, "revoked")
    assert wait_until(lambda: enforced.ca.is_revoked(device.serial), timeout=KICK_DEADLINE_S)
    enforced.write_status(device, "active")  # the registry refuses this transition; the broker too
    assert wait_until(lambda: device.device_id in enforced.enforcer.state.stuck, timeout=10)
    assert enforced.ca.revocation_states()[device.serial] is RevocationState.revoked
    assert enforced.connect(device) is None
