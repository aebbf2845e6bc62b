"""Faust jobs on the real stack, run as a data engineer runs them: `fleet jobs run FILE.py`."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka import Message

from infra.keys import key_passphrase
from infra.pki import CertificateAuthority
from infra.provision import load_or_provision
from infra.services.base import wait_until
from infra.settings import PROJECT_ROOT, Settings
from infra.simulator.fleet import run_fleet
from infra.stack import Stack
from tests.conftest import settings_env
from tests.support.fleet import start_fleet, telemetry_sent
from tests.support.kafka import collect

pytestmark = pytest.mark.integration

DEVICES, MESSAGES = 8, 15
STOP_TIMEOUT_S = 30.0

# A job that forwards the (device id, seq) of its fleet's telemetry to its own topic, and
# raises on the readings listed in FAIL (device/seq keys; the dead-letter test's job).
JOB = """
from streams.jobs import app, topics

PREFIX = {prefix!r}
FAIL = {fail!r}
seen = app.topic({out!r}, key_type=str, value_type=str, key_serializer="raw",
                 value_serializer="raw", partitions=1)


@app.agent(topics.telemetry)
async def forward(stream):
    async for reading in stream:
        if not reading.device_id.startswith(PREFIX):
            continue
        key = f"{{reading.device_id}}/{{reading.seq}}"
        if key in FAIL:
            raise RuntimeError(f"refusing {{key}}")
        await seen.send(key=key, value=key)
"""


# A job that forwards the values of a topic it is given (the read_committed test's job).
FORWARD = """
from streams.jobs import app

source = app.topic({source!r}, key_type=str, value_type=str, key_serializer="raw",
                   value_serializer="raw")
seen = app.topic({out!r}, key_type=str, value_type=str, key_serializer="raw",
                 value_serializer="raw", partitions=1)


@app.agent(source)
async def forward(stream):
    async for key, value in stream.items():
        await seen.send(key=key, value=value)
"""


# A job on an Avro topic of its own (the undecodable-bytes test's job).
AVRO = """
from streams.jobs import app

source = app.avro_topic({source!r}, "Telemetry")
seen = app.topic({out!r}, key_type=str, value_type=str, key_serializer="raw",
                 value_serializer="raw", partitions=1)


@app.agent(source)
async def forward(stream):
    async for reading in stream:
        key = f"{{reading.device_id}}/{{reading.seq}}"
        await seen.send(key=key, value=key)
