"""A simulated fleet: many MQTT 5 devices over mTLS in one asyncio process.

Each device has its own key and certificate, connects with clean_start false and a session
expiry, publishes JSON telemetry at QoS 1 to `devices/<id>/telemetry` with its own growing
sequence number, and now and then an event to `devices/<id>/events`. A message is kept until
its PUBACK (gmqtt's store, replayed on reconnect); while offline, new messages wait in the
device's FIFO outbox.

Device twins (after AWS IoT Device Shadow): each device keeps a local reported document and
subscribes (QoS 1, in its persistent session) to `devices/<id>/state/desired`, where the
platform publishes `{"version": V, "state": {delta}, "timestamp": ms}`. The device merges the
delta into its reported document (nested objects merge, a null removes a key) and reports what it
applied on `devices/<id>/state/reported` as `{"seq": n, "ts": ms, "reported": {patch}}`, through
the same outbox as telemetry. A delta whose version is not newer than the last one applied is a
repeat and is ignored. On every (re)connect the device reports its whole document once, so the
platform can answer with a delta. The document and the last applied version persist in
`<id>.twin.json`, beside the sequence numbers in `<id>.seq.json`.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import math
import random
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import gmqtt
from gmqtt.mqtt.constants import MQTTv50

from infra.provision import DeviceCredentials
from infra.services.mosquitto import client_tls_context
from infra.settings import Settings

log = logging.getLogger("fleetstream.simulator")

SESSION_EXPIRY_S = 3600
TELEMETRY = "telemetry"
EVENTS = "events"
STATE_REPORTED = "state/reported"
STATE_DESIRED = "state/desired"
FIRMWARE_VERSION = "1.0.0"
NO_VERSION = -1  # last applied desired version before any was applied (the twin's start at 0)
MAX_STATE_DEPTH = 32  # deeper desired states are refused (the platform's twins allow 6 levels)


# --------------------------------------------------------------------------- twin: pure parts


@dataclass
class LocalTwin:
    """What a device keeps of its twin: its reported document and the newest desired version
    it applied."""

    reported: dict[str, Any]
    version: int = NO_VERSION


@dataclass(frozen=True)
class DesiredUpdate:
    """A message from `devices/<id>/state/desired`: the delta to apply and its twin version."""

    version: int
    state: dict[str, Any]


def initial_reported(report_interval_s: float) -> dict[str, Any]:
    """A new device's reported document."""
    return {"firmware": FIRMWARE_VERSION, "report_interval_s": report_interval_s}


def merge_reported(document: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """`document` with `patch` merged in (a new dict; neither argument is changed).

    The twin's merge (streams/twin.py): nested objects merge key by key, any other value
    replaces the old one whole, a null removes the key, an object left empty by removals is
    dropped, and a patch object with nothing to set changes nothing.
    """
    out = dict(document)
    for key, value in patch.items():
        old = out.get(key)
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict):
            sub = merge_reported(old if isinstance(old, dict) else {}, value)
            if sub:
                out[key] = sub
            elif isinstance(old, dict):  # emptied by removals: drop it
                del out[key]
        else:
            out[key] = copy.deepcopy(value)
    return out


def is_stale(version: int, last_applied: int) -> bool:
    """Whether a desired message of `version` repeats one already applied."""
    return version <= last_applied


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _too_deep(value: Any, depth: int) -> bool:
    if not isinstance(value, dict | list):
        return False
    if depth >= MAX_STATE_DEPTH:
        return True
    items = value.values() if isinstance(value, dict) else value
    return any(_too_deep(item, depth + 1) for item in items)


def parse_desired(payload: bytes) -> DesiredUpdate:
    """The update in a desired message; ValueError if it is not one.

    `version` must be a non-negative integer and `state` an object, nested at most
    MAX_STATE_DEPTH levels; `timestamp` is not needed. NaN and Infinity are refused (a report
    carrying them would not be JSON for the bridge).
    """
    try:
        document = json.loads(payload, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"not JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise ValueError(f"top level is a {type(document).__name__}, not an object")
    version = document.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"version must be a non-negative integer, got {version!r}")
    state = document.get("state")
    if not isinstance(state, dict):
        raise ValueError(f"state must be an object, got {type(state).__name__}")
    if _too_deep(state, 0):
        raise ValueError(f"state is nested deeper than {MAX_STATE_DEPTH} levels")
    return DesiredUpdate(version, state)


