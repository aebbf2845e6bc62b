"""CPU ledger and latency by stage: what each process of the stack spends, idle and per message.

On a fresh stack (one bridge), four phases; between phases 1 and 2 a warm-up load (`warmup_s`
at the ledger's rate: the JVMs compile their hot code; its CPU per message is reported apart):

1. **Idle**: after the stack settled, the CPU every process of the stack spent over
   `idle_s` seconds with no load, in % of a core (utime + stime from /proc via psutil, each
   service's pid from its pid file, its child processes included). Baseline: the same stack
   at the fixed load of phase 2, so the ratio is the share of the loaded cost paid for
   nothing.
2. **Ledger**: the lean mTLS load generator (bench/loadgen.py) offers a fixed load (3,000
   msgs/s by default) for `load_s` seconds; the CPU seconds each process spent from the
   start of the load until everything it offered is in Kafka and the hot worker consumed
   it, divided by the messages acknowledged: microseconds of CPU per message. The load
   generator runs in this process's main thread; its own CPU per message (thread time) is
   the baseline of every row and listed apart: the cheapest any client of the broker can be.
3. **Latency by stage** at 1,000 msgs/s and at the ledger's load, read_committed, with a
   rule flapping on a noisy metric so alerts flow all the time (bench/hot.py's rule): from
   timestamps that exist on every record: the device's `ts` (publish), the bridge's
   `received_at` (the broker hop and the bridge's read), the telemetry record's Kafka
   timestamp (the bridge's decode, encode and produce), the alert record's Kafka timestamp
   (Kafka to the hot worker, its processing; written inside its transaction), and the alert's
   arrival at a read_committed consumer (the commit). Baseline of each stage: the whole
   publish -> alert at the same quantile, so the ratio is the stage's share.
4. **Idle at rest**: phase 1 again after the loads, when the JVMs have compiled their hot code
   and nothing is queued: what a running stack costs with no traffic.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import psutil
from confluent_kafka import Consumer, Message, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient

from bench.hot import flap_fleet, quantile, stamp_new_records
from bench.ingest import Result
from bench.loadgen import LoadStats, offer_load
from infra.provision import DeviceCredentials
from infra.services.base import Service, wait_until
from infra.settings import Settings
from infra.stack import LAG_GROUPS, Stack
from infra.topics import unread_records
from schemas.codec import CodecRegistry, Decoded, load_schema
from streams.hot.job import DIGESTS, TELEMETRY

# What the load is and every job that works per message reads, and what the hot path derives.
PER_MESSAGE = (TELEMETRY, DIGESTS)
CpuTimes = dict[str, float]  # service name -> CPU seconds (user + system, children included)


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process and of its living children (a launcher's JVM, say)."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def _pids(stack: Stack) -> dict[str, int]:
    """Every running service of the stack by name (the supervisor too)."""
    out: dict[str, int] = {}
    service: Service
    for service in stack.services:
        pid = service.status().pid
        if pid:
            out[service.name] = pid
    return out


def _sample(pids: dict[str, int]) -> CpuTimes:
    return {name: _cpu_seconds(pid) for name, pid in pids.items()}


def _spent(before: CpuTimes, after: CpuTimes) -> CpuTimes:
    return {name: max(after.get(name, 0.0) - before[name], 0.0) for name in before}


@dataclass
class Arrivals:
    """(arrival ms, Kafka timestamp ms, value) of every alert a read_committed consumer got."""

    records: list[tuple[float, int, bytes]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)


def _collect_alerts(settings: Settings, arrivals: Arrivals, ready: threading.Event) -> None:
    """Stamp each new `alerts` record as a read_committed consumer is handed it."""

    def stamp(now: float, msg: Message) -> None:
        arrivals.records.append((now, msg.timestamp()[1], msg.value() or b""))

    stamp_new_records(
        settings, "bench-ledger", "read_committed", ("alerts",), ready, arrivals.stop, stamp
    )


@dataclass
class LoadRun:
    stats: LoadStats
    cpu: CpuTimes  # per service, from load start to drained
    loadgen_cpu_s: float  # the load generator's thread
    wall_s: float
    arrivals: Arrivals = field(default_factory=Arrivals)


def _drained(settings: Settings) -> bool:
    """Every job that reads the telemetry, or what is derived from it, has read all of it."""
    readers = {group: [t for t in inputs if t in PER_MESSAGE] for group, inputs in LAG_GROUPS}
    return all(unread_records(settings, group, t) == 0 for group, t in readers.items() if t)


def _run_load(
    stack: Stack, creds: Sequence[DeviceCredentials], total_rate: float, duration: float
) -> LoadRun:
    settings = stack.settings
    arrivals, ready = Arrivals(), threading.Event()
    collector = threading.Thread(target=_collect_alerts, args=(settings, arrivals, ready))
    collector.start()
    ready.wait(30)
    pids = _pids(stack)
    before, started = _sample(pids), time.monotonic()
    thread_before = time.thread_time()
    stats = asyncio.run(offer_load(settings, creds, total_rate / len(creds), duration))
    loadgen = time.thread_time() - thread_before
    # Drained: every job consumed all of it (their lag is what the stack still owes). Not only
    # the hot worker: a job that falls behind would do its share of the work after the window.
    if not wait_until(lambda: _drained(settings), timeout=300, interval=0.5):
        raise RuntimeError("the stack did not drain the load in 300 s: the window would be wrong")
    after, wall = _sample(pids), time.monotonic() - started
    time.sleep(1.0)  # the last alerts' commit reaches the collector (not a measurement)
    arrivals.stop.set()
    collector.join(timeout=30)
    return LoadRun(stats, _spent(before, after), loadgen, wall, arrivals)


@dataclass
class Stages:
    """Per stage, milliseconds (see the module docstring)."""

    mqtt: list[float] = field(default_factory=list)  # device ts -> bridge received_at
    bridge: list[float] = field(default_factory=list)  # received_at -> telemetry Kafka ts
    job: list[float] = field(default_factory=list)  # telemetry Kafka ts -> alert Kafka ts
    commit: list[float] = field(default_factory=list)  # alert Kafka ts -> read_committed
    total: list[float] = field(default_factory=list)  # device ts -> alert read_committed
    ingest: list[float] = field(default_factory=list)  # device ts -> telemetry Kafka ts


def _telemetry_times(
    settings: Settings, codecs: CodecRegistry, prefix: str, since_ms: int
) -> dict[tuple[str, int], tuple[int, int, int]]:
    """(device, seq) -> (device ts, received_at, Kafka timestamp) of this run's telemetry."""
    codec = codecs.codec(TELEMETRY, load_schema("Telemetry"))
    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": f"bench-ledger-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    meta = consumer.list_topics(TELEMETRY, timeout=10).topics[TELEMETRY]
    starts = consumer.offsets_for_times(
        [TopicPartition(TELEMETRY, p, since_ms) for p in meta.partitions], timeout=10
    )
    ends = {tp.partition: consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in starts}
    open_parts = {tp.partition for tp in starts if 0 <= tp.offset < ends[tp.partition]}
    consumer.assign([tp for tp in starts if tp.partition in open_parts])
    out: dict[tuple[str, int], tuple[int, int, int]] = {}
    deadline = time.monotonic() + 120
    while open_parts and time.monotonic() < deadline:
        for msg in consumer.consume(5000, 1.0):
            if msg.error() is not None:
                open_parts.discard(msg.partition() or 0)
                continue
            if (msg.offset() or 0) >= ends[msg.partition() or 0] - 1:
                open_parts.discard(msg.partition() or 0)
            if not (msg.key() or b"").startswith(prefix.encode()):
                continue
            decoded = codec.decode(msg.value() or b"")
            if isinstance(decoded, Decoded):
                r = decoded.record
                out[(str(r["device_id"]), int(r["seq"]))] = (
                    int(r["ts"]),
                    int(r["received_at"]),
                    msg.timestamp()[1],
                )
    consumer.close()
    return out


