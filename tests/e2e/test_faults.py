"""Fault injection: a bounded simulated stream while SIGTERM or SIGKILL hits one part of the
stack, then exactly the published set in the warehouse and a stack that came back by itself.

One case per (service, signal), one at a time, each with devices of its own (their ids share a
prefix, so the warehouse is counted per run). A case

1. starts 30 devices publishing 80 telemetry messages each (10 msgs/s per device, about 2% of
   them followed by an event) and waits until the run's first rows are in the warehouse;
2. signals the service, then polls, without touching anything, until `fleet status` says every
   service is up and a message published after the fault is stored (its recovery time);
3. if nothing came back within RECOVERY_S (JVM_RECOVERY_S for Kafka and Apicurio), records
   that as a failure and runs `fleet up`
   itself (a human), so the data check still says what was lost;
4. once the fleet drained (every message PUBACKed), compares the warehouse with the published
   set: `uniqExact(device_id, seq)` (the same with or without FINAL) and the set of keys must
   equal what the devices published, and `count()` (read with FINAL: a message the bridge
   re-sent after a crash lands in another batch, and ReplacingMergeTree folds it only on merge
   or FINAL) must equal it too.

Mosquitto SIGKILL is the one fault the platform cannot survive whole: the broker keeps its
state in memory and writes it every `autosave_interval` (5 s). The case asserts the exact
bound the README states: every lost message was PUBACKed by the broker after its last save
(the mtime of `mosquitto.db`) and before the kill, or was in flight on a device whose session
the broker had not saved yet (Session Present 0 makes an MQTT 5 client discard it).

The three-broker cases run on a stack of their own (`--brokers 3`, its own state and ports):
one broker of three dies and stays down, and the pipeline must go on without it (the cold
worker lives on: nothing restarts it). Then `fleet up`, `fleet status` and `fleet down` without
FLEET_BROKERS act on all three brokers.

Each case's figures are appended to `.state/faults-<offset>.jsonl` (README "Reliability").
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from infra.keys import key_passphrase
from infra.pki import CertificateAuthority
from infra.provision import load_or_provision
from infra.services.base import Service, ServiceError, wait_until
from infra.settings import PROJECT_ROOT, Settings
from infra.settings import settings_env as fleet_env
from infra.simulator.protocol import EVENTS, TELEMETRY
from infra.stack import Stack
from tests.conftest import PORT_OFFSET
from tests.support.faults import (
    KINDS,
    CaseResult,
    FleetRun,
    Injected,
    LossBound,
    Probe,
    gone,
    inject,
    log_lines,
    missing,
    mosquitto_loss_bound,
    settled_counts,
    snapshot_time,
    start_recorded_fleet,
    stored_since,
    watch_recovery,
    write_result,
)

DEVICES = 30
MESSAGES = 80  # telemetry per device: 2,400 per case, plus about 50 events
RATE = 20.0  # per device and second: the stream lasts about 4 s
# A supervisor restarts a dead process within seconds; a JVM (Kafka replaying its logs after a
# SIGKILL, Apicurio its journal) takes longest: 58 s seen for Kafka on a loaded 2-core box.
RECOVERY_S = float(os.environ.get("FLEET_FAULTS_RECOVERY_S", "45"))
JVM_RECOVERY_S = float(os.environ.get("FLEET_FAULTS_JVM_RECOVERY_S", "150"))
SETTLE_S = 120.0
RESULTS = PROJECT_ROOT / ".state" / f"faults-{PORT_OFFSET}.jsonl"
# The three-broker stack sits 1000 ports above the test stack's (18000 beside 17000).
THREE_OFFSET = int(os.environ.get("FLEET_TEST_FAULTS3_PORT_OFFSET", str(PORT_OFFSET + 1000)))

TERM, KILL = signal.SIGTERM, signal.SIGKILL
NO_MATCHING_SUBSCRIBERS = 0x10  # MQTT 5 PUBACK reason code
# Platform processes first (cheap to restart), then the services they depend on.
TARGETS = (
    "cold-worker",
    "hot-worker",
    "ota-controller",
    "api",
    "enforcer",
    "bridge-0",
    "bridge-1",
    "registry",
    "mosquitto",
    "kafka-0",
)
CASES = [(target, sig) for target in TARGETS for sig in (TERM, KILL)]


def _offset_settings(offset: int, brokers: int) -> Settings:
    return Settings(
        state_dir=PROJECT_ROOT / ".state" / f"test-faults3-{offset}",
        kafka_port=9092 + offset,
        registry_port=8081 + offset,
        registry_management_port=9001 + offset,
        mqtt_port=8883 + offset,
        query_port=8124 + offset,
        api_port=8090 + offset,
        jobs_web_port=6066 + offset,
        metrics_port=9400 + offset,
        prometheus_port=9390 + offset,
        default_partitions=3,
        brokers=brokers,
    )


@pytest.fixture(scope="module")
def faults_stack(stack: Stack, settings: Settings) -> Iterator[Stack]:
    """The test stack with two bridge replicas (each is a fault of its own); afterwards back
    to one (`up` retires the second, handing what its session held to Kafka) and all up."""
    two = Stack(settings.model_copy(update={"bridge_replicas": 2}))
    two.up()
    # `up` at another scale starts the supervisor anew, watching this scale's services.
    assert {"bridge-0", "bridge-1"} <= set(two.supervisor.restarts())
    yield two
    one = Stack(settings)
    one.up()
    assert "bridge-1" not in one.supervisor.restarts()


@pytest.fixture(scope="module")
def three_brokers() -> Iterator[Stack]:
    """A stack of its own with three Kafka brokers (RF 3, min ISR 2)."""
    platform = Stack(_offset_settings(THREE_OFFSET, brokers=3))
    platform.up()
    yield platform
    if not os.environ.get("FLEET_TEST_KEEP_STACK"):
        platform.down()


def _service(stack: Stack, name: str) -> Service:
    (found,) = [s for s in stack.services if s.name == name]
    return found


def _restarts(stack: Stack, name: str) -> int:
    """How often the supervisor restarted ``name`` (`fleet status --json`'s restarts)."""
    watch = stack.supervisor.restarts().get(name, {})
    return int(watch.get("restarts", 0)) if isinstance(watch, dict) else 0


def _log_sizes(stack: Stack) -> dict[str, int]:
    return {s.name: s.log_path.stat().st_size if s.log_path.exists() else 0 for s in stack.services}


def _crash_evidence(
    stack: Stack, sizes: dict[str, int], pids: dict[str, int | None], target: str
) -> list[str]:
    """For each service that died or was replaced during the case: its last error lines."""

    def erroneous(line: str) -> bool:
        return any(w in line for w in ("Error", "ERROR", "Traceback", "Exception", "FATAL"))

    out = []
    for service in stack.services:
        status = service.status()
        if status.pid == pids.get(service.name) and status.state == "up":
            continue
        lines = log_lines(service.log_path, sizes.get(service.name, 0), erroneous, limit=3)
        if not lines and service.name == target:
            lines = ["(the signalled process)"]
        out.append(
            f"{service.name} ({status.state}, pid {pids.get(service.name)} -> "
            f"{status.pid}): {' | '.join(lines) or 'no error line in its log'}"
        )
    return out


def _first_rows_stored(settings: Settings, prefix: str, timeout: float = 90.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if stored_since(settings, prefix, 0.0) > 0:
                return True
        except OSError:
            pass
        time.sleep(0.25)
    return False


def _human_up(stack: Stack, result: CaseResult, target: str) -> None:
    """What an operator would do: `fleet up` (starts what is not running); after a broker
    restart also restart the bridges, the workaround while they do not resubscribe by
    themselves, so one case's failure does not leave ingest dead for the next."""
    try:
        if target == "mosquitto":
            for bridge in stack.bridges:
                bridge.stop()
        stack.up()
    except (ServiceError, KafkaException) as exc:  # `up` ends with a status (Kafka lag)
        result.problems.append(f"`fleet up` failed after the fault: {exc}")


def run_case(
    stack: Stack,
    target_name: str,
    signum: signal.Signals,
    tmp_path: Path,
    keep_down: bool = False,
) -> tuple[CaseResult, FleetRun, Injected, LossBound | None]:
    """One fault under a stream; returns the figures (problems listed, not yet asserted)."""
    settings = stack.settings
    target = _service(stack, target_name)
    result = CaseResult(fault=f"{signum.name} {target_name}" + (" (1 of 3)" if keep_down else ""))
    ca = CertificateAuthority.load_or_create(settings.pki_dir, passphrase=key_passphrase(settings))
    prefix = f"f{uuid.uuid4().hex[:6]}-"
    creds = load_or_provision(ca, [f"{prefix}{i:02d}" for i in range(DEVICES)], tmp_path, "ec")
    # Its own prefix: the probe's messages are not the run's published set.
    (probe_creds,) = load_or_provision(ca, [f"p{prefix}"], tmp_path, "ec")
    sizes = _log_sizes(stack)
    pids = {s.name: s.status().pid for s in stack.services}

    fleet = start_recorded_fleet(settings, creds, RATE, MESSAGES)
    assert fleet.publishing.wait(120), "the fleet did not start publishing"
    assert _first_rows_stored(settings, prefix), (
        "before the fault, nothing of the run reached the warehouse: the stack was not healthy"
    )
    jvm = target_name.startswith("kafka") or target_name == "registry"
    deadline_s = JVM_RECOVERY_S if jvm else RECOVERY_S
    restarts_before = _restarts(stack, target_name)
    if keep_down:
        # "Without any restart of that broker": the supervisor would start it again within
        # seconds, so it sits this case out (`fleet up` starts it again at the end).
        stack.supervisor.stop()
    injected = inject(target, signum)
    bound: LossBound | None = None
    saved_at: float | None = None
    if target_name == "mosquitto" and signum == KILL:
        gone(target, injected, 30)
        # The dead broker writes nothing more: this is its last save.
        saved_at = snapshot_time(stack.mosquitto.files.persistence)

    result.recovery = watch_recovery(
        stack,
        settings,
        target,
        injected,
        Probe(settings, probe_creds),
        deadline_s,
        need_status_up=not keep_down,
    )
    recovery = result.recovery
    result.restarts = _restarts(stack, target_name) - restarts_before
    if keep_down:
        ok = recovery.stores_again_s is not None
        if recovery.restarted_s is not None and (
            recovery.stores_again_s is None or recovery.stores_again_s > recovery.restarted_s
        ):
            result.problems.append(
                f"{target_name} was restarted ({recovery.restarted_s:.1f}s) before the "
                "pipeline stored again: not shown to go on with one broker of three down"
            )
    else:
        ok = recovery.recovered_s is not None
    if not ok:
        recovery.human = True
        result.problems.append(
            f"no recovery without a human within {deadline_s:.0f}s: status up "
            f"{recovery.status_up_s}, stores again {recovery.stores_again_s}, "
            f"{target_name} restarted {recovery.restarted_s}"
        )
        result.problems += _crash_evidence(stack, sizes, pids, target_name)
        if not keep_down:
            _human_up(stack, result, target_name)

    run = fleet.wait(SETTLE_S + 240)
    published = {kind: run.published(kind) for kind in KINDS}
    result.published = {k: len(v) for k, v in published.items()}
    broker_killed = target_name == "mosquitto" and signum == KILL
    if run.log.discarded and not broker_killed:  # within a broker kill's bound: checked below
        result.problems.append(
            f"devices discarded {len(run.log.discarded)} unacknowledged messages on "
            "Session Present 0 (the broker had lost their sessions)"
        )
    expected = {k: len(v) for k, v in published.items()}
    try:
        counts = settled_counts(settings, prefix, expected, SETTLE_S)
    except OSError as exc:  # the query server is the cold worker's
        result.problems.append(f"the warehouse did not answer after the fault: {exc}")
        result.problems += _crash_evidence(stack, sizes, pids, target_name)
        raise AssertionError("\n".join([result.fault, *result.problems])) from exc
    lost_keys: set[tuple[str, str, int]] = set()
    for kind in KINDS:
        count = counts[kind]
        result.stored_rows[kind] = count.rows
        result.stored_distinct[kind] = count.distinct
        gaps = missing(published[kind], count.keys)
        extra = sorted(count.keys - published[kind])
        result.lost[kind] = len(gaps)
        lost_keys |= {(kind, d, s) for d, s in gaps}
        if extra:
            result.problems.append(f"{kind}: {len(extra)} stored that were never published")
        if count.rows != count.distinct:
            result.problems.append(
                f"{kind}: {count.rows - count.distinct} doubled rows (count() FINAL "
                f"{count.rows} != uniqExact {count.distinct})"
            )
    if broker_killed:
        bound = mosquitto_loss_bound(run.log, saved_at, injected.at)
        result.loss_bound = len(bound.keys)
        beyond = lost_keys - bound.keys
        if beyond:
            late = sorted((k, run.log.acked.get(k), run.log.discarded.get(k)) for k in beyond)[:5]
            result.problems.append(
                f"{len(beyond)} lost beyond the stated bound (last save {saved_at}, kill "
                f"{injected.at}): {late}"
            )
    elif lost_keys:
        acked_after = sum(1 for k in lost_keys if run.log.acked.get(k, 0) > injected.at)
        result.problems.append(
            f"lost {len(lost_keys)} ({result.lost}); {acked_after} of them PUBACKed after "
            f"the fault; e.g. {sorted(lost_keys)[:3]}"
        )
    no_subscribers = sum(1 for k in lost_keys if run.log.reasons.get(k) == NO_MATCHING_SUBSCRIBERS)
    if no_subscribers:
        result.problems.append(
            f"{no_subscribers} lost were PUBACKed 0x10 (no matching subscribers): the broker "
            "had no bridge subscription then, and the device dropped them"
        )
    if keep_down:
        if not ok:
            result.problems += _crash_evidence(stack, sizes, pids, target_name)
        # The end of a 1-of-3 case: the broker back for the next case.
        _human_up(stack, result, target_name)
    write_result(RESULTS, result)
    print(result.to_json())
    return result, run, injected, bound


@pytest.mark.parametrize(("target", "signum"), CASES, ids=[f"{t}-{s.name}" for t, s in CASES])
def test_the_warehouse_holds_exactly_the_published_set_after_a_fault(
    faults_stack: Stack, tmp_path: Path, target: str, signum: signal.Signals
) -> None:
    result, run, _injected, bound = run_case(faults_stack, target, signum, tmp_path)
    assert run.stats.published == DEVICES * MESSAGES
    assert not result.problems, "\n".join([result.fault, *result.problems])
    if bound is not None:  # SIGKILL of Mosquitto: only what the bound allows
        assert result.lost[TELEMETRY] + result.lost[EVENTS] <= len(bound.keys)
    else:
        assert result.lost == {TELEMETRY: 0, EVENTS: 0}
    assert result.recovery.recovered_s is not None


def _cold_coordinator(stack: Stack) -> str:
    """The broker coordinating the cold path's consumer group (the one whose loss hurt)."""
    admin = AdminClient({"bootstrap.servers": stack.settings.bootstrap_servers})
    futures = admin.describe_consumer_groups(["fleetstream-cold"], request_timeout=10)
    description = futures["fleetstream-cold"].result(timeout=15)
    return f"kafka-{description.coordinator.id - 1}"


@pytest.mark.parametrize("signum", [TERM, KILL], ids=["SIGTERM", "SIGKILL"])
def test_one_broker_of_three_down_the_pipeline_goes_on_without_it(
    three_brokers: Stack, tmp_path: Path, signum: signal.Signals
) -> None:
    target = _cold_coordinator(three_brokers)
    cold = three_brokers.cold_worker.process()
    result, run, _injected, _bound = run_case(
        three_brokers, target, signum, tmp_path, keep_down=True
    )
    survivor = three_brokers.cold_worker.process()
    # The cold worker lived through it (a restart would hide a crash on a retriable error).
    assert cold is not None
    assert survivor is not None
    assert survivor.pid == cold.pid
    assert run.stats.published == DEVICES * MESSAGES
    assert not result.problems, "\n".join([result.fault, *result.problems])
    assert result.lost == {TELEMETRY: 0, EVENTS: 0}
    assert result.recovery.stores_again_s is not None


def _fleet_without_broker_count(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """`fleet ARGS` as an operator who does not say how many brokers there are runs it."""
    env = {**os.environ, **fleet_env(settings)}
    env.pop("FLEET_BROKERS", None)
    fleet = str(PROJECT_ROOT / ".venv" / "bin" / "fleet")
    return subprocess.run([fleet, *args], env=env, capture_output=True, text=True, timeout=600)


def _services(status: subprocess.CompletedProcess[str]) -> dict[str, dict[str, object]]:
    """`fleet status --json`'s services by name."""
    return {s["name"]: s for s in json.loads(status.stdout.strip().splitlines()[-1])["services"]}


def test_up_status_and_down_honour_the_state_folders_broker_count(three_brokers: Stack) -> None:
    # Last on this stack: it ends with `fleet down`.
    settings = three_brokers.settings
    up = _fleet_without_broker_count(settings, "up")
    assert up.returncode == 0, up.stderr[-2000:] + up.stdout[-2000:]
    # A job whose watchdog ends a call left stuck by the broker the previous test kept down may
    # end after `up` returned; the supervisor starts it again, so status reads all up soon after.
    statuses: list[subprocess.CompletedProcess[str]] = []

    def reads_all_up() -> bool:
        statuses.append(_fleet_without_broker_count(settings, "status", "--json"))
        return statuses[-1].returncode == 0

    all_up = wait_until(reads_all_up, timeout=120, interval=2)
    status = statuses[-1]
    services = _services(status)
    assert all_up, {name: s["state"] for name, s in services.items() if s["state"] != "up"}
    brokers = sorted(n for n in services if n.startswith("kafka"))
    assert brokers == ["kafka-0", "kafka-1", "kafka-2"]
    assert {services[b]["state"] for b in brokers} == {"up"}
    processes = [b.process() for b in three_brokers.brokers]
    assert all(p is not None for p in processes)

    down = _fleet_without_broker_count(settings, "down")
    assert down.returncode == 0, down.stderr
    for broker, proc in zip(three_brokers.brokers, processes, strict=True):
        assert proc is not None
        assert not proc.is_running() or proc.status() == "zombie", broker.name
        assert broker.process() is None, broker.name
