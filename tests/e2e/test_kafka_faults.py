"""Kafka faults and crashed processes on the session's stack (issue 12, finding 3): stream
jobs ride out a broker restart (abort, rewind to the last commit, back off), and the
supervisor starts again whatever dies, counted in `fleet status`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import pytest

from infra.services.base import Service, wait_until
from infra.settings import Settings
from infra.stack import Stack
from infra.topics import consumer_lag
from tests.support.cli import fleet_cli
from tests.support.fleet import start_fleet
from tests.support.warehouse import assert_stored_exactly_once, provision_fleet, stored_rows


def fleet_status(settings: Settings) -> tuple[int, dict[str, dict[str, object]]]:
    result = fleet_cli(settings, "status", "--json")
    status = json.loads(result.stdout.strip().splitlines()[-1])
    return result.returncode, {s["name"]: s for s in status["services"]}


def restarts(stack: Stack, name: str) -> int:
    return int(stack.supervisor.restarts().get(name, {}).get("restarts", 0))


def pid_of(service: Service) -> int:
    proc = service.process()
    assert proc is not None, f"{service.name} is not running"
    return proc.pid


def test_sigkill_of_the_broker_mid_stream_keeps_the_workers_and_the_warehouse_exact(
    stack: Stack, settings: Settings, tmp_path: Path
) -> None:
    """Before: the cold worker died on NOT_COORDINATOR, the hot worker on TIMED_OUT."""
    prefix, creds = provision_fleet(settings, "kbk", 30, tmp_path)
    workers = (stack.cold_worker, stack.hot_worker, stack.ota)
    pids = {w.name: pid_of(w) for w in workers}
    worker_restarts = {w.name: restarts(stack, w.name) for w in workers}
    broker = stack.brokers[0]
    broker_restarts = restarts(stack, broker.name)
    stored_before = stored_rows(stack)

    fleet = start_fleet(settings, creds, rate=10, duration=60, max_messages=120)
    assert wait_until(lambda: stored_rows(stack) > stored_before + 300, timeout=90)
    broker.kill()  # SIGKILL: no clean shutdown, transactions and commits in flight
    # No human: the supervisor starts the broker again.
    assert wait_until(broker.ready, timeout=settings.startup_timeout_s, interval=1.0)
    stats, devices = fleet.wait(300)
    assert stats.published == 30 * 120
    assert_stored_exactly_once(settings, prefix, devices, stats.published, timeout=180)
    # The hot path read it all: its group's committed offsets on telemetry.raw reach the end
    # (they advance only in its transactions). A worker may be restarted meanwhile: after a
    # broker restart librdkafka can wait forever in send_offsets_to_transaction, and the job's
    # deadline ends the process (streams/runtime/watchdog.py).
    assert wait_until(
        lambda: consumer_lag(settings, "fleetstream-hot", ["telemetry.raw"]) == 0, timeout=120
    )
    # The stream jobs rode it out: the same processes, or started again by the supervisor.
    for w in workers:
        assert wait_until(lambda w=w: w.status().state == "up", timeout=120), w.name
        same = pid_of(w) == pids[w.name]
        print(f"{w.name}: {'same process' if same else 'restarted by the supervisor'}")
        assert same or restarts(stack, w.name) > worker_restarts[w.name], w.name
    assert pid_of(stack.cold_worker) == pids["cold-worker"]  # it died on NOT_COORDINATOR
    assert restarts(stack, broker.name) == broker_restarts + 1
    _code, services = fleet_status(settings)
    assert services[broker.name]["restarts"] == broker_restarts + 1
    assert wait_until(lambda: stack.status().all_up, timeout=60, interval=1.0)


def _evidence(service: Service, settings: Settings) -> str:
    """The supervisor's lines about ``service`` and its log's error lines, the last few."""
    said = (settings.run_dir / "supervisor.log").read_text(errors="replace").splitlines()
    own = service.log_path.read_text(errors="replace").splitlines()
    words = ("Error", "ERROR", "Traceback", "Exception", "FATAL", "Assertion")
    return "\n".join(
        [line for line in said if f" {service.name} " in line][-8:]
        + [line for line in own if any(w in line for w in words)][-8:]
    )


@pytest.mark.parametrize("name", ["cold-worker", "api"])
def test_a_killed_platform_process_is_restarted_within_seconds(
    stack: Stack, settings: Settings, name: str
) -> None:
    service = next(s for s in stack.services if s.name == name)
    assert wait_until(lambda: service.status().state == "up", timeout=60)
    before = restarts(stack, name)
    old_pid = pid_of(service)
    killed_at = time.monotonic()
    psutil.Process(old_pid).kill()  # as a crash would: nobody calls start()

    def back() -> bool:
        proc = service.process()
        return proc is not None and proc.pid != old_pid and service.ready()

    assert wait_until(back, timeout=60, interval=0.5)
    print(f"{name}: answering again {time.monotonic() - killed_at:.1f}s after SIGKILL")
    _code, services = fleet_status(settings)
    # At least this one restart. On a loaded machine a fresh process has been seen to end
    # during its start (a check run counted four restarts in 34 s): then say what its log and
    # the supervisor's said, so the next run shows why.
    counted = services[name]["restarts"]
    assert isinstance(counted, int)
    assert counted >= before + 1
    if counted > before + 1:
        print(_evidence(service, settings))
    assert services[name]["pid"] != old_pid
    assert services["supervisor"]["state"] == "up"
    assert wait_until(lambda: fleet_status(settings)[0] == 0, timeout=60, interval=1.0)
