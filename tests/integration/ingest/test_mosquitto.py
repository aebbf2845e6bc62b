"""Mosquitto with per-device mTLS: identity from the certificate, ACL, CA and CRL checks."""

from __future__ import annotations

import asyncio
import json
import random
import re
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from infra.pki import CertificateAuthority
from infra.provision import provision_device
from infra.services.base import wait_until
from infra.services.bridge import BridgeService
from infra.settings import Settings
from infra.simulator.device import SimulatedDevice
from infra.simulator.stats import FleetStats
from infra.stack import Stack
from ingest.envelope import MAX_PAYLOAD_BYTES
from ingest.mqtt_client import DYNSEC_TOPIC
from schemas.identity import BRIDGE_IDENTITIES
from tests.conftest import DeviceIdentity
from tests.support.kafka import collect_keyed
from tests.support.mqtt import (
    BrokerLog,
    MqttSession,
    connect,
    connect_device,
    publish_telemetry,
)

NOT_AUTHORIZED = 135


def _orchestrator(stack: Stack, settings: Settings):  # type: ignore[no-untyped-def]
    files = stack.mosquitto.files
    session = connect(
        settings, files.orchestrator_cert, files.orchestrator_key, f"orch-{uuid.uuid4().hex[:8]}"
    )
    assert session is not None
    return session


def test_a_device_publishes_only_under_its_own_topics(
    stack: Stack, settings: Settings, make_device: Callable[..., DeviceIdentity]
) -> None:
    device, other = make_device(), make_device()
    watcher = _orchestrator(stack, settings)
    # Both devices' subtrees (not `devices/#`, which also carries the bridges' canaries).
    for watched in (device, other):
        assert watcher.subscribe(f"devices/{watched.device_id}/#")[0].value < 128
    session = connect_device(settings, device)
    try:
        own = session.publish(f"devices/{device.device_id}/telemetry", b'{"seq": 1}')
        foreign = session.publish(f"devices/{other.device_id}/telemetry", b'{"seq": 1}')
        outside = session.publish("fleet/broadcast", b"x")
        assert own.value < 128
        assert foreign.value == NOT_AUTHORIZED
        assert outside.value == NOT_AUTHORIZED
        # Only the message under its own topic reaches a subscriber.
        received = watcher.wait_for_messages(1)
        assert wait_until(lambda: len(watcher.received) >= 1, timeout=5)
        assert [m.topic for m in received] == [f"devices/{device.device_id}/telemetry"]
    finally:
        session.close()
        watcher.close()


def test_a_device_never_receives_another_devices_messages(
    settings: Settings, make_device: Callable[..., DeviceIdentity]
) -> None:
    # The foreign filter is refused at SUBSCRIBE (our plugin); the read ACL at delivery stays a
    # second line: nothing of the other device is delivered.
    spy, other = make_device(), make_device()
    spy_session = connect_device(settings, spy)
    other_session = connect_device(settings, other)
    try:
        assert spy_session.subscribe(f"devices/{other.device_id}/#")[0].value == NOT_AUTHORIZED
        spy_session.subscribe(f"devices/{spy.device_id}/#")
        assert other_session.publish(f"devices/{other.device_id}/telemetry", b"secret").value < 128
        # The other device's message was routed before this PUBACK: a sentinel on the spy's own
        # topic arriving proves the broker already decided about the secret.
        assert spy_session.publish(f"devices/{spy.device_id}/sentinel", b"s").value < 128
        received = spy_session.wait_for_messages(1)
        assert [m.topic for m in received] == [f"devices/{spy.device_id}/sentinel"]
    finally:
        spy_session.close()
        other_session.close()


def test_a_certificate_from_another_ca_is_refused(
    stack: Stack, settings: Settings, tmp_path: Path
) -> None:
    rogue_ca = CertificateAuthority.load_or_create(
        tmp_path / "rogue-ca", name="rogue CA", passphrase=b"test-passphrase"
    )
    rogue = provision_device(rogue_ca, "rogue-1", tmp_path / "rogue", "ec")
    session = connect(settings, rogue.cert_path, rogue.key_path, "rogue-1")
    assert session is None


def test_a_revoked_certificate_is_refused_after_the_crl_reload(
    stack: Stack,
    settings: Settings,
    ca: CertificateAuthority,
    make_device: Callable[..., DeviceIdentity],
) -> None:
    device = make_device()
    connect_device(settings, device).close()

    ca.revoke(device.serial, reason="test")
    stack.mosquitto.reload()

    def refused() -> bool:
        session = connect(settings, device.cert, device.key, device.device_id, timeout=3)
        if session is None:
            return True
        session.close()
        return False

    assert wait_until(refused, timeout=20, interval=0.5)
    # A valid device still gets in after the reload.
    still_fine = make_device()
    connect_device(settings, still_fine).close()