def apply_desired(twin: LocalTwin, update: DesiredUpdate) -> LocalTwin | None:
    """The twin after `update`, or None if the update is a repeat (nothing to do)."""
    if is_stale(update.version, twin.version):
        return None
    return LocalTwin(merge_reported(twin.reported, update.state), update.version)


def build_message(
    device_id: str, kind: str, seq: int, ts_ms: int, body: dict[str, Any]
) -> tuple[str, bytes]:
    """(topic, payload) of an uplink: the envelope (`seq`, `ts`) and the kind's fields."""
    payload = {"seq": seq, "ts": ts_ms, **body}
    return f"devices/{device_id}/{kind}", json.dumps(payload).encode()


def reported_message(
    device_id: str, seq: int, ts_ms: int, reported: dict[str, Any]
) -> tuple[str, bytes]:
    """A reported patch (or whole document) for `devices/<id>/state/reported`."""
    return build_message(device_id, STATE_REPORTED, seq, ts_ms, {"reported": reported})


@dataclass
class SensorModel:
    """Plausible readings: a daily temperature wave, slow battery drain, some drifting or
    failing devices (a drifting sensor warms steadily; a failing one vibrates and drains)."""

    base_temperature: float
    base_humidity: float
    battery: float
    drifting: bool
    failing: bool

    @classmethod
    def sample(cls, rng: random.Random) -> SensorModel:
        return cls(
            base_temperature=rng.uniform(18.0, 26.0),
            base_humidity=rng.uniform(35.0, 60.0),
            battery=rng.uniform(60.0, 100.0),
            drifting=rng.random() < 0.05,
            failing=rng.random() < 0.02,
        )

    def reading(self, rng: random.Random, seq: int, now_s: float) -> dict[str, float]:
        wave = 2.0 * math.sin(now_s / 3600.0 * 2 * math.pi / 24)
        drift = 0.05 * seq if self.drifting else 0.0
        self.battery = max(0.0, self.battery - (0.05 if self.failing else 0.001))
        vibration = rng.gauss(0.8, 0.1) * (6.0 if self.failing else 1.0)
        return {
            "temperature": round(self.base_temperature + wave + drift + rng.gauss(0, 0.2), 3),
            "humidity": round(min(100.0, max(0.0, self.base_humidity + rng.gauss(0, 1.0))), 3),
            "battery": round(self.battery, 3),
            "vibration_rms": round(abs(vibration), 4),
        }


@dataclass
class FleetStats:
    devices: int = 0
    connected: int = 0
    connect_failures: int = 0
    published: int = 0
    acked: int = 0
    events: int = 0
    desired_received: int = 0
    reported: int = 0
    started_at: float = field(default_factory=time.monotonic)

    def summary(self) -> dict[str, Any]:
        elapsed = max(time.monotonic() - self.started_at, 1e-9)
        return {
            "devices": self.devices,
            "connected": self.connected,
            "connect_failures": self.connect_failures,
            "published": self.published,
            "acked": self.acked,
            "events": self.events,
            "desired_received": self.desired_received,
            "reported": self.reported,
            "elapsed_s": round(elapsed, 3),
            "publish_rate": round(self.published / elapsed, 1),
        }


