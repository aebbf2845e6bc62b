"""The simulated devices' side of device twins: merging a desired delta into the reported
document, ignoring repeats and malformed messages, the reported message, persistence, and the
wiring into gmqtt 0.8 (no broker: gmqtt's packet handler is fed directly)."""

from __future__ import annotations

import asyncio
import json
import random
import struct
from pathlib import Path
from typing import Any

import gmqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infra.provision import DeviceCredentials
from infra.settings import Settings
from infra.simulator.device import SimulatedDevice, load_seq, save_seq
from infra.simulator.protocol import STATE_REPORTED, build_message
from infra.simulator.stats import FleetStats
from infra.simulator.twin import (
    MAX_STATE_DEPTH,
    NO_VERSION,
    DesiredUpdate,
    LocalTwin,
    apply_desired,
    initial_reported,
    is_stale,
    load_twin,
    merge_reported,
    parse_desired,
    reported_message,
    save_twin,
    twin_from_json,
    twin_to_json,
)
from ingest.envelope import Accepted as EnvelopeAccepted
from ingest.envelope import parse_uplink_topic, validate_reported
from streams.hot.twin import MAX_DEPTH, Twin, apply_reported
from streams.hot.twin import Accepted as TwinAccepted
from tests.support.fakes import FakeSubscriber
from tests.support.records import nested

NOW = 1_700_000_000_000


def desired_payload(version: Any, state: Any, **extra: Any) -> bytes:
    return json.dumps({"version": version, "state": state, "timestamp": NOW, **extra}).encode()


# --------------------------------------------------------------------------- merge


@pytest.mark.parametrize(
    ("document", "patch", "expected"),
    [
        ({"a": 1}, {"b": 2}, {"a": 1, "b": 2}),  # a new key
        ({"a": 1}, {"a": "x"}, {"a": "x"}),  # replaced
        ({"a": 1, "b": 2}, {"a": None}, {"b": 2}),  # null removes
        ({"a": 1}, {"z": None}, {"a": 1}),  # removing a missing key changes nothing
        ({"n": {"x": 1, "y": 2}}, {"n": {"y": 3, "z": 4}}, {"n": {"x": 1, "y": 3, "z": 4}}),
        ({"n": {"x": 1, "y": 2}}, {"n": {"x": None}}, {"n": {"y": 2}}),  # nested removal
        ({"n": {"x": 1}}, {"n": {"x": None}}, {}),  # an object emptied by removals is dropped
        ({"a": 5}, {"a": {"x": 1}}, {"a": {"x": 1}}),  # a scalar replaced by an object
        ({"a": 5}, {"a": {}}, {"a": 5}),  # an object with nothing to set changes nothing
        ({"a": 5}, {"a": {"x": None}}, {"a": 5}),
        ({"n": {"x": 1}}, {"n": 7}, {"n": 7}),  # an object replaced by a scalar
        ({"l": [1, 2, 3]}, {"l": [4]}, {"l": [4]}),  # lists replace whole
        ({}, {"n": {"m": {"k": True}}}, {"n": {"m": {"k": True}}}),
    ],
)
def test_merge_reported(
    document: dict[str, Any], patch: dict[str, Any], expected: dict[str, Any]
) -> None:
    assert merge_reported(document, patch) == expected


def test_merge_changes_neither_argument_and_copies_the_patch() -> None:
    document = {"n": {"x": 1}, "keep": [1]}
    patch: dict[str, Any] = {"n": {"y": 2}, "l": [1, {"deep": 1}]}
    before = json.dumps([document, patch], sort_keys=True)
    merged = merge_reported(document, patch)
    assert json.dumps([document, patch], sort_keys=True) == before
    patch["l"][1]["deep"] = 99
    assert merged["l"] == [1, {"deep": 1}]


_keys = st.sampled_from(["a", "b", "c", "firmware", "report_interval_s"])
_scalars = st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=3)


def _patches(depth: int) -> st.SearchStrategy[dict[str, Any]]:
    values: st.SearchStrategy[Any] = _scalars | st.lists(_scalars, max_size=2)
    if depth > 1:
        values = values | _patches(depth - 1)
    return st.dictionaries(_keys, values, max_size=4)


