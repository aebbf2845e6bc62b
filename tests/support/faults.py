"""Fault injection on a running stack: a recorded simulated fleet, signals, recovery, counts.

The fleet is the project's simulator (infra/simulator/), with each device's in-flight store
swapped for one that also records, per message, when the device handed it to the broker, when
the broker's PUBACK came back and whether the device discarded it (MQTT 5 has a client drop its
session state, in-flight messages included, when the broker answers Session Present 0).
Those times let a test state exactly which messages a broker crash may lose.

The warehouse is read only through the cold worker's query server: opening the embedded chDB
folder from the test process would take its lock and keep the restarted worker out.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import clickhouse_connect
from clickhouse_connect.driver.exceptions import ClickHouseError
from gmqtt.storage import PersistentStorage

from infra.provision import DeviceCredentials
from infra.services.base import Service
from infra.settings import Settings
from infra.simulator.device import SimulatedDevice, load_seq, save_seq
from infra.simulator.protocol import EVENTS, TELEMETRY, build_message
from infra.simulator.stats import FleetStats
from infra.stack import Stack
from sinks.query_server import read_platform_secret
from tests.support.mqtt import MqttSession, connect

# A message of the run: (kind, device id, seq); kind is "telemetry" or "events".
Key = tuple[str, str, int]
KINDS = (TELEMETRY, EVENTS)
TABLES = {TELEMETRY: "telemetry", EVENTS: "device_events"}
_TOPIC = re.compile(rb"devices/([A-Za-z0-9._-]+)/(telemetry|events)")
_SEQ = re.compile(rb'"seq": (\d+)')


@dataclass
class MessageLog:
    """What the devices of one run did with each uplink message (wall-clock times)."""

    handed: dict[Key, float] = field(default_factory=dict)  # first PUBLISH to the broker
    acked: dict[Key, float] = field(default_factory=dict)  # PUBACK received
    discarded: dict[Key, float] = field(default_factory=dict)  # dropped on Session Present 0
    # PUBACKs with a reason code other than 0 (0x10: no matching subscribers, MQTT 5).
    reasons: dict[Key, int] = field(default_factory=dict)
    # (device id, time, session present) of every CONNACK.
    connects: list[tuple[str, float, bool]] = field(default_factory=list)


def _key_of(package: bytes) -> Key | None:
    topic, seq = _TOPIC.search(package), _SEQ.search(package)
    if topic is None or seq is None:
        return None
    return (topic[2].decode(), topic[1].decode(), int(seq[1]))


class RecordingStorage(PersistentStorage):  # type: ignore[misc]
    """gmqtt's in-flight store, noting hand-over, PUBACK and discard times in a MessageLog."""

    def __init__(self, log: MessageLog) -> None:
        super().__init__()
        self._log = log
        self._keys: dict[int, Key] = {}
        self.reason_of: dict[int, int] = {}  # mid -> reason code of the PUBACK being handled

    def push_message(self, mid: int, raw_package: bytes) -> None:
        key = _key_of(raw_package)
        if key is not None:
            self._keys[mid] = key
            self._log.handed.setdefault(key, time.time())
        super().push_message(mid, raw_package)

    def remove_message_by_mid(self, mid: int) -> None:
        key = self._keys.pop(mid, None)
        reason = self.reason_of.pop(mid, 0)
        if key is not None and mid in self._messages:
            self._log.acked[key] = time.time()
            if reason:
                self._log.reasons[key] = reason
        super().remove_message_by_mid(mid)

    def clear(self) -> None:
        now = time.time()
        for mid in self._messages:
            key = self._keys.pop(mid, None)
            if key is not None:
                self._log.discarded[key] = now
        super().clear()


def _record(device: SimulatedDevice, log: MessageLog) -> None:
    """Swap the device's in-flight store for a recording one; note every CONNACK and the
    reason code of every PUBACK (gmqtt 0.8 drops the message whatever the code)."""
    storage = RecordingStorage(log)
    device.client._persistent_storage = storage
    handler = device.client._package_handler
    puback = handler._handle_puback_packet

    def noted_puback(cmd: int, packet: bytes) -> None:
        (mid,) = struct.unpack("!H", packet[:2])
        storage.reason_of[mid] = packet[2] if len(packet) > 2 else 0
        puback(cmd, packet)

    handler._handle_puback_packet = noted_puback  # looked up on the instance, per packet type
    on_connect = device._on_connect

    def noted(client: Any, session_present: int, rc: int, properties: Any) -> None:
        log.connects.append((device.device_id, time.time(), bool(session_present)))
        on_connect(client, session_present, rc, properties)

    device.client.on_connect = noted


