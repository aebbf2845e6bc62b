"""`python -m bench faust` (part of `make bench`): Faust beside the kit, measured.

First the headline figure (bench/faust_forward.py): a data engineer's Faust job beside the kit's
transactional loop doing the same work. Then why the platform's core workers are not Faust
agents: two findings, each beside a baseline measured in the same run:

1. Throughput: Faust's per-event path (aiokafka fetch, one Event per record, asyncio queues)
   drains a topic at a small fraction of what a bare confluent-kafka consumer loop does, at a
   much higher CPU cost per record, even with an agent that does nothing with its batches.
2. Exactly-once: with `processing_guarantee=EXACTLY_ONCE`, a forwarding agent killed with
   SIGKILL mid-stream leaves duplicates on its output topic (seen by a read_committed
   consumer), with no error logged; upstream issues faust-streaming/faust#517, #177, #323 and
   #440 are open. The same forward done by a confluent-kafka transactional loop
   (send_offsets_to_transaction, fixed transactional.id) and killed the same way leaves none.

The platform's core workers therefore use confluent-kafka transactions
(streams/runtime/transactions.py); Faust jobs are the data engineers' extension surface,
at-least-once with idempotent keys. The Faust worker runs in a subprocess of its own
(bench/faust_probe_app.py; Faust owns its event loop); so do the baselines, so that each
figure's CPU time is one process's. Sub-commands of this module are those baseline processes:
`python -m bench.faust_probe bare-consume ...` and `python -m bench.faust_probe eos-baseline ...`.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from bench import faust_forward
from bench.ingest import Result
from infra.settings import PROJECT_ROOT, Settings
from infra.stack import Stack

PARTITIONS = 4
THROUGHPUT_RECORDS = 200_000
RECORD_BYTES = 100  # key + value
EOS_RECORDS = 30_000
KILLS = 2
KILL_EVERY = 6_000  # kill when this many more distinct records are visible on the output
WORKER_TIMEOUT_S = 300.0  # a Faust worker's start, rebalance and work, per round
STOP_TIMEOUT_S = 30.0


# --- shared helpers ----------------------------------------------------------------------------


def _create_topics(bootstrap: str, names: list[str], replication: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(n, PARTITIONS, replication) for n in names])
    for future in futures.values():
        future.result(30)


def _produce(bootstrap: str, topic: str, records: int, value: Callable[[int], bytes]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "acks": "all"})
    for i in range(records):
        while True:
            try:
                producer.produce(topic, key=f"dev-{i % 500:03d}".encode(), value=value(i))
                break
            except BufferError:
                producer.poll(0.05)
        if i % 10_000 == 0:
            producer.poll(0)
    if producer.flush(60) != 0:
        raise RuntimeError(f"could not deliver {records} records to {topic}")


def _tail(log: Path, lines: int = 30) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def _stop(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT_S)


class _Workers:
    """Subprocesses started from the repo root, each logging to a file; all killed at the end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[subprocess.Popen[bytes]] = []

    def start(
        self, args: list[str], log: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", *args],
                cwd=PROJECT_ROOT,
                env={**os.environ, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.started.append(process)
        return process

    def faust(self, mode: str, app: str, log: Path, **env: str) -> subprocess.Popen[bytes]:
        return self.start(
            ["bench.faust_probe_app", "worker", "-l", "error"],
            log,
            {
                "FAUST_PROBE_MODE": mode,
                "FAUST_PROBE_APP": app,
                "FAUST_PROBE_DATADIR": str(self.workdir / f"{app}-data"),
                "FAUST_PROBE_PARTITIONS": str(PARTITIONS),
                **env,
            },
        )

    def kill_all(self) -> None:
        for process in self.started:
            _stop(process, signal.SIGKILL)


# --- 1. throughput -----------------------------------------------------------------------------


def _bare_consume(bootstrap: str, topic: str, records: int, timeout: float) -> dict[str, float]:
    """The bare ceiling: confluent-kafka consume(1000, 0.5), nothing done with the records."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"faust-probe-bare-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": True,
        }
    )
    consumer.subscribe([topic])
    seen = first = 0
    t0 = cpu0 = 0.0
    deadline = time.monotonic() + timeout
    while seen < records and time.monotonic() < deadline:
        batch = consumer.consume(1000, 0.5)
        count = sum(1 for m in batch if m.error() is None)
        if count and seen == 0:
            first, t0, cpu0 = count, time.perf_counter(), time.process_time()
        seen += count
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    consumer.close()
    if seen < records:
        raise RuntimeError(f"bare consumer read {seen} of {records} from {topic}")
    return {"records": seen - first, "seconds": seconds, "cpu_seconds": cpu}


def _throughput(settings: Settings, workers: _Workers) -> list[Result]:
    bootstrap = settings.bootstrap_servers
    tag = uuid.uuid4().hex[:8]
    topic = f"faust-probe-tp-{tag}"
    _create_topics(bootstrap, [topic], settings.replication_factor)
    filler = b"x" * (RECORD_BYTES - len(b"dev-000"))
    _produce(bootstrap, topic, THROUGHPUT_RECORDS, lambda _i: filler)

    bare_log = workers.workdir / "bare-consume.log"
    bare_args = ["bench.faust_probe", "bare-consume", bootstrap, topic, str(THROUGHPUT_RECORDS)]
    bare = workers.start(bare_args, bare_log)
    try:
        bare.wait(WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"bare consumer still running after {WORKER_TIMEOUT_S:.0f} s") from exc
    lines = _tail(bare_log, 1)
    if bare.returncode != 0 or not lines.startswith("{"):
        raise RuntimeError(f"bare consumer failed ({bare.returncode}):\n{_tail(bare_log)}")
    base = json.loads(lines)

    app = f"faust-probe-tp-{tag}"
    result_file = workers.workdir / f"{app}.json"
    log = workers.workdir / f"{app}.log"
    agent = workers.faust(
        "take",
        app,
        log,
        FAUST_PROBE_BOOTSTRAP=bootstrap,
        FAUST_PROBE_REPLICATION=str(settings.replication_factor),
        FAUST_PROBE_IN=topic,
        FAUST_PROBE_RECORDS=str(THROUGHPUT_RECORDS),
        FAUST_PROBE_RESULT=str(result_file),
    )
    try:
        agent.wait(WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _stop(agent, signal.SIGKILL)
    if not result_file.exists():
        raise RuntimeError(f"Faust agent gave no result ({agent.returncode}):\n{_tail(log)}")
    faust = json.loads(result_file.read_text())

    faust_rate = faust["records"] / max(faust["seconds"], 1e-3)
    bare_rate = base["records"] / max(base["seconds"], 1e-3)
    faust_cpu = faust["cpu_seconds"] * 100_000 / max(faust["records"], 1)
    bare_cpu = base["cpu_seconds"] * 100_000 / max(base["records"], 1)
    drained = f"{THROUGHPUT_RECORDS // 1000}k records of {RECORD_BYTES} B, {PARTITIONS} partitions"
    return [
        Result(
            f"faust agent records/s, take(2000, within=0.5) doing nothing, {drained}"
            " (baseline: bare confluent-kafka consume(1000, 0.5) loop)",
            faust_rate,
            "records/s",
            bare_rate,
            faust_rate / max(bare_rate, 1e-3),
        ),
        Result(
            "faust agent CPU per 100k records, worker process"
            " (baseline: bare confluent-kafka consume loop)",
            faust_cpu,
            "cpu s",
            bare_cpu,
            faust_cpu / max(bare_cpu, 1e-3),
        ),
    ]


# --- 2. exactly-once under kill -9 -------------------------------------------------------------


def _eos_baseline(bootstrap: str, source: str, sink: str, group: str, txn_id: str) -> None:
    """The transactional forward loop: consume a batch, produce it and its offsets in one
    transaction, commit; runs until killed. A fixed transactional.id fences (and aborts the open
    transaction of) the killed predecessor. Each transaction's records are flushed to the
    broker and the transaction then held open for 0.25 s (pacing: about 1,500 records/s), so
    that a kill lands mid-stream and most likely mid-transaction, with records written.
    """
    producer = Producer(
        {"bootstrap.servers": bootstrap, "transactional.id": txn_id, "linger.ms": 5}
    )
    producer.init_transactions(60)
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
        }
    )
    # One worker owns every partition: assigned (no rebalance to wait for after a kill), each
    # from the group's committed offset (fetched as stable: read_committed).
    consumer.assign([TopicPartition(source, p) for p in range(PARTITIONS)])
    while True:
        batch = [m for m in consumer.consume(500, 0.5) if m.error() is None]
        if not batch:
            continue
        producer.begin_transaction()
        ends: dict[int, int] = {}
        for msg in batch:
            producer.produce(sink, key=msg.key(), value=msg.value())
            partition, offset = msg.partition() or 0, msg.offset() or 0
            ends[partition] = max(ends.get(partition, 0), offset + 1)
        producer.flush(30)  # the records reach the broker inside the open transaction,
        time.sleep(0.25)  # which stays open a while: pacing, so that kills land here
        offsets = [TopicPartition(source, p, o) for p, o in ends.items()]
        producer.send_offsets_to_transaction(offsets, consumer.consumer_group_metadata(), 30)
        producer.commit_transaction(30)


def _check_consumer(
    bootstrap: str, topic: str, eof: bool, isolation: str = "read_committed"
) -> Consumer:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"faust-probe-check-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "isolation.level": isolation,
            "enable.partition.eof": eof,
        }
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
    return consumer


def _read(consumer: Consumer, seen: collections.Counter[bytes], timeout: float) -> set[int]:
    """One poll: count the records' values; return the partitions at their end (EOF)."""
    at_end: set[int] = set()
    for msg in consumer.consume(1000, timeout):
        error = msg.error()
        if error is None:
            seen[msg.value() or b""] += 1
        elif error.code() == KafkaError._PARTITION_EOF:
            at_end.add(msg.partition() or 0)
        else:
            raise KafkaException(error)
    return at_end


def _final_count(bootstrap: str, topic: str, isolation: str) -> collections.Counter[bytes]:
    """The output's records (committed ones only, or all), read to the end of every partition."""
    consumer = _check_consumer(bootstrap, topic, eof=True, isolation=isolation)
    seen: collections.Counter[bytes] = collections.Counter()
    ended: set[int] = set()
    deadline = time.monotonic() + 60
    while len(ended) < PARTITIONS and time.monotonic() < deadline:
        ended |= _read(consumer, seen, 0.5)
    consumer.close()
    if len(ended) < PARTITIONS:
        raise RuntimeError(f"output {topic}: only partitions {sorted(ended)} read to the end")
    return seen


def _kill_rounds(
    settings: Settings, start: Callable[[int], subprocess.Popen[bytes]], tag: str
) -> tuple[int, int, int]:
    """Feed the input, run the forward job, kill -9 it twice mid-stream (each time once
    KILL_EVERY more distinct records are visible, read_committed), let the last run finish;
    return the output's duplicates and missing records (read_committed), and its records
    written but aborted (seen by read_uncommitted only: the kills' open transactions)."""
    bootstrap = settings.bootstrap_servers
    source, sink = f"faust-probe-in-{tag}", f"faust-probe-out-{tag}"
    _create_topics(bootstrap, [source, sink], settings.replication_factor)
    _produce(bootstrap, source, EOS_RECORDS, lambda i: str(i).encode())
    watch = _check_consumer(bootstrap, sink, eof=False)
    seen: collections.Counter[bytes] = collections.Counter()
    try:
        for round_ in range(KILLS + 1):
            worker = start(round_)
            target = EOS_RECORDS if round_ == KILLS else KILL_EVERY * (round_ + 1)
            deadline = time.monotonic() + WORKER_TIMEOUT_S
            while len(seen) < target and time.monotonic() < deadline:
                if worker.poll() is not None:
                    raise RuntimeError(
                        f"forward job exited ({worker.returncode}) in round {round_}"
                    )
                _read(watch, seen, 0.2)
            if round_ < KILLS:
                if len(seen) < target:
                    raise RuntimeError(
                        f"round {round_}: {len(seen)} of {target} records forwarded "
                        f"after {WORKER_TIMEOUT_S:.0f} s"
                    )
                if len(seen) >= EOS_RECORDS:
                    raise RuntimeError(f"round {round_}: the job was done before the kill")
                _stop(worker, signal.SIGKILL)
            else:  # done, or stuck short of the end: the count below says which
                _stop(worker, signal.SIGTERM)
    finally:
        watch.close()
    final = _final_count(bootstrap, sink, "read_committed")
    written = _final_count(bootstrap, sink, "read_uncommitted")
    duplicates = sum(n - 1 for n in final.values() if n > 1)
    missing = len({str(i).encode() for i in range(EOS_RECORDS)} - final.keys())
    return duplicates, missing, written.total() - final.total()


def _exactly_once(settings: Settings, workers: _Workers) -> list[Result]:
    bootstrap = settings.bootstrap_servers
    tag = uuid.uuid4().hex[:8]

    def faust_worker(round_: int) -> subprocess.Popen[bytes]:
        app = f"faust-probe-eos-{tag}"
        return workers.faust(
            "eos",
            app,
            workers.workdir / f"{app}-{round_}.log",
            FAUST_PROBE_BOOTSTRAP=bootstrap,
            FAUST_PROBE_REPLICATION=str(settings.replication_factor),
            FAUST_PROBE_IN=f"faust-probe-in-{tag}",
            FAUST_PROBE_OUT=f"faust-probe-out-{tag}",
        )

    def baseline_worker(round_: int) -> subprocess.Popen[bytes]:
        args = [
            "bench.faust_probe",
            "eos-baseline",
            bootstrap,
            f"faust-probe-in-{base_tag}",
            f"faust-probe-out-{base_tag}",
            f"faust-probe-txn-{base_tag}",
            f"faust-probe-txn-{base_tag}-0",
        ]
        return workers.start(args, workers.workdir / f"eos-baseline-{round_}.log")

    base_tag = f"{tag}b"
    faust = _kill_rounds(settings, faust_worker, tag)
    base = _kill_rounds(settings, baseline_worker, base_tag)
    job = f"{EOS_RECORDS // 1000}k records forwarded"
    baseline = "baseline: confluent-kafka transactional loop, killed the same way"
    what = (
        "duplicates (read_committed)",
        "records missing (read_committed)",
        "records written then aborted (read_uncommitted only)",
    )
    return [
        Result(
            f"faust exactly_once {name} after {KILLS} kill -9, {job} ({baseline})",
            value,
            "records",
            base_value,
            value / max(base_value, 1),
        )
        for name, value, base_value in zip(what, faust, base, strict=True)
    ]


def run(settings: Settings) -> list[Result]:
    Stack(settings).up()
    with tempfile.TemporaryDirectory(prefix="faust-probe-") as tmp:
        workers = _Workers(Path(tmp))
        try:
            forward = faust_forward.run(settings, workers.workdir)
            return forward + _throughput(settings, workers) + _exactly_once(settings, workers)
        finally:
            workers.kill_all()


# --- the baseline processes --------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.faust_probe")
    commands = parser.add_subparsers(dest="command", required=True)
    bare = commands.add_parser("bare-consume", help="drain a topic; print a JSON result line")
    bare.add_argument("bootstrap")
    bare.add_argument("topic")
    bare.add_argument("records", type=int)
    bare.add_argument("--timeout", type=float, default=WORKER_TIMEOUT_S)
    eos = commands.add_parser("eos-baseline", help="transactional forward loop, until killed")
    for name in ("bootstrap", "source", "sink", "group", "transactional_id"):
        eos.add_argument(name)
    args = parser.parse_args(argv)
    if args.command == "bare-consume":
        result = _bare_consume(args.bootstrap, args.topic, args.records, args.timeout)
        print(json.dumps(result), flush=True)
    else:
        _eos_baseline(args.bootstrap, args.source, args.sink, args.group, args.transactional_id)


if __name__ == "__main__":
    main()