@settings(max_examples=300)
@given(st.lists(_patches(MAX_DEPTH - 1), max_size=4), _patches(MAX_DEPTH - 1))
def test_merge_matches_the_platform_twin(
    history: list[dict[str, Any]], patch: dict[str, Any]
) -> None:
    """The device's document after a patch is the twin's reported document after it."""
    document: dict[str, Any] = {}
    twin = Twin(device_id="dev-1")
    for seq, step in enumerate([*history, patch]):
        document = merge_reported(document, step)
        result = apply_reported(twin, step, seq, NOW)
        assert isinstance(result, TwinAccepted)
        twin = result.twin
        assert document == twin.reported


# --------------------------------------------------------------------------- versions


@pytest.mark.parametrize(
    ("version", "last", "stale"),
    [(0, NO_VERSION, False), (1, 0, False), (5, 5, True), (4, 5, True), (6, 5, False)],
)
def test_is_stale(version: int, last: int, stale: bool) -> None:
    assert is_stale(version, last) is stale


def test_apply_desired_merges_and_records_the_version() -> None:
    twin = LocalTwin({"firmware": "1.0.0", "led": "off"}, version=3)
    after = apply_desired(twin, DesiredUpdate(4, {"led": "on", "mode": {"eco": True}}))
    assert after == LocalTwin({"firmware": "1.0.0", "led": "on", "mode": {"eco": True}}, 4)
    assert twin == LocalTwin({"firmware": "1.0.0", "led": "off"}, version=3)  # unchanged


@pytest.mark.parametrize("version", [3, 2, 0])
def test_apply_desired_ignores_repeats(version: int) -> None:
    twin = LocalTwin({"led": "off"}, version=3)
    assert apply_desired(twin, DesiredUpdate(version, {"led": "on"})) is None


# --------------------------------------------------------------------------- parsing


def test_parse_desired() -> None:
    update = parse_desired(desired_payload(7, {"led": "on", "n": {"x": None}}))
    assert update == DesiredUpdate(7, {"led": "on", "n": {"x": None}})
    assert parse_desired(b'{"version": 0, "state": {}}') == DesiredUpdate(0, {})


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not json",
        b"\xff\xfe\x00",
        b"[1, 2]",
        b'"text"',
        b'{"state": {}}',  # no version
        desired_payload(None, {}),
        desired_payload(True, {}),
        desired_payload(1.5, {}),
        desired_payload("3", {}),
        desired_payload(-1, {}),
        b'{"version": 1}',  # no state
        desired_payload(1, None),
        desired_payload(1, [1]),
        desired_payload(1, "on"),
        b'{"version": 1, "state": {"t": NaN}}',
        b'{"version": 1, "state": {"t": Infinity}}',
        desired_payload(1, nested(MAX_STATE_DEPTH + 1)),
        b'{"version": 1, "state": ' + b'{"n": ' * 100_000 + b"1" + b"}" * 100_001,
    ],
)
def test_parse_desired_refuses_malformed(payload: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the message varies by case
        parse_desired(payload)


def test_parse_desired_takes_the_deepest_allowed_state() -> None:
    assert parse_desired(desired_payload(1, nested(MAX_STATE_DEPTH))).version == 1


# --------------------------------------------------------------------------- messages


def test_reported_message_is_what_the_bridge_accepts() -> None:
    patch = {"led": "on", "mode": {"eco": True, "old": None}}
    topic, payload = reported_message("dev-1", 12, NOW, patch)
    assert topic == "devices/dev-1/state/reported"
    assert parse_uplink_topic(topic) == ("dev-1", STATE_REPORTED)
    assert json.loads(payload) == {"seq": 12, "ts": NOW, "reported": patch}
    result = validate_reported("dev-1", payload, NOW + 5)
    assert isinstance(result, EnvelopeAccepted)
    assert result.record["seq"] == 12
    assert json.loads(result.record["patch"]) == patch


def test_build_message_keeps_the_telemetry_shape() -> None:
    topic, payload = build_message("dev-1", "telemetry", 3, NOW, {"temperature": 21.5})
    assert topic == "devices/dev-1/telemetry"
    assert json.loads(payload) == {"seq": 3, "ts": NOW, "temperature": 21.5}


def test_initial_reported() -> None:
    assert initial_reported(0.5) == {"firmware": "1.0.0", "report_interval_s": 0.5}


# --------------------------------------------------------------------------- persistence


def _creds(tmp_path: Path, device_id: str = "dev-1") -> DeviceCredentials:
    return DeviceCredentials(
        device_id=device_id,
        key_path=tmp_path / f"{device_id}.key",
        cert_path=tmp_path / f"{device_id}.crt",
        ca_path=tmp_path / "ca.crt",
        serial=1,
    )


def test_twin_json_round_trip() -> None:
    twin = LocalTwin({"led": "on", "n": {"x": [1, 2]}}, version=9)
    assert twin_from_json(twin_to_json(twin)) == twin
    assert twin_from_json('{"reported": {}}') == LocalTwin({}, NO_VERSION)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "nonsense",
        "[]",
        '{"version": 1}',
        '{"reported": [], "version": 1}',
        '{"reported": {}, "version": "1"}',
        '{"reported": {}, "version": true}',
    ],
)
def test_twin_from_json_refuses_what_it_did_not_write(text: str) -> None:
    assert twin_from_json(text) is None


