"""Mosquitto with per-device mTLS: identity from the certificate, ACL, CA and CRL checks."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

from infra.pki import CertificateAuthority
from infra.provision import provision_device
from infra.services.base import wait_until
from infra.settings import Settings
from infra.stack import Stack
from tests.conftest import DeviceIdentity
from tests.support.mqtt import connect

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
    assert watcher.subscribe("devices/#")[0].value < 128
    session = connect(settings, device.cert, device.key, device.device_id)
    assert session is not None
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
    # Mosquitto 2.0 grants the SUBACK of a foreign filter and applies the read ACL at delivery,
    # so what matters (and is asserted) is that nothing of the other device is delivered.
    spy, other = make_device(), make_device()
    spy_session = connect(settings, spy.cert, spy.key, spy.device_id)
    other_session = connect(settings, other.cert, other.key, other.device_id)
    assert spy_session is not None
    assert other_session is not None
    try:
        spy_session.subscribe(f"devices/{other.device_id}/#")
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
    rogue_ca = CertificateAuthority.load_or_create(tmp_path / "rogue-ca", name="rogue CA")
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
    before = connect(settings, device.cert, device.key, device.device_id)
    assert before is not None
    before.close()

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
    session = connect(settings, still_fine.cert, still_fine.key, still_fine.device_id)
    assert session is not None
    session.close()
