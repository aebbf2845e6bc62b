"""The `faust` stage's headline figure: a Faust job's throughput beside the kit's transactional
loop doing the same work, in the same run.

The work: read Telemetry records (Avro, Confluent wire format) from a topic of PARTITIONS
partitions, decode each, and write it again, Avro-encoded and keyed by its device, to an output
topic. Both jobs read the same input records, each in a consumer group of its own:

- the Faust job is a job file (bench/faust_forward_job.py) on the platform's Faust app, run by
  `python -m infra.jobs` as `fleet jobs run` runs it (aiokafka transport, the platform's codec
  and typed records, at-least-once);
- the baseline is a :class:`~streams.runtime.spec.JobSpec` on the kit's
  :class:`~streams.runtime.job.TransactionalJob` (exactly-once: outputs and input offsets in one
  Kafka transaction per batch), run by `python -m bench.faust_forward kit ...`.

Each runs in a process of its own. The figure is what a read_committed consumer of the output
sees: records/s from the first output record to the last (so start-up is left out, and the
kit's commits are counted in).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from confluent_kafka.schema_registry import SchemaRegistryClient

from bench.ingest import Result, bench_settings
from bench.telemetry import produce_readings
from infra.settings import PROJECT_ROOT, Settings, settings_env
from infra.stack import Stack
from schemas.codec import CodecRegistry, load_schema
from streams.runtime.clients import KafkaConfig
from streams.runtime.job import JobOptions, TransactionalJob
from streams.runtime.process import run_until_stopped
from streams.runtime.spec import Batch, JobSpec, Output, dead_letter_output

PARTITIONS = 4
RECORDS = 30_000
DEVICES = 500
JOB_TIMEOUT_S = 600.0  # a job's start and work (minutes on a loaded machine)
STOP_TIMEOUT_S = 30.0
JOB_FILE = Path(__file__).resolve().parent / "faust_forward_job.py"


# --- the kit's forward job (the baseline process) ----------------------------------------------


@dataclass
class _Nothing:
    """The forward job keeps no state."""

    def drop_partitions(self, partitions: set[int]) -> None:
        return None

    def status(self) -> dict[str, Any]:
        return {}


def _forward(out: str, dlq: str, _state: _Nothing, batch: Batch) -> Iterator[Output]:
    for item in batch.inputs:
        if item.dead is not None:
            yield dead_letter_output(dlq, item.dead)
        else:
            yield Output(out, item.record["device_id"], item.record)


def forward_spec(source: str, out: str, group: str) -> JobSpec[_Nothing]:
    dlq = f"{out}.dlq"
    return JobSpec(
        name=group,
        group=group,
        inputs={source: "Telemetry"},
        outputs={out: "Telemetry"},
        dead_letters=dlq,
        stage="bench",
        state=_Nothing,
        process=partial(_forward, out, dlq),
    )


def _run_kit(bootstrap: str, registry: str, source: str, out: str, group: str) -> None:
    kafka = KafkaConfig(bootstrap, registry, client_id="bench-kit-forward")
    status = Path(tempfile.gettempdir()) / f"{group}.json"
    spec = forward_spec(source, out, group)
    run_until_stopped(
        "bench-kit-forward", lambda: TransactionalJob(spec, kafka, JobOptions(status_path=status))
    )


# --- the driver ---------------------------------------------------------------------------------


def _create_topics(bootstrap: str, names: list[str], replication: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(n, PARTITIONS, replication) for n in names])
    for future in futures.values():
        future.result(30)


def _produce(settings: Settings, topic: str) -> None:
    codec = CodecRegistry(SchemaRegistryClient({"url": settings.registry_url})).codec(
        topic, load_schema("Telemetry")
    )
    producer = Producer(
        {"bootstrap.servers": settings.bootstrap_servers, "linger.ms": 20, "acks": "all"}
    )
    produce_readings(producer, topic, codec, RECORDS, DEVICES, "fwd-", int(time.time() * 1000))
    if producer.flush(60) != 0:
        raise RuntimeError(f"could not deliver {RECORDS} records to {topic}")


def _tail(log: Path, lines: int = 30) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT_S)


def _watch(bootstrap: str, topic: str, process: subprocess.Popen[bytes], log: Path) -> float:
    """Records/s on `topic` (read_committed) from its first record to its RECORDS-th."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-forward-watch-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
    seen = first = 0
    t0 = t1 = 0.0
    deadline = time.monotonic() + JOB_TIMEOUT_S
    try:
        while seen < RECORDS and time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"job exited ({process.returncode}):\n{_tail(log)}")
            messages = consumer.consume(1000, 0.2)
            for msg in messages:
                error = msg.error()
                if error is not None and error.code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                    raise KafkaException(error)
            count = sum(1 for m in messages if m.error() is None)
            if count and seen == 0:
                first, t0 = count, time.perf_counter()
            seen += count
            t1 = time.perf_counter()
    finally:
        consumer.close()
    if seen < RECORDS:
        raise RuntimeError(
            f"{topic}: {seen} of {RECORDS} records after {JOB_TIMEOUT_S:.0f} s:\n{_tail(log)}"
        )
    return (seen - first) / max(t1 - t0, 1e-3)


