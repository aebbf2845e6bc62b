"""A simulated fleet: many MQTT 5 devices over mTLS in one asyncio process.

Each device has its own key and certificate, connects with clean_start false and a session
expiry, publishes JSON telemetry at QoS 1 to `devices/<id>/telemetry` with its own growing
sequence number, and now and then an event to `devices/<id>/events`. A message is kept until
its PUBACK (gmqtt's store, replayed on reconnect); while offline, new messages wait in the
device's FIFO outbox. A PUBACK with reason 0x10 (no matching subscribers: Mosquitto's answer
while no bridge subscription exists, e.g. after a broker restart until the bridges subscribe
again) is not a delivery: the message stays stored and is sent again after a bounded backoff.
A refusal (reason >= 0x80, e.g. 0x95 over the broker's size limit) ends the message, counted.

Device twins (after AWS IoT Device Shadow): each device keeps a local reported document and
subscribes (QoS 1, in its persistent session) to `devices/<id>/state/desired`, where the
platform publishes `{"version": V, "state": {delta}, "timestamp": ms}`. The device merges the
delta into its reported document (nested objects merge, a null removes a key) and reports what it
applied on `devices/<id>/state/reported` as `{"seq": n, "ts": ms, "reported": {patch}}`, through
the same outbox as telemetry. A delta whose version is not newer than the last one applied is a
repeat and is ignored. On every (re)connect the device reports its whole document once, so the
platform can answer with a delta. The document and the last applied version persist in
`<id>.twin.json`, beside the sequence numbers in `<id>.seq.json`.

OTA updates (an A/B-slot device): each device also subscribes (QoS 1, same session) to
`devices/<id>/ota/command`, where the platform's rollouts (streams/ota/rollout.py) send
`{"action": "install", "artifact": <OtaArtifact record, signature base64>, "command_id",
"kind", "rollout_id", "version"}` or `{"action": "rollback", "command_id", "from_version",
"kind", "rollout_id", "version"}`. An install reports `downloading` (the bytes are read from the
artifact store, at the record's `path` under `artifact_root`), `verifying`
(streams.ota.artifacts.verify_download against the release public key; a reason refuses the image),
`installing` (the image is written to the inactive slot), then switches slots and reports
`succeeded`; any failure reports `failed` with a `reason` and the version still running. A
rollback switches back to the image kept in the other slot. Reports go on
`devices/<id>/ota/status` as `{"seq", "ts", "status", "version", "command_id", "rollout_id",
"reason"?}` through the outbox, with their own sequence numbers. Commands are handled one at a
time per device; a command id already handled (or under way) is ignored, a malformed command is
dropped (debug log). The slots (active slot, each slot's version) and the last handled command
ids persist atomically in `<id>.ota.json`, images in `<id>.<kind>-<slot>.img`: the switch is
written only once the image is complete, so a device killed mid-update restarts on the old
version. The twin's reported `firmware` follows the active firmware slot.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import copy
import json
import logging
import math
import os
import random
import re
import ssl
import struct
import tempfile
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn, TypeAlias

import gmqtt
from gmqtt.mqtt.constants import MQTTv50

from infra.provision import DeviceCredentials
from infra.settings import Settings
from ingest.mqtt_client import client_tls_context
from streams.ota.artifacts import ArtifactKind, verify_download

log = logging.getLogger("fleetstream.simulator")

SESSION_EXPIRY_S = 3600
TELEMETRY = "telemetry"
EVENTS = "events"
STATE_REPORTED = "state/reported"
STATE_DESIRED = "state/desired"
FIRMWARE_VERSION = "1.0.0"
NO_VERSION = -1  # last applied desired version before any was applied (the twin's start at 0)
MAX_STATE_DEPTH = 32  # deeper desired states are refused (the platform's twins allow 6 levels)
OTA_COMMAND = "ota/command"
OTA_STATUS = "ota/status"
OTA_STEP_S = 0.05  # pause between the steps of an update (the demo runs for a minute)
SLOT_A, SLOT_B = "A", "B"
MAX_HANDLED_COMMANDS = 64  # command ids remembered (persisted) to drop repeats
MAX_COMMAND_TEXT = 256  # longest command id / rollout id / version echoed back
MAX_IMAGE_BYTES = 256 * 1024 * 1024  # a download is cut off beyond this (and then fails)
# PUBACK reason codes (MQTT 5 §3.4.2.1): 0x10 means the broker took the message but nobody was
# subscribed, so nothing will deliver it; >= 0x80 is a refusal.
NO_MATCHING_SUBSCRIBERS = 0x10
REFUSED = 0x80
RETRY_FIRST_S = 0.2  # backoff after a 0x10 answer: doubles per answer, up to RETRY_MAX_S
RETRY_MAX_S = 5.0

# OTA status values (streams.ota.OtaStatus) and the device's own failure reasons (those of a
# refused download are streams.ota.artifacts.verify_download's).
DOWNLOADING = "downloading"
VERIFYING = "verifying"
INSTALLING = "installing"
SUCCEEDED = "succeeded"
FAILED = "failed"
NO_ARTIFACT_STORE = "no_artifact_store"  # the simulator was given no artifact_root
DOWNLOAD_FAILED = "download_failed"  # no readable file at the record's path
NO_RELEASE_KEY = "no_release_key"  # the simulator was given no release public key
VERSION_MISMATCH = "version_mismatch"  # the command's version is not the signed record's
KIND_MISMATCH = "kind_mismatch"  # the command's kind is not the signed record's
INSTALL_ERROR = "install_error"  # writing the slot failed (or was made to fail)
NO_KEPT_IMAGE = "no_kept_image"  # a rollback with nothing in the other slot
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Failures that are a refused download (FleetStats.ota_refused), not a failed install.
_REFUSALS = frozenset(
    {
        "invalid_record",
        "invalid_key",
        "size_mismatch",
        "digest_mismatch",
        "wrong_key",
        "bad_signature",
        NO_RELEASE_KEY,
        VERSION_MISMATCH,
        KIND_MISMATCH,
    }
)
# Where the twin's reported document carries the active version of each kind of image.
REPORTED_VERSION_KEYS = {
    ArtifactKind.firmware.value: "firmware",
    ArtifactKind.config.value: "config_version",
    ArtifactKind.model.value: "model_version",
}


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


# --------------------------------------------------------------------------- ota: pure parts


@dataclass(frozen=True)
class InstallCommand:
    """An `install` from `devices/<id>/ota/command`; `artifact` is the OtaArtifact record with
    its signature decoded to bytes (what streams.ota.artifacts.verify_download takes)."""

    command_id: str
    rollout_id: str
    kind: str
    version: str
    artifact: dict[str, Any]


@dataclass(frozen=True)
class RollbackCommand:
    """A `rollback`: back to the image kept in the other slot (`version` is the platform's
    idea of it, None if unknown; `from_version` the version rolled back from)."""

    command_id: str
    rollout_id: str
    kind: str
    version: str | None
    from_version: str | None


OtaCommand: TypeAlias = InstallCommand | RollbackCommand


def _command_text(document: Mapping[str, Any], key: str, *, optional: bool = False) -> str | None:
    value = document.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_COMMAND_TEXT:
        raise ValueError(f"{key} must be a string of 1 to {MAX_COMMAND_TEXT} characters")
    return value


def _required_text(document: Mapping[str, Any], key: str) -> str:
    value = _command_text(document, key)
    assert value is not None
    return value


def _artifact_record(value: object) -> dict[str, Any]:
    """The record of an install command, its base64 signature decoded. A signature that is not
    base64 becomes empty bytes, so verify_download reports `invalid_record` (the command itself
    is well formed: the rollout hears of the failure)."""
    if not isinstance(value, dict):
        raise ValueError(f"artifact must be an object, got {type(value).__name__}")
    record = dict(value)
    signature = record.get("signature")
    try:
        decoded = base64.b64decode(signature, validate=True) if isinstance(signature, str) else b""
    except (binascii.Error, ValueError):
        decoded = b""
    record["signature"] = decoded
    return record


def parse_ota_command(payload: bytes) -> OtaCommand:
    """The command in an `ota/command` message; ValueError if it is not one.

    Needs `action` (install or rollback), `command_id`, `rollout_id` and `kind` (an artifact
    kind); an install also its `version` and `artifact` object, a rollback optional
    `version`/`from_version` (strings or null). Other keys are ignored.
    """
    try:
        document = json.loads(payload, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"not JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise ValueError(f"top level is a {type(document).__name__}, not an object")
    action = document.get("action")
    command_id = _required_text(document, "command_id")
    rollout_id = _required_text(document, "rollout_id")
    kind = document.get("kind")
    if kind not in REPORTED_VERSION_KEYS:
        raise ValueError(f"kind must be one of {', '.join(REPORTED_VERSION_KEYS)}, got {kind!r}")
    if action == "install":
        version = _required_text(document, "version")
        artifact = _artifact_record(document.get("artifact"))
        return InstallCommand(command_id, rollout_id, kind, version, artifact)
    if action == "rollback":
        return RollbackCommand(
            command_id,
            rollout_id,
            kind,
            _command_text(document, "version", optional=True),
            _command_text(document, "from_version", optional=True),
        )
    raise ValueError(f"action must be install or rollback, got {action!r}")


@dataclass(frozen=True)
class ImageSlots:
    """The two slots of one kind of image: the version each holds (None: empty, or invalidated
    while being written) and which one runs."""

    a: str | None
    b: str | None = None
    active: str = SLOT_A

    def holds(self, slot: str) -> str | None:
        return self.a if slot == SLOT_A else self.b

    @property
    def version(self) -> str | None:
        """The version running."""
        return self.holds(self.active)

    @property
    def inactive(self) -> str:
        return SLOT_B if self.active == SLOT_A else SLOT_A

    @property
    def kept(self) -> str | None:
        """The version in the other slot: what a rollback returns to."""
        return self.holds(self.inactive)

    def with_slot(self, slot: str, version: str | None) -> ImageSlots:
        return replace(self, a=version) if slot == SLOT_A else replace(self, b=version)

    def switched(self) -> ImageSlots:
        return replace(self, active=self.inactive)


@dataclass(frozen=True)
class OtaState:
    """What a device keeps of its updates: the slots of each kind of image and the ids of the
    last commands it handled (newest last, at most MAX_HANDLED_COMMANDS)."""

    slots: dict[str, ImageSlots]
    handled: tuple[str, ...] = ()

    def slots_of(self, kind: str) -> ImageSlots:
        return self.slots.get(kind) or ImageSlots(None)

    def version(self, kind: str = ArtifactKind.firmware.value) -> str | None:
        return self.slots_of(kind).version

    def with_slots(self, kind: str, slots: ImageSlots) -> OtaState:
        return replace(self, slots={**self.slots, kind: slots})

    def with_handled(self, command_id: str) -> OtaState:
        if command_id in self.handled:
            return self
        return replace(self, handled=(*self.handled, command_id)[-MAX_HANDLED_COMMANDS:])


def initial_ota(firmware: str = FIRMWARE_VERSION) -> OtaState:
    """A device's update state before any update: `firmware` in slot A, slot B empty."""
    return OtaState({ArtifactKind.firmware.value: ImageSlots(firmware)})