def _stages(settings: Settings, run: LoadRun, prefix: str, since_ms: int) -> Stages:
    codecs = CodecRegistry(SchemaRegistryClient({"url": settings.registry_url}))
    telemetry = _telemetry_times(settings, codecs, prefix, since_ms)
    alerts = codecs.codec("alerts", load_schema("Alert"))
    out = Stages()
    for ts, received, kafka_ts in telemetry.values():
        out.mqtt.append(received - ts)
        out.bridge.append(kafka_ts - received)
        out.ingest.append(kafka_ts - ts)
    for arrived, alert_ts, value in run.arrivals.records:
        decoded = alerts.decode(value)
        if not isinstance(decoded, Decoded):
            continue
        r = decoded.record
        found = telemetry.get((str(r["device_id"]), int(r["seq"])))
        if found is None:
            continue
        ts, _received, kafka_ts = found
        out.job.append(alert_ts - kafka_ts)
        out.commit.append(arrived - alert_ts)
        out.total.append(arrived - ts)
    return out


def _stage_rows(stages: Stages, offered: float, target: float) -> list[Result]:
    load = f"at {target:,.0f} msgs/s (offered {offered:,.0f})"
    parts = (
        ("device publish->bridge received_at (Mosquitto, bridge read)", stages.mqtt),
        ("bridge received_at->telemetry.raw Kafka timestamp (decode, encode, produce)",
         stages.bridge),
        ("telemetry.raw Kafka timestamp->alert Kafka timestamp (Kafka, hot worker)",
         stages.job),
        ("alert Kafka timestamp->read_committed consumer (transaction commit, fetch)",
         stages.commit),
    )  # fmt: skip
    rows = []
    for q, name in ((0.5, "p50"), (0.99, "p99")):
        total = quantile(stages.total, q)
        ingest = quantile(stages.ingest, q)
        rows.append(
            Result(
                f"{name} publish->alert, read_committed, {load} "
                f"(baseline: {name} publish->telemetry record in Kafka)",
                total,
                "ms",
                ingest,
                total / max(ingest, 1.0),
            )
        )
        for what, values in parts:
            value = quantile(values, q)
            rows.append(
                Result(
                    f"latency: {name} stage {what} {load} "
                    f"(baseline: {name} publish->alert, read_committed)",
                    value,
                    "ms",
                    total,
                    value / max(total, 1.0),
                )
            )
    return rows