@dataclass(frozen=True)
class FleetRun:
    stats: FleetStats
    devices: list[SimulatedDevice]
    log: MessageLog

    def published(self, kind: str) -> set[tuple[str, int]]:
        """Every (device id, seq) of ``kind`` the devices produced."""
        return {(d.device_id, seq) for d in self.devices for k, seq in d.sent if k == kind}


@dataclass
class RecordedFleet:
    """A simulated fleet running in a thread of its own while the test injects faults."""

    thread: threading.Thread
    publishing: threading.Event = field(default_factory=threading.Event)
    outcome: list[FleetRun] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def wait(self, timeout: float) -> FleetRun:
        self.thread.join(timeout)
        if self.errors:
            raise self.errors[0]
        assert self.outcome, f"the simulated fleet did not finish within {timeout:.0f}s"
        return self.outcome[0]


async def _run(
    settings: Settings,
    creds: Sequence[DeviceCredentials],
    rate: float,
    messages: int,
    drain_timeout: float,
    publishing: threading.Event,
) -> FleetRun:
    stats, log = FleetStats(devices=len(creds)), MessageLog()
    rng = random.Random(11)
    devices = [
        SimulatedDevice(c, settings, stats, random.Random(rng.random()), load_seq(c)) for c in creds
    ]
    for device in devices:
        _record(device, log)
    gate = asyncio.Semaphore(16)  # TLS handshakes cost CPU on a shared 2-core machine

    async def connect(device: SimulatedDevice) -> bool:
        async with gate:
            return await device.connect()

    connected = await asyncio.gather(*(connect(d) for d in devices))
    assert all(connected), f"{connected.count(False)} devices could not connect"
    stats.started_at = time.monotonic()
    publishing.set()
    until = stats.started_at + 3600  # bounded by the message count, not by time
    await asyncio.gather(*(d.run(rate, until, messages) for d in devices))
    await asyncio.gather(*(d.drain(drain_timeout) for d in devices))
    # Everything is acknowledged by now: a TLS error while disconnecting (the broker still
    # writing after the close_notify, seen once) changes nothing that was published.
    await asyncio.gather(*(d.close() for d in devices), return_exceptions=True)
    for device in devices:
        save_seq(device.creds, device.seq)
    return FleetRun(stats, devices, log)


def start_recorded_fleet(
    settings: Settings,
    creds: Sequence[DeviceCredentials],
    rate: float,
    messages: int,
    drain_timeout: float = 240.0,
) -> RecordedFleet:
    """Start ``creds`` publishing ``messages`` telemetry each at ``rate`` per second each."""
    fleet = RecordedFleet(threading.Thread(target=lambda: None))

    def main() -> None:
        try:
            fleet.outcome.append(
                asyncio.run(_run(settings, creds, rate, messages, drain_timeout, fleet.publishing))
            )
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            fleet.errors.append(exc)
            fleet.publishing.set()

    fleet.thread = threading.Thread(target=main, name="recorded-fleet", daemon=True)
    fleet.thread.start()
    return fleet


# --------------------------------------------------------------------------- the warehouse


def query(settings: Settings, sql: str, params: dict[str, str] | None = None) -> list[list[Any]]:
    """Rows of a read through the cold worker's query server, over the ClickHouse HTTP
    protocol as any client, with the platform's secret (OSError if it does not answer).

    The server reads with FINAL applied (``final = 1``), as every analyst query does.
    """
    try:
        client = clickhouse_connect.get_client(
            host=settings.host,
            port=settings.query_port,
            username="fleet-faults",
            password=read_platform_secret(settings.run_dir) or "",
            connect_timeout=5,
            send_receive_timeout=30,
            autogenerate_session_id=False,
        )
        try:
            return [list(row) for row in client.query(sql, parameters=params or {}).result_rows]
        finally:
            client.close()
    except ClickHouseError as exc:
        raise OSError(f"query server: {str(exc)[:300]}") from exc


@dataclass(frozen=True)
class TableCount:
    rows: int  # count(), read with FINAL (the query server's final = 1)
    distinct: int  # uniqExact(device_id, seq): the same with or without FINAL
    keys: frozenset[tuple[str, int]]


