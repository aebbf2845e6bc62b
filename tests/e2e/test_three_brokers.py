"""A three-broker stack (RF 3, min ISR 2) of its own (issue 12, finding 3): SIGKILL of one
broker (the cold path's group coordinator) while devices publish, with nothing restarting
it: the cold worker lives on and the pipeline stores everything once. Then `fleet up`,
`fleet status` and `fleet down` without FLEET_BROKERS act on all three brokers.

Its ports sit FLEET_TEST_3B_PORT_OFFSET (default: the session stack's offset + 500) above the
defaults, so it runs beside the session's stack."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from infra.keys import key_passphrase
from infra.pki import CertificateAuthority
from infra.provision import load_or_provision
from infra.services.base import wait_until
from infra.settings import PROJECT_ROOT, Settings
from infra.settings import settings_env as fleet_env
from infra.stack import Stack
from queries.runner import warehouse_counts
from streams.cold.loader import COLD_GROUP
from tests.conftest import PORT_OFFSET
from tests.support.fleet import start_fleet

FLEET = str(PROJECT_ROOT / ".venv" / "bin" / "fleet")
OFFSET = int(os.environ.get("FLEET_TEST_3B_PORT_OFFSET", str(PORT_OFFSET + 500)))


@pytest.fixture(scope="module")
def settings3() -> Settings:
    return Settings(
        state_dir=PROJECT_ROOT / ".state" / f"test-stack-{OFFSET}-3b",
        brokers=3,
        kafka_port=9092 + OFFSET,
        registry_port=8081 + OFFSET,
        registry_management_port=9001 + OFFSET,
        mqtt_port=8883 + OFFSET,
        query_port=8124 + OFFSET,
        api_port=8090 + OFFSET,
        default_partitions=3,
        kafka_heap="384m",
    )


@pytest.fixture(scope="module")
def stack3(settings3: Settings) -> Iterator[Stack]:
    stack = Stack(settings3)
    try:
        stack.up()
        yield stack
    finally:
        stack.down()


def without_broker_count(settings: Settings) -> dict[str, str]:
    """The environment of an operator who does not say how many brokers there are."""
    env = {**os.environ, **fleet_env(settings)}
    env.pop("FLEET_BROKERS", None)
    return env


def fleet(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FLEET, *args],
        env=without_broker_count(settings),
        capture_output=True,
        text=True,
        timeout=600,
    )


def cold_coordinator(settings: Settings) -> int:
    """The node id of the broker coordinating the cold path's consumer group."""
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    future = admin.describe_consumer_groups([COLD_GROUP], request_timeout=30)[COLD_GROUP]
    return int(future.result(timeout=30).coordinator.id)


def test_one_broker_of_three_killed_the_pipeline_goes_on_without_a_restart(
    stack3: Stack, settings3: Settings, tmp_path: Path
) -> None:
    # Nothing restarts the broker here: the cluster must carry on with two of three.
    stack3.supervisor.stop()
    ca = CertificateAuthority.load_or_create(
        settings3.pki_dir, passphrase=key_passphrase(settings3)
    )
    prefix = f"tb{uuid.uuid4().hex[:4]}-"
    creds = load_or_provision(ca, [f"{prefix}{i:03d}" for i in range(20)], tmp_path, "ec")
    cold = stack3.cold_worker.process()
    assert cold is not None
    victim = stack3.brokers[cold_coordinator(settings3) - 1]
    stored_before = int(stack3.cold_worker.counters().get("stored_rows", 0))

    # About 30 s of publishing; the broker dies early in it, most goes through two brokers.
    fleet_run = start_fleet(settings3, creds, rate=5, duration=90, max_messages=150)
    assert wait_until(
        lambda: int(stack3.cold_worker.counters().get("stored_rows", 0)) > stored_before + 20,
        timeout=120,
        interval=0.1,
    )
    victim.kill()
    killed_at = time.monotonic()
    stored_at_kill = warehouse_counts(settings3, device_prefix=prefix).stored
    stats, _devices = fleet_run.wait(300)
    published = stats.published
    assert published == 20 * 150
    assert stored_at_kill < published // 2  # the kill came early in the stream

    def drained() -> bool:
        return warehouse_counts(settings3, device_prefix=prefix).stored >= published

    assert wait_until(drained, timeout=180, interval=1.0)
    print(f"three brokers, one SIGKILLed: all stored {time.monotonic() - killed_at:.1f}s later")
    counts = warehouse_counts(settings3, device_prefix=prefix)
    assert (counts.stored, counts.duplicates) == (published, 0)
    survivor = stack3.cold_worker.process()
    assert survivor is not None
    assert survivor.pid == cold.pid  # the cold worker did not die
    assert victim.process() is None  # and all of it went through two brokers of three


def test_up_status_and_down_honour_the_state_folders_broker_count(
    stack3: Stack, settings3: Settings
) -> None:
    up = fleet(settings3, "up")  # also brings back a broker killed by the test before
    assert up.returncode == 0, up.stderr[-2000:] + up.stdout[-2000:]
    status = fleet(settings3, "status", "--json")
    assert status.returncode == 0, status.stdout[-2000:]
    services = {
        s["name"]: s for s in json.loads(status.stdout.strip().splitlines()[-1])["services"]
    }
    brokers = sorted(n for n in services if n.startswith("kafka"))
    assert brokers == ["kafka-0", "kafka-1", "kafka-2"]
    assert {services[b]["state"] for b in brokers} == {"up"}
    processes = [b.process() for b in stack3.brokers]
    assert all(p is not None for p in processes)

    down = fleet(settings3, "down")
    assert down.returncode == 0, down.stderr
    for broker, proc in zip(stack3.brokers, processes, strict=True):
        assert proc is not None
        assert not proc.is_running() or proc.status() == "zombie", broker.name
        assert broker.process() is None, broker.name
