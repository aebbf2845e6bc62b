"""OTA updates, the device's side: an A/B-slot device.

Each device also subscribes (QoS 1, same session as its twin) to `devices/<id>/ota/command`,
where the platform's rollouts (streams/ota.py) send
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

This module holds the pure parts and the files; the device runs the commands
(infra.simulator.device).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeAlias

from infra.provision import DeviceCredentials
from infra.simulator.protocol import OTA_STATUS, build_message, no_json_constant
from infra.simulator.twin import FIRMWARE_VERSION, read_saved
from streams.ota.artifacts import ArtifactKind

OTA_STEP_S = 0.05  # pause between the steps of an update (the demo runs for a minute)
SLOT_A, SLOT_B = "A", "B"
MAX_HANDLED_COMMANDS = 64  # command ids remembered (persisted) to drop repeats
MAX_COMMAND_TEXT = 256  # longest command id / rollout id / version echoed back
MAX_IMAGE_BYTES = 256 * 1024 * 1024  # a download is cut off beyond this (and then fails)

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
REFUSALS = frozenset(
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
        document = json.loads(payload, parse_constant=no_json_constant)
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


def _ota_path(creds: DeviceCredentials) -> Path:
    return creds.cert_path.with_suffix(".ota.json")


def image_path(creds: DeviceCredentials, kind: str, slot: str) -> Path:
    """The file of slot `slot` for images of `kind` (e.g. `<id>.firmware-B.img`)."""
    return creds.cert_path.with_suffix(f".{kind}-{slot}.img")


def load_ota(creds: DeviceCredentials) -> OtaState | None:
    return read_saved(_ota_path(creds), ota_from_json)


def save_ota(creds: DeviceCredentials, state: OtaState) -> None:
    """Save the update state atomically (the slot switch is all or nothing, whenever the
    simulator is killed). Not fsynced: it is written on the event loop, for many devices."""
    write_atomically(_ota_path(creds), ota_to_json(state).encode(), sync=False)
