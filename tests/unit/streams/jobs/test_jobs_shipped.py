"""The shipped Faust jobs' logic (fleet health, alert webhooks) and the registry table, without
Kafka: pure functions, and the job files imported on an offline-configured app."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import faust
import pytest
from faust.exceptions import NotReady

from infra.jobs import jobs_config
from infra.settings import Settings
from infra.stack import Stack
from streams.hot.health import FUTURE_SKEW_MS, WINDOW_MS, Digest, is_future, window_start_ms
from streams.job_registry import JOBS, SHIPPED_DIR, JobKind
from streams.jobs import JobsApp
from streams.jobs.batches import by_partition, writing_as
from streams.jobs.health import (
    RETAIN_MS,
    device_key,
    fold_digest,
    health_key,
    health_record,
    is_late,
    merge_windows,
    parse_health_key,
    window_of,
)
from streams.jobs.registry import UNREGISTERED, ReadOnlyError, group_path
from streams.jobs.webhooks import (
    IDEMPOTENCY_HEADER,
    ConfigError,
    ConfigFile,
    Endpoint,
    backoff_s,
    idempotency_key,
    outcome,
    parse_config,
    request_body,
)

T0 = 1_764_672_000_000  # 2025-12-02T10:40:00Z, a minute boundary


# --- fleet health ---------------------------------------------------------------------------


def test_a_reading_falls_in_the_minute_of_its_device_time() -> None:
    assert window_start_ms(T0) == T0
    assert window_start_ms(T0 + WINDOW_MS - 1) == T0
    assert window_start_ms(T0 + WINDOW_MS) == T0 + WINDOW_MS


def digest(group: str, *readings: tuple[str, dict[str, float]]) -> dict[str, Any]:
    """The hot path's digest of ``(device, metrics)`` readings of minute T0, as JSON read."""
    made = Digest(group, T0)
    for device_id, metrics in readings:
        made.add(device_id, metrics)
    return dict(json.loads(made.to_json()))


def test_a_window_counts_messages_devices_and_min_mean_max() -> None:
    first = digest("g", ("a", {"temperature": 20.0}), ("b", {"temperature": 30.0, "battery": 0.9}))
    second = digest("g", ("a", {"temperature": 25.0}), ("a", {"extra": 1.0}))
    window = fold_digest(None, first, new_devices=2)
    before = window
    window = fold_digest(window, second, new_devices=0)  # "a" was counted already
    assert before["messages"] == 2  # not mutated
    record = health_record("acme/plant/g1", T0, window)
    assert (record["devices"], record["messages"]) == (2, 4)
    assert record["metrics"]["temperature"] == {"count": 3, "min": 20.0, "mean": 25.0, "max": 30.0}
    assert record["metrics"]["battery"] == {"count": 1, "min": 0.9, "mean": 0.9, "max": 0.9}
    assert (record["window_start"], record["window_end_ms"]) == (
        "2025-12-02T10:40:00Z",
        T0 + 60_000,
    )
    json.dumps(record)  # published as JSON


def test_digests_folded_one_by_one_give_the_window_of_all_their_readings() -> None:
    readings = [
        ("a", {"temperature": 20.0}),
        ("b", {"temperature": 30.0, "battery": 0.9}),
        ("a", {"temperature": 22.0}),
        ("c", {}),
        ("d", {"temperature": 18.0}),
    ]
    whole = fold_digest(None, digest("g", *readings), new_devices=4)
    window, seen = None, set()
    for device_id, metrics in readings:
        window = fold_digest(window, digest("g", (device_id, metrics)), int(device_id not in seen))
        seen.add(device_id)
    assert window == whole
    assert merge_windows([]) == {"devices": 0, "messages": 0, "metrics": {}}


def test_a_batch_splits_by_source_partition_in_offset_order() -> None:
    events = [_event(partition, offset) for partition, offset in [(1, 5), (0, 9), (1, 6), (2, 1)]]
    grouped = by_partition(events)
    assert {p: [e.message.offset for e in es] for p, es in grouped.items()} == {
        1: [5, 6],
        0: [9],
        2: [1],
    }


def test_table_writes_in_a_batch_go_to_the_partition_of_the_event_named() -> None:
    event = _event(3, 40)
    assert faust.current_event() is None
    with writing_as(event):
        assert faust.current_event() is event
    assert faust.current_event() is None


@dataclass
class _Event:  # what the kit reads of a Faust event (and, as Faust does, weakly referenced)
    message: SimpleNamespace


def _event(partition: int, offset: int) -> Any:
    return _Event(SimpleNamespace(topic="telemetry.raw", partition=partition, offset=offset))


