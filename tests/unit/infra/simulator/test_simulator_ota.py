"""The simulated devices' side of OTA updates (an A/B-slot device): command parsing, the
install/rollback state machine with real signed artifacts (streams.ota.artifacts), status reports
the bridge accepts, persistence across a restart, and a rollout of streams.ota driven end to end
through devices (no services: the gmqtt client never connects)."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import gmqtt
import pytest

from infra.provision import DeviceCredentials
from infra.release_key import open_artifact_store
from infra.settings import Settings
from infra.simulator.device import SimulatedDevice, load_seq
from infra.simulator.ota import (
    MAX_HANDLED_COMMANDS,
    ImageSlots,
    InstallCommand,
    OtaState,
    RollbackCommand,
    artifact_file,
    image_path,
    initial_ota,
    load_ota,
    ota_from_json,
    ota_status_message,
    ota_to_json,
    parse_ota_command,
    save_ota,
)
from infra.simulator.protocol import OTA_STATUS, STATE_REPORTED
from infra.simulator.stats import FleetStats
from infra.simulator.twin import FIRMWARE_VERSION, LocalTwin, load_twin
from ingest.envelope import Accepted, validate_ota_status
from streams.ota.artifacts import Artifact, ArtifactStore, ReleaseKey
from streams.ota.events import (
    Approve,
    CreateRollout,
    DeviceReport,
    Tick,
    command_id,
    install_document,
    report_from_event,
)
from streams.ota.model import CommandAction, OtaStatus, Progress, Rollout, RolloutState
from streams.ota.plan import RolloutPlan
from streams.ota.rollout import run
from streams.registry.devices import DeviceRecord
from streams.registry.rbac import GrantSet, Principal, Resource, Role, index_grants
from tests.support.fakes import FakeSubscriber
from tests.support.records import device_record, running_rollout

NOW = 1_700_000_000_000
OLD, NEW = FIRMWARE_VERSION, "2.0.0"
ROLLOUT = "ro-1"
IMAGE = b"fleetstream firmware 2.0.0\n" * 64

T = TypeVar("T")


def _run(scenario: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await scenario()

    return asyncio.run(main())


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return open_artifact_store(
        tmp_path / "artifacts", tmp_path / "pki", passphrase=b"test-passphrase"
    )


@pytest.fixture
def artifact(store: ArtifactStore) -> Artifact:
    return store.add_bytes(IMAGE, "firmware", NEW, name="fw.bin", now_ms=NOW)


@pytest.fixture
def public_pem(tmp_path: Path, store: ArtifactStore) -> bytes:
    return (tmp_path / "pki" / "release.pub").read_bytes()  # what devices pin


def creds(tmp_path: Path, device_id: str = "dev-1") -> DeviceCredentials:
    devices = tmp_path / "devices"
    devices.mkdir(exist_ok=True)
    return DeviceCredentials(
        device_id=device_id,
        key_path=devices / f"{device_id}.key",
        cert_path=devices / f"{device_id}.crt",
        ca_path=devices / "ca.crt",
        serial=1,
    )


def make_device(
    tmp_path: Path,
    store: ArtifactStore | None,
    public_pem: bytes | None,
    *,
    device_id: str = "dev-1",
    fail_rate: float = 0.0,
    step_s: float = 0.0,
    restore: bool = True,
    stats: FleetStats | None = None,
) -> SimulatedDevice:
    """A device as run_fleet builds it (state restored from disk when `restore`)."""
    c = creds(tmp_path, device_id)
    return SimulatedDevice(
        c,
        Settings(),
        stats or FleetStats(devices=1),
        random.Random(3),
        load_seq(c) if restore else None,
        twin=load_twin(c) if restore else None,
        report_interval_s=0.5,
        ota=load_ota(c) if restore else None,
        artifact_root=None if store is None else store.root,
        release_public_key=public_pem,
        ota_fail_rate=fail_rate,
        ota_step_s=step_s,
    )


def record_of(artifact: Artifact, **changes: Any) -> dict[str, Any]:
    """The artifact record as an install command carries it (signature in base64)."""
    record = artifact.to_record()
    record["signature"] = base64.b64encode(artifact.signature).decode("ascii")
    record.update(changes)
    return record


def install_payload(
    record: dict[str, Any],
    *,
    ident: str = "cmd-install",
    version: str | None = None,
    kind: str = "firmware",
    **extra: Any,
) -> bytes:
    document = {
        "action": "install",
        "artifact": record,
        "command_id": ident,
        "kind": kind,
        "rollout_id": ROLLOUT,
        "version": record["version"] if version is None else version,
        **extra,
    }
    return json.dumps(document, sort_keys=True).encode()


def rollback_payload(
    *, ident: str = "cmd-rollback", version: str | None = OLD, from_version: str | None = NEW
) -> bytes:
    document = {
        "action": "rollback",
        "command_id": ident,
        "from_version": from_version,
        "kind": "firmware",
        "rollout_id": ROLLOUT,
        "version": version,
    }
    return json.dumps(document, sort_keys=True).encode()


def statuses(device: SimulatedDevice) -> list[dict[str, Any]]:
    """The OTA status reports queued, in order."""
    topic = f"devices/{device.device_id}/{OTA_STATUS}"
    return [json.loads(payload) for t, payload in device.outbox if t == topic]


def reported(device: SimulatedDevice) -> list[dict[str, Any]]:
    topic = f"devices/{device.device_id}/{STATE_REPORTED}"
    return [json.loads(payload)["reported"] for t, payload in device.outbox if t == topic]


def steps(device: SimulatedDevice) -> list[tuple[str, str | None, str | None]]:
    return [(s["status"], s.get("version"), s.get("reason")) for s in statuses(device)]


async def handle(device: SimulatedDevice, *payloads: bytes) -> SimulatedDevice:
    for payload in payloads:
        device.on_ota_command(payload)
    await device.ota_settled()
    return device


def handled(
    tmp_path: Path,
    store: ArtifactStore | None,
    public_pem: bytes | None,
    *payloads: bytes,
    **device: Any,
) -> SimulatedDevice:
    """A new device (make_device with `device`) once it has handled `payloads`."""
    return _run(lambda: handle(make_device(tmp_path, store, public_pem, **device), *payloads))


# --------------------------------------------------------------------------- commands


def test_parse_install_decodes_the_signature(artifact: Artifact) -> None:
    command = parse_ota_command(install_payload(record_of(artifact), extra_key="ignored"))
    assert isinstance(command, InstallCommand)
    assert (command.command_id, command.rollout_id, command.kind, command.version) == (
        "cmd-install",
        ROLLOUT,
        "firmware",
        NEW,
    )
    assert command.artifact["signature"] == artifact.signature
    assert Artifact.from_record(command.artifact) == artifact


def test_parse_rollback() -> None:
    command = parse_ota_command(rollback_payload())
    assert command == RollbackCommand("cmd-rollback", ROLLOUT, "firmware", OLD, NEW)
    unknown = parse_ota_command(rollback_payload(version=None))
    assert isinstance(unknown, RollbackCommand)
    assert unknown.version is None


def test_parse_the_platforms_install_command(artifact: Artifact) -> None:
    """The command streams.ota sends parses to the artifact it names."""
    rollout = running_rollout(artifact, ROLLOUT, created_ms=NOW, updated_ms=NOW)
    document = install_document(rollout, "dev-1")
    command = parse_ota_command(json.dumps(document, sort_keys=True).encode())
    assert isinstance(command, InstallCommand)
    assert command.command_id == command_id(ROLLOUT, "dev-1", CommandAction.install)
    assert Artifact.from_record(command.artifact) == artifact


def _install(**changes: Any) -> bytes:
    document: dict[str, Any] = {
        "action": "install",
        "artifact": {"version": NEW},
        "command_id": "c",
        "kind": "firmware",
        "rollout_id": "r",
        "version": NEW,
    }
    document.update(changes)
    return json.dumps(document).encode()


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"garbage",
        b"\xff\xfe",
        b"[]",
        b'"install"',
        b'{"action": "install", "version": NaN}',
        b"[" * 100_000,
        _install(action="reboot"),
        _install(action=None),
        _install(command_id=None),
        _install(command_id=""),
        _install(command_id=7),
        _install(command_id="x" * 257),
        _install(rollout_id=None),
        _install(kind="bootloader"),
        _install(kind=None),
        _install(version=None),
        _install(version=2),
        _install(artifact=None),
        _install(artifact="sha256/abc"),
        json.dumps({"action": "rollback", "command_id": "c", "rollout_id": "r"}).encode(),
        json.dumps(
            {"action": "rollback", "command_id": "c", "rollout_id": "r", "kind": "firmware"}
            | {"version": 1}
        ).encode(),
    ],
)
def test_parse_refuses_malformed_commands(payload: bytes) -> None:
    with pytest.raises(ValueError, match=r"not JSON|top level|must be|action"):
        parse_ota_command(payload)


def test_a_signature_that_is_not_base64_is_an_invalid_record(artifact: Artifact) -> None:
    command = parse_ota_command(install_payload(record_of(artifact, signature="not base64!")))
    assert isinstance(command, InstallCommand)
    assert command.artifact["signature"] == b""


# --------------------------------------------------------------------------- pure state


def test_image_slots() -> None:
    slots = ImageSlots(OLD)
    assert (slots.version, slots.inactive, slots.kept) == (OLD, "B", None)
    installed = slots.with_slot("B", NEW).switched()
    assert (installed.version, installed.inactive, installed.kept) == (NEW, "A", OLD)
    back = installed.switched()
    assert (back.version, back.kept) == (OLD, NEW)
    assert slots.with_slot("A", None).version is None


def test_handled_ids_are_bounded_and_kept_in_order() -> None:
    state = initial_ota()
    for i in range(MAX_HANDLED_COMMANDS + 5):
        state = state.with_handled(f"c{i}")
    assert len(state.handled) == MAX_HANDLED_COMMANDS
    assert state.handled[-1] == f"c{MAX_HANDLED_COMMANDS + 4}"
    assert "c0" not in state.handled
    assert state.with_handled(state.handled[0]) is state


def test_ota_json_round_trip() -> None:
    state = OtaState(
        {"firmware": ImageSlots(OLD, NEW, "B"), "config": ImageSlots(None, "c1", "B")},
        ("a", "b"),
    )
    assert ota_from_json(ota_to_json(state)) == state
    assert ota_from_json(ota_to_json(initial_ota())) == initial_ota()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        "[]",
        '{"handled": []}',
        '{"slots": [], "handled": []}',
        '{"slots": {}, "handled": {}}',
        '{"slots": {}, "handled": [1]}',
        '{"slots": {"kernel": {"active": "A", "A": "1", "B": null}}}',
        '{"slots": {"firmware": {"active": "C", "A": "1", "B": null}}}',
        '{"slots": {"firmware": {"active": "A", "A": 1, "B": null}}}',
        '{"slots": {"firmware": []}}',
    ],
)
def test_ota_from_json_refuses_what_it_did_not_write(text: str) -> None:
    assert ota_from_json(text) is None


def test_artifact_file_stays_in_the_store(
    tmp_path: Path, store: ArtifactStore, artifact: Artifact
) -> None:
    root = store.root
    assert artifact_file(root, artifact.to_record()) == store.blob_path(artifact.sha256).resolve()
    without_path = {**artifact.to_record(), "path": None}
    assert artifact_file(root, without_path) == store.blob_path(artifact.sha256).resolve()
    for path in ("../pki/release.key", "/etc/passwd", "sha256/../../pki/release.key", "."):
        assert artifact_file(root, {"path": path}) is None
    assert artifact_file(root, {"path": None, "sha256": "../x"}) is None


# --------------------------------------------------------------------------- reports


def _accepted(device_id: str, payload: bytes) -> dict[str, Any]:
    # Received as sent: its ts must lie in the bridge's window around the receive time.
    result = validate_ota_status(device_id, payload, json.loads(payload)["ts"])
    assert isinstance(result, Accepted), result
    return result.record


def test_status_messages_are_what_the_bridge_accepts() -> None:
    command = RollbackCommand("cmd-1", ROLLOUT, "firmware", OLD, NEW)
    topic, payload = ota_status_message("dev-1", 5, NOW, command, "failed", OLD, "no_kept_image")
    assert topic == "devices/dev-1/ota/status"
    assert json.loads(payload) == {
        "seq": 5,
        "ts": NOW,
        "status": "failed",
        "version": OLD,
        "reason": "no_kept_image",
        "command_id": "cmd-1",
        "rollout_id": ROLLOUT,
    }
    record = _accepted("dev-1", payload)
    assert report_from_event(record) == DeviceReport(
        device_id="dev-1",
        status=OtaStatus.failed,
        seq=5,
        version=OLD,
        reason="no_kept_image",
        command_id="cmd-1",
        rollout_id=ROLLOUT,
    )
    _, unversioned = ota_status_message("dev-1", 6, NOW, command, "succeeded", None)
    assert "version" not in json.loads(unversioned)
    assert "reason" not in json.loads(unversioned)
    assert isinstance(validate_ota_status("dev-1", unversioned, NOW), Accepted)


# --------------------------------------------------------------------------- the device


def test_install_switches_slots_and_reports_each_step(
    tmp_path: Path, store: ArtifactStore, artifact: Artifact, public_pem: bytes
) -> None:
    stats = FleetStats(devices=1)
    c = creds(tmp_path)
    c.cert_path.with_suffix(".seq.json").write_text(json.dumps({"telemetry": 9, OTA_STATUS: 4}))
    device = handled(tmp_path, store, public_pem, install_payload(record_of(artifact)), stats=stats)
    assert steps(device) == [
        ("downloading", NEW, None),
        ("verifying", NEW, None),
        ("installing", NEW, None),
        ("succeeded", NEW, None),
    ]
    reports = statuses(device)
    assert [r["seq"] for r in reports] == [5, 6, 7, 8]  # continues from disk
    assert {(r["command_id"], r["rollout_id"]) for r in reports} == {("cmd-install", ROLLOUT)}
    for report in reports:
        record = _accepted("dev-1", json.dumps(report).encode())
        parsed = report_from_event(record)
        assert parsed is not None
        assert (parsed.status, parsed.version, parsed.command_id, parsed.rollout_id) == (
            OtaStatus(report["status"]),
            NEW,
            "cmd-install",
            ROLLOUT,
        )
    # The new version runs, the old one is kept for a rollback; the twin follows.
    assert device.ota.slots_of("firmware") == ImageSlots(OLD, NEW, "B")
    assert device.twin.reported["firmware"] == NEW
    assert reported(device) == [{"firmware": NEW}]
    assert image_path(c, "firmware", "B").read_bytes() == IMAGE
    # Persisted: slots, handled id, twin, seq.
    saved = load_ota(c)
    assert saved is not None
    assert saved.version() == NEW
    assert saved.handled == ("cmd-install",)
    twin = load_twin(c)
    assert twin is not None
    assert twin.reported["firmware"] == NEW
    assert load_seq(c)[OTA_STATUS] == 8
    assert (stats.ota_commands, stats.ota_succeeded, stats.ota_failed, stats.ota_refused) == (
        1,
        1,
        0,
        0,
    )


def _tamper(store: ArtifactStore, artifact: Artifact, data: bytes) -> None:
    blob = store.blob_path(artifact.sha256)
    blob.unlink()  # another file in its place (as a tampering mirror would serve)
    blob.write_bytes(data)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"X" + IMAGE[1:], "digest_mismatch"),  # same size, other bytes
        (IMAGE + b"tail", "size_mismatch"),
    ],
)
def test_tampered_downloads_are_refused(
    tmp_path: Path,
    store: ArtifactStore,
    artifact: Artifact,
    public_pem: bytes,
    data: bytes,
    reason: str,
) -> None:
    _tamper(store, artifact, data)
    stats = FleetStats(devices=1)
    device = handled(tmp_path, store, public_pem, install_payload(record_of(artifact)), stats=stats)
    assert steps(device) == [
        ("downloading", NEW, None),
        ("verifying", NEW, None),
        ("failed", OLD, reason),  # still running the old version
    ]
    assert device.ota.version() == OLD
    assert device.ota.slots_of("firmware").kept is None
    assert device.twin.reported["firmware"] == OLD
    assert reported(device) == []
    assert not image_path(creds(tmp_path), "firmware", "B").exists()
    assert (stats.ota_refused, stats.ota_failed, stats.ota_succeeded) == (1, 0, 0)
    record = _accepted("dev-1", json.dumps(statuses(device)[-1]).encode())
    assert record["message"] == reason
    saved = load_ota(creds(tmp_path))
    assert saved is not None
    assert (saved.version(), saved.handled) == (OLD, ("cmd-install",))


def _flipped(signature: bytes) -> bytes:
    return bytes([signature[0] ^ 0x01]) + signature[1:]


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"signature": "flip"}, "bad_signature"),
        ({"version": "3.0.0"}, "bad_signature"),  # the signed manifest names 2.0.0
        ({"signature": "not base64!"}, "invalid_record"),
        ({"sha256": "0" * 64}, "invalid_record"),  # an artifact's id is its sha256
    ],
)
def test_forged_records_are_refused(
    tmp_path: Path,
    store: ArtifactStore,
    artifact: Artifact,
    public_pem: bytes,
    changes: dict[str, Any],
    reason: str,
) -> None:
    if changes.get("signature") == "flip":
        changes = {"signature": base64.b64encode(_flipped(artifact.signature)).decode()}
    device = handled(
        tmp_path, store, public_pem, install_payload(record_of(artifact, **changes), version=NEW)
    )
    assert steps(device)[-1] == ("failed", OLD, reason)
    assert device.ota.version() == OLD
    assert device.stats.ota_refused == 1


def test_an_artifact_signed_by_another_key_is_refused(
    tmp_path: Path, store: ArtifactStore, public_pem: bytes
) -> None:
    other = ArtifactStore(store.root, ReleaseKey.generate())
    forged = other.add_bytes(b"evil firmware", "firmware", "6.6.6")
    device = handled(tmp_path, store, public_pem, install_payload(record_of(forged)))
    assert steps(device)[-1] == ("failed", OLD, "wrong_key")
    assert device.ota.version() == OLD


@pytest.mark.parametrize(
    ("extra", "reason"),
    [({"version": "9.9.9"}, "version_mismatch"), ({"kind": "config"}, "kind_mismatch")],
)
def test_a_command_must_name_the_signed_version_and_kind(
    tmp_path: Path,
    store: ArtifactStore,
    artifact: Artifact,
    public_pem: bytes,
    extra: dict[str, str],
    reason: str,
) -> None:
    device = handled(tmp_path, store, public_pem, install_payload(record_of(artifact), **extra))
    assert steps(device)[-1][2] == reason
    assert device.ota.version() == OLD


def test_without_store_key_or_file_the_install_fails(
    tmp_path: Path, store: ArtifactStore, artifact: Artifact, public_pem: bytes
) -> None:
    async def scenario() -> list[tuple[str, str | None, str | None]]:
        no_store = await handle(
            make_device(tmp_path, None, public_pem, device_id="d1"),
            install_payload(record_of(artifact)),
        )
        no_key = await handle(
            make_device(tmp_path, store, None, device_id="d2"),
            install_payload(record_of(artifact)),
        )
        missing = await handle(
            make_device(tmp_path, store, public_pem, device_id="d3"),
            install_payload(record_of(artifact, path="sha256/" + "0" * 64)),
        )
        return [steps(d)[-1] for d in (no_store, no_key, missing)]

    assert _run(scenario) == [
        ("failed", OLD, "no_artifact_store"),
        ("failed", OLD, "no_release_key"),
        ("failed", OLD, "download_failed"),
    ]


def test_an_injected_failure_fails_after_installing(
    tmp_path: Path, store: ArtifactStore, artifact: Artifact, public_pem: bytes
) -> None:
    stats = FleetStats(devices=1)
    device = handled(
        tmp_path,
        store,
        public_pem,
        install_payload(record_of(artifact)),
        fail_rate=1.0,
        stats=stats,
    )
    assert device.ota_faulty
    assert steps(device) == [
        ("downloading", NEW, None),
        ("verifying", NEW, None),
        ("installing", NEW, None),
        ("failed", OLD, "install_error"),
    ]
    assert device.ota.version() == OLD
    assert device.twin.reported["firmware"] == OLD
    assert not image_path(creds(tmp_path), "firmware", "B").exists()
    assert (stats.ota_failed, stats.ota_refused, stats.ota_succeeded) == (1, 0, 0)


def test_the_failure_rate_picks_devices_with_their_own_rng(tmp_path: Path) -> None:
    c = creds(tmp_path, "d")

    def faulty(rate: float, seed: int) -> bool:
        device = SimulatedDevice(
            c, Settings(), FleetStats(), random.Random(seed), ota_fail_rate=rate
        )
        return device.ota_faulty

    picked = [faulty(0.3, seed) for seed in range(200)]
    assert 30 < sum(picked) < 90
    assert picked == [faulty(0.3, seed) for seed in range(200)]  # deterministic
    assert not any(faulty(0.0, seed) for seed in range(50))


def test_rollback_returns_to_the_kept_image(
    tmp_path: Path, store: ArtifactStore, artifact: Artifact, public_pem: bytes
) -> None:
    stats = FleetStats(devices=1)

    async def scenario() -> SimulatedDevice:
        device = await handle(
            make_device(tmp_path, store, public_pem, stats=stats),
            install_payload(record_of(artifact)),
        )
        assert device.ota.version() == NEW
        return await handle(device, rollback_payload())

    device = _run(scenario)
    assert steps(device)[-1] == ("succeeded", OLD, None)
    assert statuses(device)[-1]["command_id"] == "cmd-rollback"
    assert device.ota.slots_of("firmware") == ImageSlots(OLD, NEW, "A")
    assert device.twin.reported["firmware"] == OLD
    assert reported(device) == [{"firmware": NEW}, {"firmware": OLD}]
    saved = load_ota(creds(tmp_path))
    assert saved is not None
    assert saved.version() == OLD
    assert (stats.ota_commands, stats.ota_succeeded) == (2, 2)


def test_rollback_without_a_kept_image_fails(tmp_path: Path) -> None:
    stats = FleetStats(devices=1)
    device = handled(
        tmp_path, None, None, rollback_payload(from_version=OLD, version="0.9.0"), stats=stats
    )
    assert steps(device) == [("failed", OLD, "no_kept_image")]
    assert device.ota.version() == OLD
    assert (stats.ota_failed, stats.ota_succeeded) == (1, 0)


def test_rollback_of_an_update_never_switched_to_changes_nothing(
    tmp_path: Path, store: ArtifactStore, artifact: Artifact, public_pem: bytes
) -> None:
    install = install_payload(record_of(artifact))
    device = handled(tmp_path, store, public_pem, install, rollback_payload(), fail_rate=1.0)
    assert steps(device)[-2:] == [("failed", OLD, "install_error"), ("succeeded", OLD, None)]
    assert device.ota.version() == OLD


def test_commands_run_one_at_a_time_in_order(
    tmp_path: Path, store: ArtifactStore, artifact: Artifact, public_pem: bytes
) -> None:
    """A rollback arriving during an install waits for it, then undoes it."""

    install = install_payload(record_of(artifact))
    device = handled(tmp_path, store, public_pem, install, rollback_payload(), step_s=0.01)
    assert [s for s, _, _ in steps(device)] == [
        "downloading",
        "verifying",
        "installing",
        "succeeded",
        "succeeded",
    ]
    assert [r["command_id"] for r in statuses(device)][-1] == "cmd-rollback"
    assert [r["seq"] for r in statuses(device)] == [1, 2, 3, 4, 5]
    assert device.ota.version() == OLD


def test_installing_the_running_version_succeeds_at_once(
    tmp_path: Path, store: ArtifactStore, artifact: Artifact, public_pem: bytes
) -> None:
    async def scenario() -> SimulatedDevice:
        device = await handle(
            make_device(tmp_path, store, public_pem), install_payload(record_of(artifact))
        )
        return await handle(device, install_payload(record_of(artifact), ident="cmd-again"))

    device = _run(scenario)
    assert steps(device)[-1] == ("succeeded", NEW, None)
    assert device.ota.slots_of("firmware") == ImageSlots(OLD, NEW, "B")  # OLD still kept


def test_a_repeated_command_id_is_ignored(
    tmp_path: Path, store: ArtifactStore, artifact: Artifact, public_pem: bytes
) -> None:
    stats = FleetStats(devices=1)
    payload = install_payload(record_of(artifact))

    async def scenario() -> SimulatedDevice:
        device = make_device(tmp_path, store, public_pem, stats=stats, step_s=0.01)
        device.on_ota_command(payload)
        device.on_ota_command(payload)  # while under way
        await device.ota_settled()
        return await handle(device, payload)  # once handled

    device = _run(scenario)
    assert len(statuses(device)) == 4
    assert stats.ota_commands == 1

    async def after_restart() -> SimulatedDevice:  # the handled ids persist
        return await handle(make_device(tmp_path, store, public_pem, stats=stats), payload)

    restarted = _run(after_restart)
    assert statuses(restarted) == []
    assert stats.ota_commands == 1


@pytest.mark.parametrize(
    "payload",
    [b"garbage", b"{}", b'{"action": "install", "command_id": "c"}', b"[1]", b"\x00" * 10],
)
def test_malformed_commands_are_ignored(
    tmp_path: Path, payload: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    stats = FleetStats(devices=1)
    caplog.set_level("DEBUG", logger="fleetstream.simulator")
    device = handled(tmp_path, None, None, payload, stats=stats)
    assert list(device.outbox) == []
    assert stats.ota_commands == 0
    assert "malformed OTA command" in caplog.text


def test_a_kill_mid_update_restarts_on_the_old_version(
    tmp_path: Path,
    store: ArtifactStore,
    artifact: Artifact,
    public_pem: bytes,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Killed with the new image complete in slot B but the switch not yet written: a
    restarted simulator runs (and reports) the old version, and can take the update again."""
    c = creds(tmp_path)

    async def killed() -> SimulatedDevice:
        device = make_device(tmp_path, store, public_pem)
        pauses = 0

        async def step() -> None:  # the pause after writing the image never ends
            nonlocal pauses
            pauses += 1
            await asyncio.sleep(3600 if pauses == 3 else 0)

        monkeypatch.setattr(device, "_ota_step", step)
        device.on_ota_command(install_payload(record_of(artifact)))
        while pauses < 3:
            await asyncio.sleep(0.001)
        assert image_path(c, "firmware", "B").read_bytes() == IMAGE
        await device.close()  # cut off like a power loss
        return device

    device = _run(killed)
    assert [s["status"] for s in statuses(device)] == ["downloading", "verifying", "installing"]
    assert device.stats.ota_succeeded == device.stats.ota_failed == 0
    saved = load_ota(c)
    assert saved is not None
    assert saved.version() == OLD
    assert saved.slots_of("firmware").kept is None  # the overwritten slot is no rollback target
    assert saved.handled == ()
    twin = load_twin(c)
    assert twin is None or twin.reported["firmware"] == OLD

    async def restarted() -> SimulatedDevice:
        again = make_device(tmp_path, store, public_pem)
        assert again.ota.version() == OLD
        again._on_connect(FakeSubscriber(), 0, 0, {})  # reports the whole document
        assert reported(again)[0]["firmware"] == OLD
        # The command arrives again (not handled before the kill): now it completes.
        return await handle(again, install_payload(record_of(artifact)))

    again = _run(restarted)
    assert [s["seq"] for s in statuses(again)] == [4, 5, 6, 7]  # the seqs were saved
    assert steps(again)[-1] == ("succeeded", NEW, None)
    assert again.ota.slots_of("firmware") == ImageSlots(OLD, NEW, "B")