def count_table(settings: Settings, kind: str, prefix: str) -> TableCount:
    """What the warehouse holds of one run (its devices' ids start with ``prefix``)."""
    table = TABLES[kind]
    where = "WHERE startsWith(device_id, {p:String})"
    params = {"p": prefix}
    ((rows, distinct),) = query(
        settings, f"SELECT count(), uniqExact(device_id, seq) FROM {table} {where}", params
    )
    keys = query(settings, f"SELECT DISTINCT device_id, seq FROM {table} {where}", params)
    return TableCount(int(rows), int(distinct), frozenset((r[0], int(r[1])) for r in keys))


def stored_since(settings: Settings, prefix: str, since: float) -> int:
    """Telemetry of the run with a device time after ``since`` (epoch s) that is stored."""
    sql = (
        "SELECT count() FROM telemetry WHERE startsWith(device_id, {p:String}) "
        "AND ts > fromUnixTimestamp64Milli({t:Int64})"
    )
    ((count,),) = query(settings, sql, {"p": prefix, "t": str(int(since * 1000))})
    return int(count)


def settled_counts(
    settings: Settings, prefix: str, expected: dict[str, int], timeout: float, still_s: float = 15.0
) -> dict[str, TableCount]:
    """Counts once every kind reached its expected size, or stopped growing for ``still_s``
    (something was lost), or the deadline passed; then once more a batch interval later, so a
    late duplicate would show."""
    deadline = time.monotonic() + timeout
    last: tuple[int, ...] = ()
    changed = time.monotonic()
    while time.monotonic() < deadline:
        try:
            counts = {kind: count_table(settings, kind, prefix) for kind in KINDS}
        except OSError:
            counts = {}
        if counts and all(counts[k].distinct >= expected[k] for k in KINDS):
            break
        now = tuple(c.distinct for c in counts.values())
        if now != last:
            last, changed = now, time.monotonic()
        elif counts and time.monotonic() - changed > still_s:
            break
        time.sleep(1.0)
    time.sleep(settings.sink_batch_seconds + 1.0)
    return {kind: count_table(settings, kind, prefix) for kind in KINDS}


# --------------------------------------------------------------------------- faults


@dataclass(frozen=True)
class Injected:
    service: str
    signal: str
    pid: int
    at: float  # wall clock, just before the signal was sent


def inject(service: Service, signum: signal.Signals) -> Injected:
    """Send ``signum`` to the running process of ``service`` (and do not restart it)."""
    proc = service.process()
    assert proc is not None, f"{service.name} is not running before the fault"
    at = time.time()
    proc.send_signal(signum)
    return Injected(service.name, signum.name, proc.pid, at)


def gone(service: Service, injected: Injected, timeout: float) -> bool:
    """Whether the signalled process exited within ``timeout`` (a SIGTERM'd one may linger)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = service.process()
        if proc is None or proc.pid != injected.pid:
            return True
        time.sleep(0.1)
    return False


def all_up(stack: Stack) -> bool:
    """What `fleet status` says: every service's state is "up"."""
    return all(s.status().state == "up" for s in stack.services)


@dataclass
class Recovery:
    """How the stack came back from one fault, in seconds after it."""

    status_up_s: float | None = None  # every service up again (`fleet status`)
    stores_again_s: float | None = None  # a probe message made after the process left is stored
    restarted_s: float | None = None  # the signalled service runs again (a new pid)
    human: bool = False  # nothing came back by itself: the test ran `fleet up`

    @property
    def recovered_s(self) -> float | None:
        if self.status_up_s is None or self.stores_again_s is None:
            return None
        return max(self.status_up_s, self.stores_again_s)


@dataclass
class Probe:
    """A device of its own that publishes one telemetry message a second while the test waits
    for recovery: "the pipeline stores again" is the first of them in the warehouse, a message
    made after the fault whatever the fleet's stream is doing by then."""

    settings: Settings
    creds: DeviceCredentials
    session: MqttSession | None = None
    seq: int = 0
    last_at: float = 0.0

    def tick(self) -> None:
        now = time.monotonic()
        if now - self.last_at < 1.0:
            return
        self.last_at = now
        if self.session is not None and self.session.disconnected.is_set():
            self.close()
        if self.session is None:
            self.session = connect(
                self.settings, self.creds.cert_path, self.creds.key_path, "probe", timeout=2
            )
            if self.session is None:
                return  # the broker is away: try again next second
        self.seq += 1
        reading = {"temperature": 20.0, "humidity": 50.0, "battery": 90.0, "vibration_rms": 0.1}
        topic, payload = build_message(
            self.creds.device_id, TELEMETRY, self.seq, int(time.time() * 1000), reading
        )
        self.session.client.publish(topic, payload, qos=1)  # not awaited: the poll decides

    def stored(self) -> bool:
        sql = "SELECT count() FROM telemetry WHERE device_id = {d:String}"
        ((count,),) = query(self.settings, sql, {"d": self.creds.device_id})
        return int(count) > 0

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None