class _AckCountingClient(gmqtt.Client):  # type: ignore[misc]
    """gmqtt drops a stored QoS 1 message on its PUBACK; count those (gmqtt 0.8 hook)."""

    def __init__(self, client_id: str, on_ack: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(client_id, **kwargs)
        self._on_ack = on_ack

    def _remove_message_from_queue(self, mid: int) -> None:
        super()._remove_message_from_queue(mid)
        self._on_ack()


class SimulatedDevice:
    def __init__(
        self,
        creds: DeviceCredentials,
        settings: Settings,
        stats: FleetStats,
        rng: random.Random,
        last_seq: dict[str, int] | None = None,
        twin: LocalTwin | None = None,
        report_interval_s: float = 1.0,
    ) -> None:
        self.creds = creds
        self.settings = settings
        self.stats = stats
        self.rng = rng
        self.model = SensorModel.sample(rng)
        # A device's sequence numbers only grow, across runs too: they continue from disk.
        self.seq = {TELEMETRY: 0, EVENTS: 0, STATE_REPORTED: 0, **(last_seq or {})}
        self.twin = twin or LocalTwin(initial_reported(report_interval_s))
        self.outbox: deque[tuple[str, bytes]] = deque()
        self.sent: list[tuple[str, int]] = []  # (kind, seq) handed to the broker, in order
        self.client = _AckCountingClient(
            creds.device_id,
            on_ack=self._acked,
            clean_session=False,
            session_expiry_interval=SESSION_EXPIRY_S,
        )
        self._desired_topic = f"devices/{creds.device_id}/{STATE_DESIRED}"
        self._desired_sub: gmqtt.Subscription | None = None
        # Set before connecting: a persistent session may deliver queued deltas at once.
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect

    @property
    def device_id(self) -> str:
        return self.creds.device_id

    def _acked(self) -> None:
        self.stats.acked += 1

    def tls(self) -> ssl.SSLContext:
        return client_tls_context(self.creds.ca_path, self.creds.cert_path, self.creds.key_path)

    async def connect(self) -> bool:
        try:
            await self.client.connect(
                self.settings.host,
                self.settings.mqtt_port,
                ssl=self.tls(),
                version=MQTTv50,
                keepalive=60,
            )
        except (TimeoutError, OSError, ssl.SSLError):
            self.stats.connect_failures += 1
            return False
        self.stats.connected += 1
        return True

    def _message(self, kind: str, body: dict[str, Any]) -> tuple[str, bytes]:
        self.seq[kind] += 1
        self.sent.append((kind, self.seq[kind]))
        return build_message(self.device_id, kind, self.seq[kind], int(time.time() * 1000), body)

    def queue_telemetry(self) -> None:
        reading = self.model.reading(self.rng, self.seq[TELEMETRY] + 1, time.time())
        self.outbox.append(self._message(TELEMETRY, reading))
        self.stats.published += 1
        if self.rng.random() < 0.02:
            event = {"type": "status", "attributes": {"battery": str(reading["battery"])}}
            self.outbox.append(self._message(EVENTS, event))
            self.stats.events += 1

    def queue_reported(self, reported: dict[str, Any]) -> None:
        """A reported patch (or the whole document) into the outbox, after what is queued
        (serialized at once: later changes to `reported` do not reach the message)."""
        self.outbox.append(self._message(STATE_REPORTED, {"reported": reported}))
        self.stats.reported += 1

    def _flush_soon(self) -> None:
        """Flush on the next loop turn, not inside gmqtt's packet handler: after a reconnect's
        CONNACK gmqtt schedules the replay of unacknowledged messages, and what the device
        queues now must follow them (FIFO)."""
        asyncio.get_running_loop().call_soon(self.flush_outbox)

    def _on_connect(
        self, client: gmqtt.Client, session_present: int, rc: int, properties: Any
    ) -> None:
        """Every successful CONNACK (first connect and gmqtt's reconnects): subscribe to the
        desired topic, then report the whole document once so the platform can answer with a
        delta. Subscribing again is harmless if the session kept the subscription, and needed
        if the broker lost it."""
        if self._desired_sub is None:
            self._desired_sub = gmqtt.Subscription(self._desired_topic, qos=1)
            client.subscribe(self._desired_sub)
        else:  # the same Subscription: gmqtt's list would grow with each subscribe()
            client.resubscribe(self._desired_sub)
        self.queue_reported(self.twin.reported)
        self._flush_soon()

    def _on_message(
        self, client: gmqtt.Client, topic: str, payload: bytes, qos: int, properties: Any
    ) -> int:
        """gmqtt's on_message: a desired delta. Returns the reason code (0: success), which
        gmqtt ignores here (optimistic acknowledgement: the PUBACK went out before this)."""
        if topic != self._desired_topic:
            log.debug("%s: message on unexpected topic %r ignored", self.device_id, topic)
            return 0
        self.stats.desired_received += 1
        self.on_desired(payload)
        return 0

    def on_desired(self, payload: bytes) -> None:
        """Apply a desired message and report what was applied; repeats and malformed
        messages are logged (debug) and dropped."""
        try:
            update = parse_desired(payload)
        except ValueError as exc:
            log.debug("%s: malformed desired message ignored: %s", self.device_id, exc)
            return
        twin = apply_desired(self.twin, update)
        if twin is None:
            log.debug(
                "%s: desired version %d ignored (applied %d)",
                self.device_id,
                update.version,
                self.twin.version,
            )
            return
        self.twin = twin
        if update.state:
            self.queue_reported(update.state)
            self._flush_soon()
        self.persist()

    def persist(self) -> None:
        """Save the twin and the sequence numbers (the report's seq must not be reused)."""
        try:
            save_twin(self.creds, self.twin)
            save_seq(self.creds, self.seq)
        except OSError as exc:
            log.warning("%s: could not save twin state: %s", self.device_id, exc)

    def flush_outbox(self) -> None:
        """Hand queued messages to the client in FIFO order while connected."""
        while self.outbox and self.client.is_connected:
            topic, payload = self.outbox.popleft()
            self.client.publish(topic, payload, qos=1)

    def pending(self) -> int:
        """Messages not yet acknowledged by the broker (outbox plus gmqtt's in-flight store)."""
        storage = self.client._persistent_storage
        return len(self.outbox) + (0 if storage.is_empty else len(storage.get_all()))

    async def run(self, rate: float, until: float, max_messages: int | None) -> None:
        interval = 1.0 / rate
        await asyncio.sleep(self.rng.uniform(0, interval))  # spread devices over the period
        next_at = time.monotonic()
        while time.monotonic() < until and (
            max_messages is None or self.seq[TELEMETRY] < max_messages
        ):
            self.queue_telemetry()
            self.flush_outbox()
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def drain(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.flush_outbox()
            if self.pending() == 0:
                return True
            await asyncio.sleep(0.05)
        return self.pending() == 0

    async def close(self) -> None:
        if self.client.is_connected:
            await self.client.disconnect()


async def run_fleet(
    settings: Settings,
    credentials: Sequence[DeviceCredentials],
    rate: float,
    duration: float,
    max_messages: int | None = None,
    drain_timeout: float = 60.0,
    seed: int = 7,
    connect_concurrency: int = 50,
    on_start: Callable[[FleetStats], None] | None = None,
) -> tuple[FleetStats, list[SimulatedDevice]]:
    """Connect every device, publish at `rate` msgs/s each for `duration` s (or `max_messages`
    each), wait until every message is acknowledged, disconnect."""
    stats = FleetStats(devices=len(credentials))
    rng = random.Random(seed)
    devices = [
        SimulatedDevice(
            c,
            settings,
            stats,
            random.Random(rng.random()),
            load_seq(c),
            twin=load_twin(c),
            report_interval_s=1.0 / rate,
        )
        for c in credentials
    ]

    gate = asyncio.Semaphore(connect_concurrency)  # TLS handshakes cost CPU: pace them

    async def connect(device: SimulatedDevice) -> bool:
        async with gate:
            return await device.connect()

    connected = await asyncio.gather(*(connect(d) for d in devices))
    live = [d for d, ok in zip(devices, connected, strict=True) if ok]
    stats.started_at = time.monotonic()
    if on_start is not None:
        on_start(stats)  # live progress reads the counters while the fleet runs
    until = stats.started_at + duration
    await asyncio.gather(*(d.run(rate, until, max_messages) for d in live))
    await asyncio.gather(*(d.drain(drain_timeout) for d in live))
    await asyncio.gather(*(d.close() for d in live))
    for device in devices:
        save_seq(device.creds, device.seq)
        save_twin(device.creds, device.twin)
    return stats, devices


def _seq_path(creds: DeviceCredentials) -> Path:
    return creds.cert_path.with_suffix(".seq.json")


def load_seq(creds: DeviceCredentials) -> dict[str, int]:
    try:
        data = json.loads(_seq_path(creds).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): int(v) for k, v in data.items()} if isinstance(data, dict) else {}


def save_seq(creds: DeviceCredentials, seq: dict[str, int]) -> None:
    _seq_path(creds).write_text(json.dumps(seq))


def _twin_path(creds: DeviceCredentials) -> Path:
    return creds.cert_path.with_suffix(".twin.json")


def twin_to_json(twin: LocalTwin) -> str:
    return json.dumps({"reported": twin.reported, "version": twin.version})


def twin_from_json(text: str) -> LocalTwin | None:
    """The twin saved by :func:`twin_to_json`, or None if `text` is not one."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    reported, version = data.get("reported"), data.get("version", NO_VERSION)
    if not isinstance(reported, dict) or isinstance(version, bool) or not isinstance(version, int):
        return None
    return LocalTwin(reported, version)


def load_twin(creds: DeviceCredentials) -> LocalTwin | None:
    """The device's saved twin; None (start afresh) if there is none or it is unreadable."""
    try:
        text = _twin_path(creds).read_text()
    except OSError:
        return None
    return twin_from_json(text)


def save_twin(creds: DeviceCredentials, twin: LocalTwin) -> None:
    _twin_path(creds).write_text(twin_to_json(twin))