def test_the_slots_win_over_a_twin_saved_before_the_switch(tmp_path: Path) -> None:
    c = creds(tmp_path)
    save_ota(c, OtaState({"firmware": ImageSlots(OLD, NEW, "B")}))
    c.cert_path.with_suffix(".twin.json").write_text(
        json.dumps({"reported": {"firmware": OLD, "led": "on"}, "version": 3})
    )
    device = make_device(tmp_path, None, None)
    assert device.twin == LocalTwin({"firmware": NEW, "led": "on"}, 3)


def test_a_device_without_ota_state_starts_from_its_twins_firmware(tmp_path: Path) -> None:
    c = creds(tmp_path)
    c.cert_path.with_suffix(".twin.json").write_text(
        json.dumps({"reported": {"firmware": "1.5.0"}, "version": 1})
    )
    device = make_device(tmp_path, None, None)
    assert device.ota == initial_ota("1.5.0")
    assert load_ota(c) is None  # nothing written before an update


# --------------------------------------------------------------------------- gmqtt wiring


def test_every_connect_subscribes_to_desired_state_and_ota_commands(tmp_path: Path) -> None:
    async def scenario() -> FakeSubscriber:
        device = make_device(tmp_path, None, None)
        client = FakeSubscriber()
        device._on_connect(client, 0, 0, {})
        device._on_connect(client, 1, 0, {})  # a reconnect
        return client

    client = _run(scenario)
    (first, subs), *again = client.calls
    assert first == "subscribe"
    assert all(isinstance(s, gmqtt.Subscription) for s in subs)
    assert [(s.topic, s.qos) for s in subs] == [
        ("devices/dev-1/state/desired", 1),
        ("devices/dev-1/ota/command", 1),
    ]
    assert again == [("resubscribe", subs[0]), ("resubscribe", subs[1])]  # same objects