def watch_recovery(
    stack: Stack,
    settings: Settings,
    target: Service,
    injected: Injected,
    probe: Probe,
    timeout: float,
    need_status_up: bool = True,
) -> Recovery:
    """Poll until every service is up (unless not ``need_status_up``: a broker of three
    stays down) and the pipeline stores new messages, or the deadline."""
    recovery = Recovery()
    deadline = time.monotonic() + timeout

    def done() -> bool:
        if need_status_up:
            return recovery.recovered_s is not None
        return recovery.stores_again_s is not None

    # The process must have left (or been replaced) before "up" means "came back"; and a
    # message made before it left (a SIGTERM'd broker still takes some) proves nothing.
    gone(target, injected, min(timeout, 30.0))
    while time.monotonic() < deadline and not done():
        elapsed = time.time() - injected.at
        proc = target.process()
        if recovery.restarted_s is None and proc is not None and proc.pid != injected.pid:
            recovery.restarted_s = elapsed
        if recovery.status_up_s is None and all_up(stack):
            recovery.status_up_s = time.time() - injected.at
        if recovery.stores_again_s is None:
            probe.tick()
            try:
                if probe.stored():
                    recovery.stores_again_s = time.time() - injected.at
            except OSError:
                pass  # the query server is the cold worker's: down with it
        time.sleep(0.25)
    probe.close()
    return recovery


def snapshot_time(mosquitto_data: Path) -> float | None:
    """When Mosquitto last wrote its persistence file (its autosave), or None if never."""
    try:
        return (mosquitto_data / "mosquitto.db").stat().st_mtime
    except OSError:
        return None


@dataclass(frozen=True)
class LossBound:
    """What a broker SIGKILL may lose: messages it acknowledged after its last save, and the
    in-flight messages of devices whose session it had not saved (Session Present 0)."""

    acked_after_save: frozenset[Key]
    discarded_unsaved: frozenset[Key]

    @property
    def keys(self) -> frozenset[Key]:
        return self.acked_after_save | self.discarded_unsaved


def mosquitto_loss_bound(log: MessageLog, saved_at: float | None, killed_at: float) -> LossBound:
    """The messages a SIGKILL of the broker at ``killed_at`` may lose, given its last save."""
    since = saved_at if saved_at is not None else float("-inf")
    acked = frozenset(k for k, t in log.acked.items() if since < t <= killed_at)
    # A session is saved by the first autosave after its CONNECT: before it, none.
    first_connect: dict[str, float] = {}
    for device_id, at, _present in log.connects:
        first_connect.setdefault(device_id, at)
    unsaved = {d for d, at in first_connect.items() if at > since}
    discarded = frozenset(k for k in log.discarded if k[1] in unsaved)
    return LossBound(acked, discarded)


def missing(
    published: Iterable[tuple[str, int]], stored: frozenset[tuple[str, int]]
) -> list[tuple[str, int]]:
    return sorted(set(published) - stored)


@dataclass
class CaseResult:
    """One fault's figures, as the test prints them (and README's Reliability table uses)."""

    fault: str
    published: dict[str, int] = field(default_factory=dict)
    stored_rows: dict[str, int] = field(default_factory=dict)
    stored_distinct: dict[str, int] = field(default_factory=dict)
    lost: dict[str, int] = field(default_factory=dict)
    loss_bound: int | None = None
    recovery: Recovery = field(default_factory=Recovery)
    restarts: int = 0  # by the supervisor, as `fleet status --json` counts them
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        data = dict(self.__dict__)
        data["recovery"] = {
            **self.recovery.__dict__,
            "recovered_s": self.recovery.recovered_s,
        }
        return json.dumps(data, default=str, sort_keys=True)


def write_result(path: Path, result: CaseResult) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as out:
        out.write(result.to_json() + "\n")


def log_lines(
    path: Path, since_bytes: int, pattern: Callable[[str], bool], limit: int = 5
) -> list[str]:
    """Lines of a service log written after offset ``since_bytes`` that ``pattern`` selects."""
    try:
        with path.open("rb") as log:
            log.seek(since_bytes)
            text = log.read().decode("utf-8", "replace")
    except OSError:
        return []
    return [line[:300] for line in text.splitlines() if pattern(line)][-limit:]