# --------------------------------------------------------------------------- client ids


def _telemetry(seq: int) -> bytes:
    return json.dumps({"seq": seq, "ts": int(time.time() * 1000), "temperature": 21.5}).encode()


def _intrude(
    settings: Settings, attacker: DeviceIdentity, victim_id: str, log: BrokerLog
) -> MqttSession:
    """``attacker`` connects asking for ``victim_id`` (keeping any session under it)."""
    session = connect(settings, attacker.cert, attacker.key, victim_id, clean_start=False)
    assert session is not None
    try:
        # No session to resume: the victim's (live, or the bridge's persistent one) stays its own.
        assert not session.session_present
        # The broker named the connection after the certificate, not after the id it asked for.
        assert wait_until(lambda: bool(log.client_ids(attacker.device_id)), timeout=5)
        assert log.client_ids(attacker.device_id) == [attacker.device_id]
    except BaseException:
        session.close()
        raise
    return session


def test_a_device_cannot_disconnect_another_by_using_its_client_id(
    stack: Stack, settings: Settings, make_device: Callable[..., DeviceIdentity]
) -> None:
    victim, attacker = make_device(), make_device("atk")
    log = BrokerLog(stack.mosquitto.log_path)
    session = connect_device(settings, victim)
    intruder = _intrude(settings, attacker, victim.device_id, log)
    try:
        # The victim's connection is left alone (a takeover would close it at once) ...
        assert not session.disconnected.wait(2)
        assert victim.device_id not in log.taken_over()
        # ... and both publish, each under its own topics only.
        topic = f"devices/{victim.device_id}/telemetry"
        assert session.publish(topic, _telemetry(1)).value < 128
        assert (
            intruder.publish(f"devices/{attacker.device_id}/telemetry", _telemetry(1)).value < 128
        )
        assert intruder.publish(topic, _telemetry(2)).value == NOT_AUTHORIZED
        assert not session.disconnected.is_set()
        assert not intruder.disconnected.is_set()
    finally:
        intruder.close()
        session.close()


def test_a_device_cannot_disconnect_a_platform_client(
    stack: Stack, settings: Settings, make_device: Callable[..., DeviceIdentity]
) -> None:
    log = BrokerLog(stack.mosquitto.log_path)
    files = stack.mosquitto.files
    asked = f"orch-{uuid.uuid4().hex[:8]}"
    watcher = connect(settings, files.orchestrator_cert, files.orchestrator_key, asked)
    assert watcher is not None
    # One device asks for the id the platform client asked for, one for its identity's name.
    attackers = [make_device("atk"), make_device("atk")]
    # The attackers' topics only: `devices/#` also carries the bridges' canaries.
    for attacker in attackers:
        assert watcher.subscribe(f"devices/{attacker.device_id}/#")[0].value < 128
    intruders = [
        _intrude(settings, attacker, victim_id, log)
        for attacker, victim_id in zip(attackers, (asked, "orchestrator"), strict=True)
    ]
    try:
        assert not watcher.disconnected.wait(2)
        assert not {asked, "orchestrator"} & set(log.taken_over())
        for attacker, intruder in zip(attackers, intruders, strict=True):
            topic = f"devices/{attacker.device_id}/telemetry"
            assert intruder.publish(topic, _telemetry(1)).value < 128
        received = watcher.wait_for_messages(2)
        assert {m.topic.split("/")[1] for m in received} == {a.device_id for a in attackers}
        assert not watcher.disconnected.is_set()
    finally:
        for intruder in intruders:
            intruder.close()
        watcher.close()


def test_a_device_cannot_take_over_the_bridges_session(
    stack: Stack, settings: Settings, make_device: Callable[..., DeviceIdentity]
) -> None:
    attacker, device = make_device("atk"), make_device()
    log = BrokerLog(stack.mosquitto.log_path)
    bridge_id = stack.bridge.name  # the bridge's client id: "bridge-0"
    intruder = _intrude(settings, attacker, bridge_id, log)
    try:
        # The bridge keeps its connection and its session, and goes on ingesting.
        publish_telemetry(settings, device, [_telemetry(1)])
        stored = collect_keyed(settings, "telemetry.raw", device.device_id, 1)
        assert len(stored) == 1
        assert bridge_id not in log.taken_over()
        assert not intruder.disconnected.is_set()
    finally:
        intruder.close()