def _ledger_rows(run: LoadRun, idle: CpuTimes, idle_s: float, target: float) -> list[Result]:
    acked = max(run.stats.acked, 1)
    loadgen_us = run.loadgen_cpu_s / acked * 1e6
    load = f"at {target:,.0f} msgs/s (offered {run.stats.offered_rate:,.0f}, {acked:,} msgs)"
    base = "(baseline: the load generator's own CPU per message)"
    platform_us = sum(run.cpu.values()) / acked * 1e6
    rows = [
        Result(
            f"platform CPU per message, all processes of the stack, {load} {base}",
            platform_us,
            "us",
            loadgen_us,
            platform_us / max(loadgen_us, 1e-9),
        )
    ]
    for name, seconds in sorted(run.cpu.items(), key=lambda kv: -kv[1]):
        us = seconds / acked * 1e6
        rows.append(
            Result(f"ledger: {name} CPU per message {load} {base}", us, "us", loadgen_us,
                   us / max(loadgen_us, 1e-9))
        )  # fmt: skip
    return rows + idle_rows(idle, idle_s, "after start", run, load)


def _warmup_row(run: LoadRun, target: float, warmup_s: float) -> Result:
    acked = max(run.stats.acked, 1)
    loadgen_us = run.loadgen_cpu_s / acked * 1e6
    platform_us = sum(run.cpu.values()) / acked * 1e6
    return Result(
        f"warm-up: platform CPU per message in the first {warmup_s:.0f} s of load after a start "
        f"(JIT compiling), at {target:,.0f} msgs/s "
        "(baseline: the load generator's own CPU per message)",
        platform_us,
        "us",
        loadgen_us,
        platform_us / max(loadgen_us, 1e-9),
    )


def idle_rows(idle: CpuTimes, idle_s: float, when: str, run: LoadRun, load: str) -> list[Result]:
    """The stack's idle CPU, whole and by process; baseline: the same stack at the load."""
    loaded_pct = sum(run.cpu.values()) / run.wall_s * 100
    idle_pct = sum(idle.values()) / idle_s * 100
    rows = [
        Result(
            f"idle CPU of the whole stack {when}, over {idle_s:.0f} s with no load "
            f"(baseline: the same stack {load})",
            idle_pct,
            "% of a core",
            loaded_pct,
            idle_pct / max(loaded_pct, 1e-9),
        )
    ]
    for name, seconds in sorted(idle.items(), key=lambda kv: -kv[1]):
        pct = seconds / idle_s * 100
        rows.append(
            Result(
                f"idle {when}: {name} over {idle_s:.0f} s (baseline: the whole stack idle)",
                pct,
                "% of a core",
                idle_pct,
                pct / max(idle_pct, 1e-9),
            )
        )
    return rows


def measure_idle(stack: Stack, idle_s: float) -> CpuTimes:
    pids = _pids(stack)
    before = _sample(pids)
    time.sleep(idle_s)  # the measurement window itself: nothing is waited for
    return _spent(before, _sample(pids))


def run_ledger(
    settings: Settings,
    devices: int = 100,
    rate: float = 3_000.0,
    latency_rate: float = 1_000.0,
    load_s: float = 30.0,
    idle_s: float = 20.0,
    settle_s: float = 10.0,
    warmup_s: float = 60.0,
) -> list[Result]:
    fleet = flap_fleet(settings, "ldg", devices)
    stack, prefix, creds = fleet.stack, fleet.prefix, fleet.creds

    time.sleep(settle_s)  # start-up work (restores, first fetches) ends before idle is read
    idle = measure_idle(stack, idle_s)
    # Warm-up, as any benchmark of a JVM: in its first minutes under load Kafka's JIT compiler
    # alone takes ~14% of a core (measured per thread), so a window on a fresh stack counts
    # compiling. Reported apart: what the first minute after a start costs.
    warm = _run_load(stack, creds, rate, warmup_s)
    results: list[Result] = [_warmup_row(warm, rate, warmup_s)]
    ledger_run: LoadRun | None = None
    for target in (latency_rate, rate):
        since_ms = int(time.time() * 1000) - 1000
        run = _run_load(stack, creds, target, load_s)
        if run.stats.acked < run.stats.published:
            got, sent = run.stats.acked, run.stats.published
            raise RuntimeError(f"load generator got {got} acks of {sent}")
        if target == rate:
            ledger_run = run
            results = _ledger_rows(run, idle, idle_s, target) + results
        results += _stage_rows(
            _stages(settings, run, prefix, since_ms), run.stats.offered_rate, target
        )
    # At rest: the JVMs have compiled their hot code and nothing is queued (right after start,
    # Kafka's JIT compiler alone takes several % of a core for minutes).
    time.sleep(settle_s)  # the loads' tails (commits, window emissions) end before rest is read
    rest = measure_idle(stack, idle_s)
    if ledger_run is not None:
        load = f"at {rate:,.0f} msgs/s"
        results += idle_rows(rest, idle_s, "at rest after the loads", ledger_run, load)
    return results