def test_twin_file_sits_beside_the_seq_file(tmp_path: Path) -> None:
    creds = _creds(tmp_path)
    assert load_twin(creds) is None
    save_twin(creds, LocalTwin({"led": "on"}, 4))
    save_seq(creds, {"telemetry": 5, STATE_REPORTED: 2})
    assert (tmp_path / "dev-1.twin.json").exists()
    assert (tmp_path / "dev-1.seq.json").exists()
    assert load_twin(creds) == LocalTwin({"led": "on"}, 4)
    (tmp_path / "dev-1.twin.json").write_text("{broken")
    assert load_twin(creds) is None


# --------------------------------------------------------------------------- the device


def _device(
    tmp_path: Path, last_seq: dict[str, int] | None = None, twin: LocalTwin | None = None
) -> tuple[SimulatedDevice, FleetStats]:
    stats = FleetStats(devices=1)
    device = SimulatedDevice(
        _creds(tmp_path),
        Settings(),
        stats,
        random.Random(1),
        last_seq,
        twin=twin,
        report_interval_s=0.5,
    )
    return device, stats


def _queued(device: SimulatedDevice) -> list[tuple[str, dict[str, Any]]]:
    return [(topic, json.loads(payload)) for topic, payload in device.outbox]


def _publish_packet(topic: str, payload: bytes) -> tuple[int, bytes]:
    """A QoS 0 MQTT 5 PUBLISH as gmqtt's handler receives it: (fixed header, rest)."""
    name = topic.encode()
    return 0x30, struct.pack("!H", len(name)) + name + b"\x00" + payload


def test_gmqtt_delivers_desired_messages_to_the_device(tmp_path: Path) -> None:
    """The handler is installed with gmqtt 0.8's signature: a PUBLISH fed to gmqtt's own
    packet handler ends up applied and reported."""

    async def scenario() -> SimulatedDevice:
        device, stats = _device(tmp_path)
        cmd, packet = _publish_packet(
            "devices/dev-1/state/desired", desired_payload(1, {"led": "on"})
        )
        device.client._package_handler._handle_publish_packet(cmd, packet)
        assert stats.desired_received == 1
        return device

    device = asyncio.run(scenario())
    assert device.twin == LocalTwin({**initial_reported(0.5), "led": "on"}, 1)
    assert _queued(device)[-1][1]["reported"] == {"led": "on"}


def test_on_message_returns_success_and_ignores_other_topics(tmp_path: Path) -> None:
    async def scenario() -> None:
        device, stats = _device(tmp_path)
        client = device.client
        assert device._on_message(client, "devices/dev-2/state/desired", b"{}", 1, {}) == 0
        assert device._on_message(client, "devices/dev-1/other", b"{}", 1, {}) == 0
        assert stats.desired_received == 0
        payload = desired_payload(1, {"led": "on"})
        assert device._on_message(client, "devices/dev-1/state/desired", payload, 1, {}) == 0
        assert stats.desired_received == 1

    asyncio.run(scenario())