def test_the_key_names_group_and_window_so_a_replay_overwrites() -> None:
    key = health_key("acme/plant/g1", T0)
    assert key == "acme/plant/g1@2025-12-02T10:40:00Z"
    assert parse_health_key(key) == ("acme/plant/g1", T0)
    assert window_of(device_key(key, "dev-1")) == key


def test_windows_older_than_retention_are_late() -> None:
    assert not is_late(T0, T0 + RETAIN_MS)
    assert is_late(T0, T0 + RETAIN_MS + WINDOW_MS)


# --- the device registry ----------------------------------------------------------------------


def test_a_device_s_group_path() -> None:
    assert group_path({"org": "acme", "project": "plant", "group": "g1"}) == "acme/plant/g1"
    assert group_path(None) == UNREGISTERED


def test_the_registry_is_a_read_only_global_table_of_registry_devices(tmp_path: Path) -> None:
    app = JobsApp()
    app.configure(jobs_config(Settings(state_dir=tmp_path), "reader"))  # type: ignore[call-arg]
    table = app.devices
    assert app.devices is table  # one per app
    assert table.is_global
    assert table.synchronize_all_active_partitions
    assert table.changelog_topic.get_topic_name() == "registry.devices"
    assert table.group_of("nobody") == UNREGISTERED
    with pytest.raises(ReadOnlyError):
        table["d"] = {"org": "o"}
    with pytest.raises(ReadOnlyError):
        table.update({"d": {}})


def _starting_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> JobsApp:
    """A configured app with one topic of its own, whose declare finds the producer closed."""
    app = JobsApp()
    app.configure(jobs_config(Settings(state_dir=tmp_path), "starter"))  # type: ignore[call-arg]
    topic = app.topic("starter.out")

    async def producer_closed() -> None:
        raise NotReady("Producer service not yet started")

    async def nothing(_app: faust.App) -> None:
        return None

    monkeypatch.setattr(topic, "maybe_declare", producer_closed)
    monkeypatch.setattr(faust.App, "on_start", nothing)
    return app


def test_a_stop_during_start_ends_the_start_quietly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SIGTERM while the job declares its topics: Faust closes the producer under the declare.
    app = _starting_app(tmp_path, monkeypatch)
    app._stopped.set()
    asyncio.run(app.on_start())


def test_a_closed_producer_while_not_stopping_fails_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = _starting_app(tmp_path, monkeypatch)
    with pytest.raises(NotReady):
        asyncio.run(app.on_start())


def test_the_registry_needs_a_configured_app() -> None:
    with pytest.raises(RuntimeError, match="not configured"):
        _ = JobsApp().devices


# --- alert webhooks ---------------------------------------------------------------------------

ALERT = {
    "alert_id": "a1",
    "device_id": "d",
    "rule_id": "r",
    "status": "raised",
    "metric": "temperature",
    "value": 41.0,
    "threshold": 40.0,
    "severity": "critical",
    "seq": 3,
    "ts": T0,
}


def test_the_config_names_an_endpoint_per_group() -> None:
    config = parse_config(
        {
            "endpoints": {
                "acme/plant/g1": {"url": "http://127.0.0.1:9/hook", "headers": {"X-T": "s"}},
                "acme/plant/g2": "https://hooks.example/x",
            }
        }
    )
    one = config.endpoints["acme/plant/g1"]
    assert (one.url, dict(one.headers), one.max_attempts) == (
        "http://127.0.0.1:9/hook",
        {"X-T": "s"},
        8,
    )
    assert config.endpoints["acme/plant/g2"] == Endpoint("https://hooks.example/x")


@pytest.mark.parametrize(
    "bad",
    [
        [],
        {"endpoints": []},
        {"endpoints": {"g": {}}},
        {"endpoints": {"g": {"url": "ftp://x"}}},
        {"endpoints": {"g": {"url": "http://x", "retries": 3}}},
        {"endpoints": {"g": {"url": "http://x", "max_attempts": 0}}},
        {"endpoints": {"g": {"url": "http://x", "timeout_s": "soon"}}},
    ],
)
def test_a_wrong_config_says_what_is_wrong(bad: object) -> None:
    with pytest.raises(ConfigError):
        parse_config(bad)


def test_the_config_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "webhooks.json"
    file = ConfigFile(path)
    assert file.current().endpoints == {}  # no file: no endpoints
    path.write_text(json.dumps({"endpoints": {"g": "http://a"}}))
    assert file.current().endpoints["g"].url == "http://a"
    path.write_text("{broken")
    assert file.current().endpoints["g"].url == "http://a"  # the last good one
    assert file.error is not None
    path.write_text(json.dumps({"endpoints": {"g": "http://bb"}}))
    assert file.current().endpoints["g"].url == "http://bb"
    assert file.error is None