def versions_reported(state: OtaState) -> dict[str, str]:
    """The twin's keys for the versions running (kinds never installed are left out)."""
    versions = {key: state.version(kind) for kind, key in REPORTED_VERSION_KEYS.items()}
    return {key: version for key, version in versions.items() if version is not None}


def ota_to_json(state: OtaState) -> str:
    slots = {
        kind: {"active": s.active, SLOT_A: s.a, SLOT_B: s.b} for kind, s in state.slots.items()
    }
    return json.dumps({"slots": slots, "handled": list(state.handled)})


def _slot_version(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise ValueError("a slot holds a version string or null")


def ota_from_json(text: str) -> OtaState | None:
    """The state saved by :func:`ota_to_json`, or None if `text` is not one."""
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            return None
        slots_data, handled = data.get("slots"), data.get("handled", [])
        if not isinstance(slots_data, dict) or not isinstance(handled, list):
            return None
        slots: dict[str, ImageSlots] = {}
        for kind, entry in slots_data.items():
            if kind not in REPORTED_VERSION_KEYS or not isinstance(entry, dict):
                return None
            active = entry.get("active")
            if active not in (SLOT_A, SLOT_B):
                return None
            a, b = _slot_version(entry.get(SLOT_A)), _slot_version(entry.get(SLOT_B))
            slots[kind] = ImageSlots(a, b, active)
    except ValueError:
        return None
    if not all(isinstance(i, str) for i in handled):
        return None
    return OtaState(slots, tuple(handled[-MAX_HANDLED_COMMANDS:]))


def status_body(
    command: OtaCommand, status: str, version: str | None, reason: str | None = None
) -> dict[str, Any]:
    """The fields of an `ota/status` report (beside `seq` and `ts`); nulls are left out."""
    body: dict[str, Any] = {"status": status}
    if version is not None:
        body["version"] = version
    if reason is not None:
        body["reason"] = reason
    body["command_id"] = command.command_id
    body["rollout_id"] = command.rollout_id
    return body


def ota_status_message(
    device_id: str,
    seq: int,
    ts_ms: int,
    command: OtaCommand,
    status: str,
    version: str | None,
    reason: str | None = None,
) -> tuple[str, bytes]:
    """A status report for `devices/<id>/ota/status`."""
    body = status_body(command, status, version, reason)
    return build_message(device_id, OTA_STATUS, seq, ts_ms, body)


def artifact_file(root: Path, record: Mapping[str, Any]) -> Path | None:
    """Where the content of `record` lies in the artifact store at `root` (its `path`, relative
    to the root, as streams.ota.artifacts.ArtifactStore writes it: `sha256/<hex>`); None if the
    record names no path, or one outside the store."""
    path = record.get("path")
    if not isinstance(path, str) or not path:
        sha256 = record.get("sha256")
        if not isinstance(sha256, str) or _SHA256.fullmatch(sha256) is None:
            return None
        path = f"sha256/{sha256}"
    base = root.resolve()
    candidate = (base / path).resolve()
    return candidate if candidate.is_relative_to(base) and candidate != base else None


def read_image(path: Path, limit: int = MAX_IMAGE_BYTES) -> bytes:
    """At most `limit` + 1 bytes of the file at `path` (more than `limit` is a bad download
    anyway); OSError if it cannot be read."""
    with path.open("rb") as fh:
        return fh.read(limit + 1)


def write_atomically(path: Path, data: bytes, *, sync: bool = True) -> None:
    """Replace `path` with `data` at once (a temp file renamed over it): a reader, or a
    simulator restarted after a kill, sees the old file or the new one. `sync` also flushes
    the file to disk first (against power loss; costly on the event loop's thread)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if sync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    ota_commands: int = 0  # commands taken up (not repeats, not malformed)
    ota_succeeded: int = 0  # installs and rollbacks that succeeded
    ota_failed: int = 0  # failed for another reason than a refused download
    ota_refused: int = 0  # downloads that failed verification (digest, signature, ...)
    no_subscribers: int = 0  # PUBACKs 0x10 (message kept, sent again later)
    refused: int = 0  # PUBACKs >= 0x80 (message dropped: retrying cannot help)
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
            "ota_commands": self.ota_commands,
            "ota_succeeded": self.ota_succeeded,
            "ota_failed": self.ota_failed,
            "ota_refused": self.ota_refused,
            "no_subscribers": self.no_subscribers,
            "refused": self.refused,
            "elapsed_s": round(elapsed, 3),
            "publish_rate": round(self.published / elapsed, 1),
        }


def parse_puback(packet: bytes) -> tuple[int, int]:
    """(packet id, reason code) of a PUBACK's variable header; no code means success (§3.4.2.1)."""
    (mid,) = struct.unpack("!H", packet[:2])
    return mid, packet[2] if len(packet) > 2 else 0


def retry_delay(answers: int, jitter: float = 1.0) -> float:
    """Seconds before sending again a message answered 0x10 ``answers`` times (1, 2, ...):
    doubling from RETRY_FIRST_S, never above RETRY_MAX_S; ``jitter`` in (0, 1] spreads a fleet
    that all got 0x10 at once."""
    return min(RETRY_MAX_S, RETRY_FIRST_S * 2.0 ** min(answers - 1, 16)) * jitter


class _AckCountingClient(gmqtt.Client):  # type: ignore[misc]
    """gmqtt 0.8 ignores a PUBACK's reason code and drops the stored QoS 1 message on any PUBACK.
    This one reads it: on 0x10 the message stays stored (and its packet id taken) and is sent
    again after :func:`retry_delay`; any other code ends it. Every code goes to ``on_puback``."""

    def __init__(self, client_id: str, on_puback: Callable[[int], None], **kwargs: Any) -> None:
        super().__init__(client_id, **kwargs)
        self._on_puback = on_puback
        self._answers: dict[int, int] = {}  # packet id -> 0x10 answers so far
        self._jitter = random.Random()  # not the device's rng: its readings stay reproducible
        handler = self._package_handler
        self._plain_puback = handler._handle_puback_packet
        # gmqtt finds a packet's handler by name on the handler instance.
        handler._handle_puback_packet = self._handle_puback

    async def _wait_qos_queue_drained(self) -> None:
        """gmqtt's connect() waits here until every stored message is acknowledged: with 0x10
        answers kept for a retry, that lasts as long as no bridge subscribes, and the device
        would never get past connect. The device's drain() waits for its messages instead."""

    def _handle_puback(self, cmd: int, packet: bytes) -> None:
        mid, reason = parse_puback(packet)
        if reason == NO_MATCHING_SUBSCRIBERS and self._stored(mid) is not None:
            answers = self._answers.get(mid, 0) + 1
            self._answers[mid] = answers
            delay = retry_delay(answers, self._jitter.uniform(0.5, 1.0))
            asyncio.get_running_loop().call_later(delay, self._resend, mid, self._connection)
        else:
            self._answers.pop(mid, None)
            self._plain_puback(cmd, packet)  # frees the id, drops the stored message
        self._on_puback(reason)

    def _stored(self, mid: int) -> bytes | None:
        for stored_mid, package in self._persistent_storage.get_all():
            if stored_mid == mid:
                return bytes(package)
        return None

    def _resend(self, mid: int, connection: Any) -> None:
        # After a reconnect gmqtt replays every stored message itself: resend only on the
        # connection that answered 0x10, or the message would go out twice.
        if connection is not self._connection or not self.is_connected:
            return
        package = self._stored(mid)
        if package is not None:
            connection.send_package(package)


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
        *,
        ota: OtaState | None = None,
        artifact_root: Path | None = None,
        release_public_key: bytes | None = None,
        ota_fail_rate: float = 0.0,
        ota_step_s: float = OTA_STEP_S,
    ) -> None:
        self.creds = creds
        self.settings = settings
        self.stats = stats
        self.rng = rng
        self.model = SensorModel.sample(rng)
        # Drawn only when failures are injected: the readings stay those of earlier runs.
        self.ota_faulty = ota_fail_rate > 0 and rng.random() < ota_fail_rate
        # A device's sequence numbers only grow, across runs too: they continue from disk.
        self.seq = {TELEMETRY: 0, EVENTS: 0, STATE_REPORTED: 0, OTA_STATUS: 0, **(last_seq or {})}
        self.twin = twin or LocalTwin(initial_reported(report_interval_s))
        if ota is None:  # no update yet: the twin's firmware is the one in slot A
            firmware = self.twin.reported.get("firmware")
            ota = initial_ota(firmware if isinstance(firmware, str) else FIRMWARE_VERSION)
        else:  # the slots are the truth (a kill may have come between their save and the twin's)
            self.twin = LocalTwin(
                merge_reported(self.twin.reported, versions_reported(ota)), self.twin.version
            )
        self.ota = ota
        self.artifact_root = artifact_root
        self.release_public_key = release_public_key
        self.ota_step_s = ota_step_s
        self._ota_lock = asyncio.Lock()  # one command at a time, in arrival order
        self._ota_tasks: set[asyncio.Task[None]] = set()
        self._ota_under_way: set[str] = set()  # command ids taken up, not yet handled
        self.outbox: deque[tuple[str, bytes]] = deque()
        self.sent: list[tuple[str, int]] = []  # (kind, seq) handed to the broker, in order
        self.client = _AckCountingClient(
            creds.device_id,
            on_puback=self._puback,
            clean_session=False,
            session_expiry_interval=SESSION_EXPIRY_S,
        )
        self._desired_topic = f"devices/{creds.device_id}/{STATE_DESIRED}"
        self._desired_sub: gmqtt.Subscription | None = None
        self._ota_topic = f"devices/{creds.device_id}/{OTA_COMMAND}"
        self._ota_sub: gmqtt.Subscription | None = None
        # Set before connecting: a persistent session may deliver queued deltas at once.
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect

    @property
    def device_id(self) -> str:
        return self.creds.device_id

    def _puback(self, reason: int) -> None:
        if reason == NO_MATCHING_SUBSCRIBERS:
            self.stats.no_subscribers += 1  # kept: the client sends it again
        elif reason >= REFUSED:
            self.stats.refused += 1
            log.warning("%s: a message was refused by the broker (0x%02x)", self.device_id, reason)
        else:
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
        desired and OTA command topics, then report the whole document once so the platform
        can answer with a delta. Subscribing again is harmless if the session kept the
        subscriptions, and needed if the broker lost them."""
        if self._desired_sub is None or self._ota_sub is None:
            self._desired_sub = gmqtt.Subscription(self._desired_topic, qos=1)
            self._ota_sub = gmqtt.Subscription(self._ota_topic, qos=1)
            client.subscribe([self._desired_sub, self._ota_sub])  # one SUBSCRIBE
        else:  # the same Subscriptions: gmqtt's list would grow with each subscribe()
            client.resubscribe(self._desired_sub)
            client.resubscribe(self._ota_sub)
        self.queue_reported(self.twin.reported)
        self._flush_soon()

    def _on_message(
        self, client: gmqtt.Client, topic: str, payload: bytes, qos: int, properties: Any
    ) -> int:
        """gmqtt's on_message: a desired delta or an OTA command. Returns the reason code (0:
        success), which gmqtt ignores here (optimistic acknowledgement: the PUBACK went out
        before this)."""
        if topic == self._desired_topic:
            self.stats.desired_received += 1
            self.on_desired(payload)
        elif topic == self._ota_topic:
            self.on_ota_command(payload)
        else:
            log.debug("%s: message on unexpected topic %r ignored", self.device_id, topic)
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

    # ------------------------------------------------------------------ ota

    def on_ota_command(self, payload: bytes) -> None:
        """Take up an OTA command: it runs as a task, after any command before it. Repeats
        (handled, or under way) and malformed commands are logged (debug) and dropped."""
        try:
            command = parse_ota_command(payload)
        except ValueError as exc:
            log.debug("%s: malformed OTA command ignored: %s", self.device_id, exc)
            return
        ident = command.command_id
        if ident in self.ota.handled or ident in self._ota_under_way:
            log.debug("%s: OTA command %s already handled, ignored", self.device_id, ident)
            return
        self.stats.ota_commands += 1
        self._ota_under_way.add(ident)
        task = asyncio.get_running_loop().create_task(self._run_ota(command))
        self._ota_tasks.add(task)
        task.add_done_callback(self._ota_done)

    def _ota_done(self, task: asyncio.Task[None]) -> None:
        self._ota_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("%s: OTA command failed: %r", self.device_id, task.exception())

    async def ota_settled(self) -> None:
        """Wait until every command taken up is handled."""
        while self._ota_tasks:
            await asyncio.gather(*self._ota_tasks, return_exceptions=True)

    async def _run_ota(self, command: OtaCommand) -> None:
        try:
            async with self._ota_lock:
                if isinstance(command, InstallCommand):
                    await self._install(command)
                else:
                    await self._rollback(command)
        finally:
            self._ota_under_way.discard(command.command_id)

    async def _ota_step(self) -> None:
        """A pause between two steps of an update (at least one loop turn)."""
        await asyncio.sleep(self.ota_step_s)

    def _report_ota(
        self, command: OtaCommand, status: str, version: str | None, reason: str | None = None
    ) -> None:
        """A status report into the outbox; its seq is saved at once (never reused)."""
        body = status_body(command, status, version, reason)
        self.outbox.append(self._message(OTA_STATUS, body))
        try:
            save_seq(self.creds, self.seq)
        except OSError as exc:
            log.warning("%s: could not save sequence numbers: %s", self.device_id, exc)
        self._flush_soon()

    def _commit_ota(self, state: OtaState) -> None:
        """Make `state` the device's (saved atomically; kept in memory if saving fails)."""
        self.ota = state
        try:
            save_ota(self.creds, state)
        except OSError as exc:
            log.warning("%s: could not save OTA state: %s", self.device_id, exc)

    def _finish(
        self,
        command: OtaCommand,
        status: str,
        reason: str | None = None,
        slots: ImageSlots | None = None,
    ) -> None:
        """End a command: commit the new slots (if any) with its id as handled, then report
        the version running and, when it changed, the twin's version keys."""
        kind = command.kind
        before = self.ota.version(kind)
        state = self.ota if slots is None else self.ota.with_slots(kind, slots)
        self._commit_ota(state.with_handled(command.command_id))
        version = self.ota.version(kind)
        if version != before:
            patch = {REPORTED_VERSION_KEYS[kind]: version}
            self.twin = LocalTwin(merge_reported(self.twin.reported, patch), self.twin.version)
            self.queue_reported(patch)
            self.persist()
        self._report_ota(command, status, version, reason)
        if status == SUCCEEDED:
            self.stats.ota_succeeded += 1
        elif reason is not None and reason in _REFUSALS:
            self.stats.ota_refused += 1
        else:
            self.stats.ota_failed += 1

    async def _download(self, record: Mapping[str, Any]) -> bytes | str:
        """The artifact's bytes from the store, or the reason they could not be read."""
        if self.artifact_root is None:
            return NO_ARTIFACT_STORE
        path = artifact_file(self.artifact_root, record)
        if path is None:
            return DOWNLOAD_FAILED
        try:
            return await asyncio.to_thread(read_image, path)
        except OSError as exc:
            log.debug("%s: download of %s failed: %s", self.device_id, path, exc)
            return DOWNLOAD_FAILED

    def _refusal(self, command: InstallCommand, data: bytes) -> str | None:
        """Why the downloaded `data` must not be installed, or None."""
        if self.release_public_key is None:
            return NO_RELEASE_KEY
        reason = verify_download(data, command.artifact, self.release_public_key)
        if reason is not None:
            return reason
        if command.artifact.get("version") != command.version:
            return VERSION_MISMATCH
        if command.artifact.get("kind") != command.kind:
            return KIND_MISMATCH
        return None

    async def _install(self, command: InstallCommand) -> None:
        kind, version = command.kind, command.version
        slots = self.ota.slots_of(kind)
        if slots.version == version:  # already running it: nothing to install
            self._finish(command, SUCCEEDED)
            return
        self._report_ota(command, DOWNLOADING, version)
        await self._ota_step()
        data = await self._download(command.artifact)
        if isinstance(data, str):
            self._finish(command, FAILED, data)
            return
        self._report_ota(command, VERIFYING, version)
        await self._ota_step()
        refusal = self._refusal(command, data)
        if refusal is not None:
            self._finish(command, FAILED, refusal)
            return
        self._report_ota(command, INSTALLING, version)
        slot = slots.inactive
        # The other slot's old image is about to be overwritten: no longer a rollback target.
        invalidated = slots.with_slot(slot, None)
        self._commit_ota(self.ota.with_slots(kind, invalidated))
        image = image_path(self.creds, kind, slot)
        try:
            await asyncio.to_thread(write_atomically, image, data)
        except OSError as exc:
            log.warning("%s: could not write slot %s: %s", self.device_id, slot, exc)
            self._finish(command, FAILED, INSTALL_ERROR, invalidated)
            return
        await self._ota_step()
        if self.ota_faulty:  # an injected failure: the written image does not boot
            with contextlib.suppress(OSError):
                image.unlink(missing_ok=True)
            self._finish(command, FAILED, INSTALL_ERROR, invalidated)
            return
        # The switch: written at once with the image complete (a kill before this keeps the
        # old version running).
        self._finish(command, SUCCEEDED, slots=invalidated.with_slot(slot, version).switched())

    async def _rollback(self, command: RollbackCommand) -> None:
        slots = self.ota.slots_of(command.kind)
        if command.from_version is not None and slots.version != command.from_version:
            # Never switched to it (refused, failed, or interrupted): the previous version
            # still runs.
            self._finish(command, SUCCEEDED)
            return
        if slots.kept is None:
            self._finish(command, FAILED, NO_KEPT_IMAGE)
            return
        await self._ota_step()
        self._finish(command, SUCCEEDED, slots=slots.switched())

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
        """Wait for the updates under way to end and every message to be acknowledged."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.flush_outbox()
            if self.pending() == 0 and not self._ota_tasks:
                return True
            await asyncio.sleep(0.05)
        return self.pending() == 0

    async def close(self) -> None:
        """Disconnect; an update still under way is cut off (like power loss: not switched)."""
        for task in list(self._ota_tasks):
            task.cancel()
        await self.ota_settled()
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
    artifact_root: Path | None = None,
    release_public_key: bytes | None = None,
    ota_fail_rate: float = 0.0,
) -> tuple[FleetStats, list[SimulatedDevice]]:
    """Connect every device, publish at `rate` msgs/s each for `duration` s (or `max_messages`
    each), wait until every message is acknowledged, disconnect.

    OTA commands are answered with the artifacts under `artifact_root` (an
    streams.ota.artifacts.ArtifactStore's root), checked against `release_public_key` (the PEM of
    the PKI dir's `release.pub`); without them an install fails (`no_artifact_store`,
    `no_release_key`). A share `ota_fail_rate` of the devices (drawn from each device's rng)
    fails every install with `install_error`."""
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
            ota=load_ota(c),
            artifact_root=artifact_root,
            release_public_key=release_public_key,
            ota_fail_rate=ota_fail_rate,
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


def _ota_path(creds: DeviceCredentials) -> Path:
    return creds.cert_path.with_suffix(".ota.json")


def image_path(creds: DeviceCredentials, kind: str, slot: str) -> Path:
    """The file of slot `slot` for images of `kind` (e.g. `<id>.firmware-B.img`)."""
    return creds.cert_path.with_suffix(f".{kind}-{slot}.img")


def load_ota(creds: DeviceCredentials) -> OtaState | None:
    """The device's saved update state; None (start afresh) if there is none or it is
    unreadable."""
    try:
        text = _ota_path(creds).read_text()
    except OSError:
        return None
    return ota_from_json(text)


def save_ota(creds: DeviceCredentials, state: OtaState) -> None:
    """Save the update state atomically (the slot switch is all or nothing, whenever the
    simulator is killed). Not fsynced: it is written on the event loop, for many devices."""
    write_atomically(_ota_path(creds), ota_to_json(state).encode(), sync=False)