def _publish_packet(topic: str, payload: bytes) -> tuple[int, bytes]:
    """A QoS 0 MQTT 5 PUBLISH as gmqtt's handler receives it: (fixed header, rest)."""
    name = topic.encode()
    return 0x30, struct.pack("!H", len(name)) + name + b"\x00" + payload


def test_gmqtt_delivers_ota_commands_to_the_device(
    tmp_path: Path, store: ArtifactStore, artifact: Artifact, public_pem: bytes
) -> None:
    async def scenario() -> SimulatedDevice:
        device = make_device(tmp_path, store, public_pem)
        cmd, packet = _publish_packet(
            "devices/dev-1/ota/command", install_payload(record_of(artifact))
        )
        device.client._package_handler._handle_publish_packet(cmd, packet)
        client = device.client
        assert device._on_message(client, "devices/dev-2/ota/command", b"{}", 1, {}) == 0
        assert device._on_message(client, "devices/dev-1/ota/command", b"junk", 1, {}) == 0
        await device.ota_settled()
        return device

    device = _run(scenario)
    assert steps(device)[-1] == ("succeeded", NEW, None)
    assert device.stats.ota_commands == 1
    assert device.stats.desired_received == 0


def test_fleet_stats_summary_has_the_ota_counters() -> None:
    summary = FleetStats(ota_commands=4, ota_succeeded=2, ota_failed=1, ota_refused=1).summary()
    assert {k: summary[k] for k in ("ota_commands", "ota_succeeded", "ota_failed")} == {
        "ota_commands": 4,
        "ota_succeeded": 2,
        "ota_failed": 1,
    }
    assert summary["ota_refused"] == 1


