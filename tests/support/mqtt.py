"""A small synchronous MQTT 5 test client (paho) holding a fleet certificate."""

from __future__ import annotations

import re
import ssl
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from infra.settings import Settings
from ingest.mqtt_client import client_tls_context
from tests.conftest import DeviceIdentity


@dataclass
class MqttSession:
    client: mqtt.Client
    acks: dict[int, ReasonCode] = field(default_factory=dict)
    received: list[mqtt.MQTTMessage] = field(default_factory=list)
    disconnected: threading.Event = field(default_factory=threading.Event)
    # CONNACK's Session Present: the broker resumed a session kept under this client id.
    session_present: bool = False
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def publish(self, topic: str, payload: bytes, qos: int = 1, timeout: float = 10) -> ReasonCode:
        """Publish and return the broker's PUBACK reason code."""
        info = self.client.publish(topic, payload, qos=qos)
        with self._cond:
            if not self._cond.wait_for(lambda: info.mid in self.acks, timeout):
                raise TimeoutError(f"no PUBACK for {topic} within {timeout}s")
            return self.acks[info.mid]

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 10) -> list[ReasonCode]:
        granted: list[list[ReasonCode]] = []
        done = threading.Event()

        def on_subscribe(_c, _u, _mid, codes, _p):  # type: ignore[no-untyped-def]
            granted.append(list(codes))
            done.set()

        self.client.on_subscribe = on_subscribe
        self.client.subscribe(topic, qos=qos)
        if not done.wait(timeout):
            raise TimeoutError(f"no SUBACK for {topic}")
        return granted[0]

    def wait_for_messages(self, count: int, timeout: float = 10) -> list[mqtt.MQTTMessage]:
        with self._cond:
            self._cond.wait_for(lambda: len(self.received) >= count, timeout)
            return list(self.received)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def connect(
    settings: Settings,
    cert: Path,
    key: Path,
    client_id: str,
    ca_cert: Path | None = None,
    timeout: float = 10,
    clean_start: mqtt.CleanStartOption = mqtt.MQTT_CLEAN_START_FIRST_ONLY,
    session_expiry_s: int = 0,
) -> MqttSession | None:
    """An MQTT 5 session over mTLS, or None if the broker refused the client.

    ``client_id`` is what the client asks for; the broker names the connection after the
    certificate's identity whatever it is (``use_username_as_clientid``). A
    ``session_expiry_s`` above 0 keeps the session (its subscriptions) after a disconnect.
    """
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.tls_set_context(client_tls_context(ca_cert or settings.pki_dir / "ca.crt", cert, key))
    session = MqttSession(client)
    connected = threading.Event()
    outcome: list[ReasonCode] = []

    def on_connect(_c, _u, flags, reason, _props):  # type: ignore[no-untyped-def]
        if not outcome:
            session.session_present = bool(flags.session_present)
        outcome.append(reason)
        connected.set()

    def on_publish(_c, _u, mid, reason, _props):  # type: ignore[no-untyped-def]
        with session._cond:
            session.acks[mid] = reason
            session._cond.notify_all()

    def on_message(_c, _u, message):  # type: ignore[no-untyped-def]
        with session._cond:
            session.received.append(message)
            session._cond.notify_all()

    def on_disconnect(_c, _u, _flags, _reason, _props):  # type: ignore[no-untyped-def]
        session.disconnected.set()
        connected.set()

    client.on_connect = on_connect
    client.on_publish = on_publish
    client.on_message = on_message
    client.on_disconnect = on_disconnect
    try:
        properties = Properties(PacketTypes.CONNECT)
        if session_expiry_s:
            properties.SessionExpiryInterval = session_expiry_s
        client.connect(
            settings.host,
            settings.mqtt_port,
            keepalive=30,
            clean_start=clean_start,
            properties=properties if session_expiry_s else None,
        )
    except (ssl.SSLError, OSError):
        return None
    client.loop_start()
    ok = connected.wait(timeout) and bool(outcome) and not outcome[0].is_failure
    if not ok or session.disconnected.is_set():
        client.loop_stop()
        client.disconnect()
        return None
    return session


def connect_device(settings: Settings, device: DeviceIdentity, **options: Any) -> MqttSession:
    """A session of ``device`` under its own client id; the broker must let it in."""
    session = connect(settings, device.cert, device.key, device.device_id, **options)
    assert session is not None, f"the broker refused {device.device_id}"
    return session


def publish_telemetry(
    settings: Settings, device: DeviceIdentity, payloads: Iterable[bytes]
) -> list[ReasonCode]:
    """Connect as ``device``, publish each payload to its telemetry topic at QoS 1, disconnect.

    Every PUBACK must be a success (a reason code below 0x80); they are returned in order."""
    topic = f"devices/{device.device_id}/telemetry"
    session = connect_device(settings, device)
    codes: list[ReasonCode] = []
    try:
        for payload in payloads:
            code = session.publish(topic, payload)
            assert code.value < 128, (topic, payload[:80], code)
            codes.append(code)
    finally:
        session.close()
    return codes


_CONNECTED = re.compile(r"New client connected from \S+ as (\S+) \(.*u'([^']*)'\)\.")
_TAKEN_OVER = re.compile(r"Client (\S+) already connected, closing old connection\.")


class BrokerLog:
    """What the broker logged (``connection_messages true``) after this object was made."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.start = path.stat().st_size if path.exists() else 0

    def text(self) -> str:
        with self.path.open("rb") as log:
            log.seek(self.start)
            return log.read().decode("utf-8", "replace")

    def client_ids(self, username: str) -> list[str]:
        """The client ids the broker gave the connections of ``username``, in order."""
        return [m[1] for m in _CONNECTED.finditer(self.text()) if m[2] == username]

    def taken_over(self) -> list[str]:
        """Client ids whose open connection the broker closed for a newcomer with that id."""
        return [m[1] for m in _TAKEN_OVER.finditer(self.text())]