def test_two_bridge_replicas_run_side_by_side(
    stack: Stack, settings: Settings, make_device: Callable[..., DeviceIdentity]
) -> None:
    """Each replica has its own identity, so neither takes the other's connection over."""
    log = BrokerLog(stack.mosquitto.log_path)
    started = None if len(stack.bridges) >= 2 else BridgeService(settings, 1)
    replicas = [stack.bridges[0], started or stack.bridges[1]]
    if started is not None:
        started.start(settings.startup_timeout_s)
    try:
        before = [replica.counters().get("accepted", 0) for replica in replicas]
        device = make_device()
        publish_telemetry(settings, device, (_telemetry(seq) for seq in range(1, 41)))
        stored = collect_keyed(settings, "telemetry.raw", device.device_id, 40)
        assert len(stored) == 40
        # The shared subscription hands messages out in turn: both replicas took some.
        assert wait_until(
            lambda: all(
                replica.counters().get("accepted", 0) > count
                for replica, count in zip(replicas, before, strict=True)
            ),
            timeout=10,
        )
        assert all(replica.counters().get("connected") for replica in replicas)
        assert not {r.name for r in replicas} & set(log.taken_over())
    finally:
        if started is not None:
            started.stop()
            # Its persistent session would go on taking its turn of the uplinks into a queue
            # nobody reads: end it (a clean start with no expiry, under its own identity).
            files = stack.mosquitto.files
            leftover = connect(
                settings,
                files.identity_cert(started.name),
                files.identity_key(started.name),
                started.name,
                clean_start=True,
            )
            assert leftover is not None
            leftover.close()


# --------------------------------------------------------------------------- subscribe ACL


def test_a_device_may_subscribe_only_within_its_own_subtree(
    stack: Stack, settings: Settings, make_device: Callable[..., DeviceIdentity]
) -> None:
    """Refused at SUBSCRIBE (0x87), not only filtered at delivery: a granted `$share/...`
    filter would take a round-robin share of the bridges' messages and lose it."""
    device, other = make_device(), make_device()
    session = connect_device(settings, device)
    try:
        refused = [
            "#",
            "$SYS/#",
            "+/+/telemetry",
            f"devices/{other.device_id}/#",
            "devices/+/telemetry",
            f"devices/{device.device_id}x/#",  # a longer id with the same prefix
            "$share/ingest/devices/+/telemetry",
            f"$share/mine/devices/{device.device_id}/#",
            f"{DYNSEC_TOPIC}/#",
        ]
        for topic in refused:
            assert [c.value for c in session.subscribe(topic)] == [NOT_AUTHORIZED], topic
        for topic in (f"devices/{device.device_id}/#", f"devices/{device.device_id}/cmd"):
            assert session.subscribe(topic)[0].value < 128, topic
    finally:
        session.close()


def test_platform_identities_still_subscribe_as_before(stack: Stack, settings: Settings) -> None:
    watcher = _orchestrator(stack, settings)
    try:
        for topic in ("#", "$SYS/#", "devices/+/telemetry", "$share/probe/devices/+/events"):
            assert watcher.subscribe(topic)[0].value < 128, topic
    finally:
        watcher.close()


def test_an_offline_device_in_the_bridges_share_group_loses_nothing(
    stack: Stack, settings: Settings, make_device: Callable[..., DeviceIdentity]
) -> None:
    """Finding 1 of issue 12: a device that once joined `$share/ingest/...` with a persistent
    session took its turn of every device's telemetry, and the delivery ACL dropped it."""
    intruder, device = make_device("atk"), make_device()
    share = "$share/ingest/devices/+/telemetry"
    joined = connect(
        settings, intruder.cert, intruder.key, intruder.device_id, session_expiry_s=3600
    )
    assert joined is not None
    try:
        granted = [c.value for c in joined.subscribe(share)]
    finally:
        joined.close()  # offline, its session (and whatever it was granted) kept
    try:
        publish_telemetry(settings, device, (_telemetry(seq) for seq in range(1, 201)))
    finally:
        # End the intruder's session (clean start, no expiry): on code without the subscribe
        # ACL it would go on taking shares from the tests that follow.
        ended = connect(settings, intruder.cert, intruder.key, intruder.device_id)
        if ended is not None:
            ended.close()
    stored = collect_keyed(settings, "telemetry.raw", device.device_id, 200, timeout=30)
    assert len(stored) == 200
    assert granted == [NOT_AUTHORIZED]


# --------------------------------------------------------------------------- no subscriber


NO_MATCHING_SUBSCRIBERS = 0x10