def test_desired_updates_are_applied_reported_and_persisted(tmp_path: Path) -> None:
    async def scenario() -> tuple[SimulatedDevice, FleetStats]:
        device, stats = _device(tmp_path, last_seq={"telemetry": 40, STATE_REPORTED: 7})
        device.queue_telemetry()
        device.on_desired(desired_payload(3, {"led": "on", "firmware": None}))
        device.on_desired(desired_payload(3, {"led": "blink"}))  # a repeat
        device.on_desired(desired_payload(2, {"led": "off"}))  # older
        device.on_desired(b"garbage")
        device.on_desired(desired_payload(4, {"mode": {"eco": True}}))
        device.on_desired(desired_payload(5, {}))  # nothing to apply: no report
        return device, stats

    device, stats = asyncio.run(scenario())
    assert device.twin == LocalTwin(
        {"report_interval_s": 0.5, "led": "on", "mode": {"eco": True}}, 5
    )
    queued = _queued(device)
    # FIFO behind the telemetry already queued; the reported seq continues from disk.
    assert [topic for topic, _ in queued][:1] == ["devices/dev-1/telemetry"]
    reports = [body for topic, body in queued if topic == "devices/dev-1/state/reported"]
    assert [r["seq"] for r in reports] == [8, 9]
    assert [r["reported"] for r in reports] == [
        {"led": "on", "firmware": None},
        {"mode": {"eco": True}},
    ]
    assert all(isinstance(r["ts"], int) for r in reports)
    assert (STATE_REPORTED, 9) in device.sent
    assert stats.reported == 2
    assert stats.summary()["reported"] == 2
    # Persisted at once: a restarted simulator keeps the document, the version and the seq.
    creds = _creds(tmp_path)
    assert load_twin(creds) == device.twin
    assert load_seq(creds)[STATE_REPORTED] == 9


def test_every_connect_subscribes_then_reports_the_whole_document(tmp_path: Path) -> None:
    async def scenario() -> tuple[SimulatedDevice, FakeSubscriber, FleetStats]:
        device, stats = _device(tmp_path, twin=LocalTwin({"led": "on"}, 6))
        client = FakeSubscriber()
        device._on_connect(client, 0, 0, {})
        device._on_connect(client, 1, 0, {})  # a reconnect
        await asyncio.sleep(0)  # the deferred flush runs (offline: the outbox keeps it)
        return device, client, stats

    device, client, stats = asyncio.run(scenario())
    (first, subs), (second, again), (third, again_ota) = client.calls
    assert (first, second, third) == ("subscribe", "resubscribe", "resubscribe")
    sub, ota_sub = subs
    assert isinstance(sub, gmqtt.Subscription)
    assert (sub, ota_sub) == (again, again_ota)
    assert (sub.topic, sub.qos) == ("devices/dev-1/state/desired", 1)
    assert (ota_sub.topic, ota_sub.qos) == ("devices/dev-1/ota/command", 1)
    queued = _queued(device)
    assert [topic for topic, _ in queued] == ["devices/dev-1/state/reported"] * 2
    assert [body["reported"] for _, body in queued] == [{"led": "on"}] * 2
    assert [body["seq"] for _, body in queued] == [1, 2]
    assert stats.reported == 2


def test_a_new_device_reports_its_initial_document(tmp_path: Path) -> None:
    async def scenario() -> SimulatedDevice:
        device, _ = _device(tmp_path)
        device._on_connect(FakeSubscriber(), 0, 0, {})
        return device

    device = asyncio.run(scenario())
    assert _queued(device)[0][1]["reported"] == {"firmware": "1.0.0", "report_interval_s": 0.5}
    assert device.twin.version == NO_VERSION


def test_fleet_stats_summary_has_the_twin_counters() -> None:
    stats = FleetStats(desired_received=3, reported=4)
    summary = stats.summary()
    assert (summary["desired_received"], summary["reported"]) == (3, 4)