# --------------------------------------------------------------------------- with streams.ota

ORG, PROJECT, GROUP = "acme", "plant-1", "sensors"
OPERATOR, APPROVER = Principal.user("oscar"), Principal.user("aria")
GRANTS = index_grants(
    [
        GrantSet.of(OPERATOR, (Role.operator, Resource(ORG, PROJECT))),
        GrantSet.of(APPROVER, (Role.ota_approver, Resource(ORG, PROJECT))),
    ]
)


def registry_record(device_id: str) -> DeviceRecord:
    return device_record(
        device_id,
        org=ORG,
        project=PROJECT,
        group=GROUP,
        firmware_version=OLD,
        created_ms=NOW,
        updated_ms=NOW,
    )


def _rollout_through_devices(
    tmp_path: Path,
    store: ArtifactStore,
    artifact: Artifact,
    public_pem: bytes,
    faulty: set[str],
) -> tuple[Rollout, dict[str, SimulatedDevice]]:
    """A rollout of one cohort driven by streams.ota, its commands carried to simulated
    devices and their reports back, through the bridge's validation."""
    ids = ["d-0", "d-1"]
    records = {d: registry_record(d) for d in ids}
    plan = RolloutPlan(canary_size=2, percentages=(100,), health_window_s=0, error_threshold=0.4)
    create = CreateRollout(
        request_id="req-create",
        principal=OPERATOR,
        rollout_id=ROLLOUT,
        artifact=artifact,
        target=Resource(ORG, PROJECT, GROUP),
        plan=plan,
    )

    async def scenario() -> tuple[Rollout, dict[str, SimulatedDevice]]:
        devices = {
            d: make_device(tmp_path, store, public_pem, device_id=d, fail_rate=float(d in faulty))
            for d in ids
        }
        now = NOW
        result = run(None, [create], now_ms=now, grants=GRANTS, devices=records)
        result = run(
            result.rollout,
            [Approve(request_id="req-approve", principal=APPROVER), Tick()],
            now_ms=now,
            grants=GRANTS,
            devices=records,
        )
        seen: dict[str, int] = dict.fromkeys(ids, 0)
        for _ in range(10):
            for command in result.commands:
                devices[command.device_id].on_ota_command(command.payload)
            for device in devices.values():
                await device.ota_settled()
            events: list[Any] = []
            for d, device in devices.items():
                for report in statuses(device)[seen[d] :]:
                    record = _accepted(d, json.dumps(report).encode())
                    event = report_from_event({**record, "device_id": d})
                    assert event is not None
                    events.append(event)
                seen[d] = len(statuses(device))
            now += 1000
            assert result.rollout is not None
            result = run(
                result.rollout, [*events, Tick()], now_ms=now, grants=GRANTS, devices=records
            )
            assert result.rollout is not None
            if result.rollout.final:
                break
        assert result.rollout is not None
        return result.rollout, devices

    return _run(scenario)


def test_a_rollout_completes_through_the_devices(
    tmp_path: Path, store: ArtifactStore, artifact: Artifact, public_pem: bytes
) -> None:
    rollout, devices = _rollout_through_devices(tmp_path, store, artifact, public_pem, set())
    assert rollout.state is RolloutState.completed
    assert {d.status for d in rollout.devices.values()} == {Progress.succeeded}
    assert all(device.ota.version() == NEW for device in devices.values())


def test_a_failing_device_rolls_the_cohort_back(
    tmp_path: Path, store: ArtifactStore, artifact: Artifact, public_pem: bytes
) -> None:
    rollout, devices = _rollout_through_devices(tmp_path, store, artifact, public_pem, {"d-1"})
    assert rollout.state is RolloutState.rolled_back
    assert {d.status for d in rollout.devices.values()} == {Progress.rolled_back}
    assert all(device.ota.version() == OLD for device in devices.values())
    assert steps(devices["d-0"])[-1] == ("succeeded", OLD, None)