def test_mosquitto_answers_0x10_without_subscriber_and_queues_for_an_offline_shared_one(
    stack: Stack, settings: Settings
) -> None:
    """What Mosquitto 2.0.11 does with a QoS 1 publish nobody is subscribed to (README)."""
    topic = f"probe/{uuid.uuid4().hex[:10]}"
    publisher = _orchestrator(stack, settings)
    files = stack.mosquitto.files
    name = BRIDGE_IDENTITIES[-1]  # a platform identity no test stack runs a bridge under
    try:
        assert publisher.publish(topic, b"nobody").value == NO_MATCHING_SUBSCRIBERS
        member = connect(
            settings,
            files.identity_cert(name),
            files.identity_key(name),
            name,
            session_expiry_s=600,
        )
        assert member is not None
        assert member.subscribe(f"$share/probe/{topic}")[0].value < 128
        member.close()  # offline; its session and shared subscription are kept
        assert publisher.publish(topic, b"queued").value == 0  # success: queued for it
        back = connect(
            settings,
            files.identity_cert(name),
            files.identity_key(name),
            name,
            clean_start=False,
            session_expiry_s=600,
        )
        assert back is not None
        try:
            assert back.session_present
            assert [m.payload for m in back.wait_for_messages(1)] == [b"queued"]
        finally:
            back.close()
    finally:
        publisher.close()
        ended = connect(settings, files.identity_cert(name), files.identity_key(name), name)
        if ended is not None:  # clean start, no expiry: the session ends with it
            ended.close()


async def _eventually(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.05)
    return condition()


def test_a_device_keeps_what_no_bridge_subscription_took_after_a_broker_restart(
    stack: Stack, settings: Settings, ca: CertificateAuthority, tmp_path: Path
) -> None:
    """Mosquitto 2.0.11 does not persist shared subscriptions (persist__subs_save saves plain
    ones only): after a restart the bridges' sessions come back without `$share/ingest/...`
    until they subscribe again, and a device's telemetry meanwhile gets PUBACK 0x10. The
    simulated device keeps each such message and sends it again: nothing is lost."""
    creds = provision_device(ca, f"dev-{uuid.uuid4().hex[:10]}", tmp_path, "ec")
    bridges = list(stack.bridges)
    count = 50
    for bridge in bridges:
        bridge.stop()
    try:
        stack.mosquitto.stop()
        stack.mosquitto.start(settings.startup_timeout_s)

        async def scenario() -> FleetStats:
            stats = FleetStats(devices=1)
            device = SimulatedDevice(creds, settings, stats, random.Random(1))
            assert await device.connect()
            try:
                for _ in range(count):
                    device.queue_telemetry()
                device.flush_outbox()
                expected = len(device.sent)  # the telemetry, its events and a reported document

                def answered() -> bool:  # every message answered once, one way or another
                    return stats.acked + stats.summary().get("no_subscribers", 0) >= expected

                assert await _eventually(answered, timeout=30)
                for bridge in bridges:  # a bridge subscribes on start
                    await asyncio.to_thread(bridge.start, settings.startup_timeout_s)
                assert await device.drain(timeout=60)
            finally:
                await device.close()
            assert device.seq["telemetry"] == count
            return stats

        stats = asyncio.run(scenario())
    finally:
        for bridge in bridges:
            if not bridge.ready():
                bridge.start(settings.startup_timeout_s)
    stored = collect_keyed(settings, "telemetry.raw", creds.device_id, count, timeout=30)
    assert len(stored) == count
    assert stats.no_subscribers >= count  # the broker did answer 0x10 while no bridge was there
    assert stats.refused == 0


# --------------------------------------------------------------------------- size limit


PACKET_TOO_LARGE = 0x95
_PUBACK_LINE = re.compile(r"received PUBACK \(Mid: \d+, RC:(\d+)\)")


def _mosquitto_pub(
    settings: Settings, device: DeviceIdentity, payload: Path, timeout: float = 30
) -> list[int]:
    """Publish ``payload`` at QoS 1 with Mosquitto's own client; the PUBACK reason codes seen."""
    done = subprocess.run(
        [
            "mosquitto_pub",
            "-d",
            "-V",
            "mqttv5",
            "-h",
            settings.host,
            "-p",
            str(settings.mqtt_port),
            "--cafile",
            str(settings.pki_dir / "ca.crt"),
            "--cert",
            str(device.cert),
            "--key",
            str(device.key),
            "-t",
            f"devices/{device.device_id}/telemetry",
            "-q",
            "1",
            "-f",
            str(payload),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return [int(code) for code in _PUBACK_LINE.findall(done.stdout + done.stderr)]


def test_the_broker_refuses_a_payload_over_the_envelopes_limit(
    stack: Stack, settings: Settings, make_device: Callable[..., DeviceIdentity], tmp_path: Path
) -> None:
    """Issue 12, finding 5: a payload over 64 KiB was PUBACKed and handed to the bridge."""
    device = make_device()
    at_limit, over = tmp_path / "at-limit.bin", tmp_path / "over.bin"
    at_limit.write_bytes(b"a" * MAX_PAYLOAD_BYTES)  # the bridge dead-letters it (not JSON)
    over.write_bytes(b"a" * (MAX_PAYLOAD_BYTES + 1))
    assert _mosquitto_pub(settings, device, at_limit) == [0]
    assert _mosquitto_pub(settings, device, over) == [PACKET_TOO_LARGE]