def _start(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", *args],
            cwd=PROJECT_ROOT,
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _measure(args: list[str], env: dict[str, str], bootstrap: str, out: str, log: Path) -> float:
    process = _start(args, log, env)
    try:
        return _watch(bootstrap, out, process, log)
    finally:
        _stop(process)


def run(settings: Settings, workdir: Path) -> list[Result]:
    """Both jobs on the stack (already up); one Result: Faust records/s beside the kit's."""
    bootstrap = settings.bootstrap_servers
    tag = uuid.uuid4().hex[:8]
    source, faust_out, kit_out = (f"bench-fwd-{n}-{tag}" for n in ("in", "faust", "kit"))
    _create_topics(bootstrap, [source, faust_out, kit_out], settings.replication_factor)
    _produce(settings, source)
    env = {
        **settings_env(settings),
        "FLEET_BENCH_FORWARD_IN": source,
        "FLEET_BENCH_FORWARD_OUT": faust_out,
    }
    faust_rate = _measure(
        ["infra.jobs", str(JOB_FILE), "--loglevel", "error"],
        env,
        bootstrap,
        faust_out,
        workdir / "faust-forward.log",
    )
    kit_args = ["bench.faust_forward", "kit", bootstrap, settings.registry_url, source, kit_out]
    kit_rate = _measure(
        [*kit_args, f"bench-kit-forward-{tag}"], {}, bootstrap, kit_out, workdir / "kit.log"
    )
    return [
        Result(
            f"faust job records/s, Telemetry decode + re-encode + send, {RECORDS // 1000}k"
            f" records, {PARTITIONS} partitions, at-least-once (`fleet jobs run`)"
            " (baseline: the kit's TransactionalJob doing the same, exactly-once)",
            faust_rate,
            "records/s",
            kit_rate,
            faust_rate / max(kit_rate, 1e-3),
        )
    ]


def run_alone(settings: Settings) -> list[Result]:
    """This comparison alone on the bench's stack (started, then stopped)."""
    try:
        Stack(settings).up()
        with tempfile.TemporaryDirectory(prefix="bench-forward-") as tmp:
            return run(settings, Path(tmp))
    finally:
        Stack(settings).down()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.faust_forward")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("measure", help="this comparison alone, on the bench's stack; JSON out")
    kit = commands.add_parser("kit", help="the kit's forward job, until SIGTERM")
    for name in ("bootstrap", "registry", "source", "out", "group"):
        kit.add_argument(name)
    args = parser.parse_args(argv)
    if args.command == "measure":
        results = run_alone(bench_settings(PROJECT_ROOT / ".state" / "bench"))
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        _run_kit(args.bootstrap, args.registry, args.source, args.out, args.group)


if __name__ == "__main__":
    main()