def test_the_idempotency_key_is_the_alert_id_and_status() -> None:
    assert IDEMPOTENCY_HEADER == "Idempotency-Key"
    assert idempotency_key(ALERT) == "a1:raised"
    assert idempotency_key({**ALERT, "status": "resolved"}) == "a1:resolved"
    assert request_body(ALERT, "acme/plant/g1") == {**ALERT, "group": "acme/plant/g1"}


def test_back_off_doubles_up_to_its_cap() -> None:
    endpoint = Endpoint("http://x", backoff_s=0.5, max_backoff_s=3.0)
    assert [backoff_s(n, endpoint) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


@pytest.mark.parametrize(
    ("status", "expected"),
    [(200, "delivered"), (204, "delivered"), (500, "retry"), (503, "retry"), (429, "retry"),
     (408, "retry"), (400, "refused"), (404, "refused"), (301, "refused")],
)  # fmt: skip
def test_what_an_answer_means(status: int, expected: str) -> None:
    assert outcome(status) == expected


# --- the shipped jobs as services -------------------------------------------------------------


SHIPPED = [job.group for job in JOBS if job.kind is JobKind.FAUST]  # group = file stem


def test_fleet_up_runs_each_shipped_job_file_on_its_web_port(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path, jobs_web_port=7100)  # type: ignore[call-arg]
    services = Stack(settings).jobs
    assert [s.name for s in services] == ["job-fleet-health", "job-alert-webhooks"]
    assert [s.port for s in services] == [7100, 7101]
    for service, job in zip(services, SHIPPED, strict=True):
        command = list(service.command())
        assert command[1:4] == ["-m", "infra.jobs", str(SHIPPED_DIR / f"{job}.py")]
        assert command[-2:] == ["--web-port", str(service.port)]


@pytest.mark.parametrize("job", SHIPPED)
def test_a_shipped_job_file_imports_on_a_configured_app(job: str, tmp_path: Path) -> None:
    # In a process of its own: a job file declares its agents on the one app at import.
    path = SHIPPED_DIR / f"{job}.py"
    code = (
        f"from infra.jobs import configure_offline; configure_offline({job!r})\n"
        f"import runpy; runpy.run_path({str(path)!r})\n"
        "from streams.jobs import app; print(sorted(app.agents))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        timeout=120,
        env={"FLEET_STATE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr.decode()
    assert job in run.stdout.decode()


# --- recovery of a table whose changelog is written in transactions ----------------------------


class _Probe:
    """A partition's committed records at ``offsets`` (the rest: commit markers)."""

    def __init__(self, offsets: set[int]) -> None:
        self.offsets, self.at = offsets, 0

    def assign(self, _tps: object) -> None:
        pass

    def seek(self, _tp: object, offset: int) -> None:
        self.at = offset

    async def position(self, _tp: object) -> int:
        return self.at

    async def getmany(self, tp: object, timeout_ms: int) -> dict[object, list[object]]:
        from types import SimpleNamespace

        batch = [
            SimpleNamespace(offset=o) for o in range(self.at, self.at + 4) if o in self.offsets
        ]
        self.at += 4
        return {tp: batch}


@pytest.mark.parametrize(
    ("records", "start", "end", "expected"),
    [
        ({0, 2, 4}, 0, 6, 5),  # each record then its commit marker: the end is after 4
        (set(range(0, 100)), 0, 101, 100),
        ({3}, 0, 200, 4),  # far back: the look-back doubles until it finds it
        (set(), 0, 10, 0),  # only markers (aborted or compacted away): nothing to wait for
        (set(), 5, 5, 5),  # empty
    ],
)
def test_a_recovery_waits_for_the_last_record_not_the_end_offset(
    records: set[int], start: int, end: int, expected: int
) -> None:
    import asyncio

    from streams.jobs.transport import _record_end

    assert asyncio.run(_record_end(_Probe(records), "tp", start, end)) == expected  # type: ignore[arg-type]


def test_a_reading_far_ahead_of_the_clock_is_future_and_a_skewed_one_is_not() -> None:
    # fleet_health skips the first: one bad device clock must not retire every window.
    assert not is_future(T0 + FUTURE_SKEW_MS, T0)
    assert is_future(T0 + FUTURE_SKEW_MS + 1, T0)
    assert not is_future(T0 - 3_600_000, T0)