"""


@dataclass(frozen=True)
class Fleet:
    prefix: str
    published: set[tuple[str, int]]


@pytest.fixture(scope="module")
def fleet(stack: Stack, settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    """A small simulated fleet's telemetry, published once for the module's jobs to read."""
    ca = CertificateAuthority.load_or_create(settings.pki_dir, passphrase=key_passphrase(settings))
    prefix = f"job{uuid.uuid4().hex[:6]}"
    creds = load_or_provision(
        ca, [f"{prefix}-{i:02d}" for i in range(DEVICES)], tmp_path_factory.mktemp("fleet"), "ec"
    )
    stats, devices = asyncio.run(
        run_fleet(settings, creds, rate=10, duration=30, max_messages=MESSAGES)
    )
    assert stats.connect_failures == 0
    published = telemetry_sent(devices)
    assert len(published) == DEVICES * MESSAGES
    return Fleet(prefix, published)


@dataclass
class RunningJob:
    name: str
    out: str
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        """SIGTERM as a service manager stops it (or SIGINT: Ctrl-C); the exit code."""
        self.process.send_signal(sig)
        try:
            return self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT_S)
            raise AssertionError(f"{self.name} ignored SIGTERM:\n{self.tail()}") from None

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])


@pytest.fixture
def run_job(stack: Stack, settings: Settings, tmp_path: Path) -> Iterator[object]:
    # The stack: a job run alone (no other fixture started it) needs Kafka up too.
    started: list[RunningJob] = []

    def start(
        prefix: str = "",
        fail: frozenset[str] = frozenset(),
        source: str | None = None,
        template: str = FORWARD,
    ) -> RunningJob:
        name = f"it_{uuid.uuid4().hex[:8]}"
        out = f"{name}.seen"
        path = tmp_path / f"{name}.py"
        if source is None:
            code = JOB.format(prefix=prefix, fail=set(fail), out=out)
        else:
            code = template.format(source=source, out=out)
        path.write_text(textwrap.dedent(code))
        return run(path, out)

    def run(path: Path, out: str) -> RunningJob:
        name = path.stem
        log = path.with_suffix(".log")
        with log.open("ab") as sink:
            process = subprocess.Popen(
                [sys.executable, "-m", "infra.cli", "jobs", "run", str(path), "--loglevel", "warn"],
                cwd=PROJECT_ROOT,
                env=settings_env(settings),
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        job = RunningJob(name, out, process, log)
        started.append(job)
        return job

    start.run = run  # type: ignore[attr-defined]  # restart a job's own file
    yield start
    for job in started:
        if job.process.poll() is None:
            job.process.kill()
            job.process.wait(STOP_TIMEOUT_S)


def _record_pid(record: Path) -> int | None:
    """The pid a job's `job.json` names (None until it is written)."""
    try:
        return int(json.loads(record.read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


def _pairs(messages: list[Message]) -> set[tuple[str, int]]:
    pairs = set()
    for m in messages:
        device, seq = m.key().decode().rsplit("/", 1)
        pairs.add((device, int(seq)))
    return pairs


def _forwarded(settings: Settings, topic: str, expected: set[tuple[str, int]]) -> list[Message]:
    """A job's output on ``topic`` (from the start), once it holds every (device, seq) of
    ``expected``, or at the deadline."""
    return collect(
        settings,
        topic,
        keep=lambda _m: True,
        done=lambda got: _pairs(got) >= expected,
        timeout=100,
    )


def test_a_job_run_with_fleet_jobs_run_sees_every_message(
    settings: Settings, fleet: Fleet, run_job: object
) -> None:
    job = run_job(fleet.prefix)  # type: ignore[operator]
    seen = _forwarded(settings, job.out, fleet.published)
    assert job.process.poll() is None, job.tail()
    assert _pairs(seen) == fleet.published, job.tail()
    # `fleet jobs list` shows it running, and its lag falls to 0 as it commits its offsets.
    assert wait_until(
        lambda: _listed(settings, job.name) == ("running", 0), timeout=60, interval=2
    ), _listed(settings, job.name)
    assert job.stop() == 0, job.tail()
    assert _listed(settings, job.name)[0] == "stopped"


def test_kill_9_of_a_job_mid_stream_then_restart_loses_nothing(
    stack: Stack, settings: Settings, run_job: object, tmp_path: Path
) -> None:
    ca = CertificateAuthority.load_or_create(settings.pki_dir, passphrase=key_passphrase(settings))
    prefix = f"k9{uuid.uuid4().hex[:6]}"
    creds = load_or_provision(ca, [f"{prefix}-{i:02d}" for i in range(DEVICES)], tmp_path, "ec")
    job = run_job(prefix)  # type: ignore[operator]
    fleet = start_fleet(settings, creds, rate=10, duration=60, max_messages=80)

    def outputs() -> list[Message]:
        return collect(settings, job.out, keep=lambda _m: True, done=lambda _g: False, timeout=2)

    # Mid-stream: once the job has forwarded some of this fleet's readings.
    assert wait_until(lambda: len(outputs()) >= 100, timeout=90, interval=1), job.tail()
    job.process.kill()
    job.process.wait(STOP_TIMEOUT_S)
    restarted = run_job.run(job.log.with_suffix(".py"), job.out)  # type: ignore[attr-defined]
    published = telemetry_sent(fleet.wait()[1])
    assert len(published) == DEVICES * 80
    seen = _forwarded(settings, job.out, published)
    assert _pairs(seen) == published, restarted.tail()
    # At least once: what was in flight at the kill may come twice, with the same key.
    keys = [m.key() for m in seen]
    assert all(m.key() == m.value() for m in seen)
    print(f"repeated after kill -9: {len(keys) - len(set(keys))} of {len(keys)}")
    # The first job may have forwarded everything before the kill: stop the restarted one only
    # once it is running (it rewrites its record with its own pid), as a service manager would.
    record = settings.state_dir / "jobs" / restarted.name / "job.json"
    assert wait_until(
        lambda: _record_pid(record) == restarted.process.pid, timeout=60, interval=0.05
    ), restarted.tail()
    assert restarted.stop() == 0, restarted.tail()


def test_sigterm_while_a_job_is_still_starting_exits_cleanly(
    settings: Settings, run_job: object
) -> None:
    # job.json is written once the job is imported, before Faust's worker starts its loop.
    job = run_job("none")  # type: ignore[operator]
    record = settings.state_dir / "jobs" / job.name / "job.json"
    assert wait_until(record.exists, timeout=60, interval=0.05), job.tail()
    assert job.stop() == 0, job.tail()


def test_an_agent_that_raises_sends_the_message_to_its_dead_letter_topic(
    settings: Settings, fleet: Fleet, run_job: object
) -> None:
    failed = {(d, 3) for d in sorted({d for d, _ in fleet.published})[:2]}
    job = run_job(fleet.prefix, frozenset(f"{d}/{s}" for d, s in failed))  # type: ignore[operator]
    dlq = f"dlq.jobs.{job.name}"
    parked = collect(
        settings,
        dlq,
        keep=lambda _m: True,
        done=lambda got: len(got) >= len(failed),
        timeout=100,
    )
    assert job.process.poll() is None, job.tail()
    assert len(parked) == len(failed), job.tail()
    devices = set()
    for m in parked:
        headers = {k: v.decode() for k, v in m.headers() or []}
        assert headers["error"] == f"RuntimeError: refusing {m.key().decode()}/3"
        assert headers["source"] == "telemetry.raw"
        # The original bytes, at the offset the headers name.
        original = _at(settings, "telemetry.raw", int(headers["partition"]), int(headers["offset"]))
        assert original.value() == m.value()
        assert original.key() == m.key()
        devices.add(m.key().decode())
    assert devices == {d for d, _ in failed}
    # The agent goes on after the error: every other reading is processed.
    rest = fleet.published - failed
    seen = _forwarded(settings, job.out, rest)
    assert _pairs(seen) == rest, job.tail()
    assert job.stop(signal.SIGINT) == 0, job.tail()


def test_a_job_reads_only_committed_records(
    settings: Settings, new_topic: Callable[..., str], run_job: object
) -> None:
    """The platform's jobs write in transactions: what they abort is not a job's input."""
    from confluent_kafka import Producer

    topic = new_topic(partitions=1)
    producer = Producer(
        {"bootstrap.servers": settings.bootstrap_servers, "transactional.id": f"t-{topic}"}
    )
    producer.init_transactions(30)
    for value, commit in (("before", True), ("aborted", False), ("after", True)):
        producer.begin_transaction()
        producer.produce(topic, key=value.encode(), value=value.encode())
        producer.flush(30)
        if commit:
            producer.commit_transaction(30)
        else:
            producer.abort_transaction(30)
    job = run_job(source=topic)  # type: ignore[operator]
    seen = collect(
        settings,
        job.out,
        keep=lambda _m: True,
        done=lambda got: {m.value() for m in got} >= {b"before", b"after"},
        timeout=100,
    )
    assert {m.value() for m in seen} == {b"before", b"after"}, job.tail()
    # The worker keeps consuming: had it read the aborted record, it would be there by now,
    # as it comes before "after" in the partition.
    assert job.stop() == 0, job.tail()


def test_bytes_an_avro_topic_cannot_decode_go_to_the_dead_letter_topic(
    settings: Settings, new_topic: Callable[..., str], run_job: object
) -> None:
    from confluent_kafka import Producer
    from confluent_kafka.schema_registry import SchemaRegistryClient

    from schemas.codec import CodecRegistry, load_schema

    topic = new_topic(partitions=1)
    codec = CodecRegistry(SchemaRegistryClient({"url": settings.registry_url})).codec(
        topic, load_schema("Telemetry")
    )
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers})
    for seq, value in enumerate(
        [
            codec.encode({"device_id": "d", "seq": 0, "ts": 0, "received_at": 0}),
            b"not avro at all",
            codec.encode({"device_id": "d", "seq": 2, "ts": 0, "received_at": 0}),
        ]
    ):
        producer.produce(topic, key=b"d", value=value)
        assert seq >= 0
    assert producer.flush(30) == 0
    job = run_job(source=topic, template=AVRO)  # type: ignore[operator]
    parked = collect(settings, f"dlq.jobs.{job.name}", keep=lambda _m: True, done=bool, timeout=100)
    assert len(parked) == 1, job.tail()
    headers = {k: v.decode() for k, v in parked[0].headers() or []}
    assert (headers["source"], headers["partition"], headers["offset"]) == (topic, "0", "1")
    assert "bad_magic" in headers["error"]
    assert parked[0].value() == b"not avro at all"
    seen = collect(
        settings, job.out, keep=lambda _m: True, done=lambda got: len(got) >= 2, timeout=100
    )
    assert {m.value() for m in seen} == {b"d/0", b"d/2"}, job.tail()
    assert job.stop() == 0, job.tail()


def _listed(settings: Settings, name: str) -> tuple[str, int | None] | None:
    listing = subprocess.run(
        [sys.executable, "-m", "infra.cli", "jobs", "list", "--json"],
        cwd=PROJECT_ROOT,
        env=settings_env(settings),
        capture_output=True,
        check=True,
        timeout=60,
    )
    for job in json.loads(listing.stdout.decode().strip().splitlines()[-1]):
        if job["name"] == name:
            return job["state"], job["lag"]
    return None


def _at(settings: Settings, topic: str, partition: int, offset: int) -> Message:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": f"test-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        }
    )
    try:
        consumer.assign([TopicPartition(topic, partition, offset)])
        for _ in range(60):
            msg = consumer.poll(1.0)
            if msg is not None and msg.error() is None:
                return msg
        raise AssertionError(f"nothing at {topic}[{partition}]@{offset}")
    finally:
        consumer.close()
