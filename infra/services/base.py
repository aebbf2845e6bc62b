"""Starting, watching and stopping one background service process.

A service is started detached (its own session, so a Ctrl-C of `fleet up` does not take it
down), its pid and start time are written to a pid file, and `stop` signals only a process whose
pid *and* start time still match: a recycled pid is never killed.

Starting and stopping a service hold its lock file (`<name>.lock`), so `fleet up`, a test and
the supervisor (infra/supervisor.py) never start it twice, and the supervisor never restarts
what `stop` is stopping. A pid file whose process is gone means "crashed" (the supervisor
starts it again); no pid file means "not wanted" (never started, or stopped on purpose).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

log = logging.getLogger(__name__)


class ServiceError(RuntimeError):
    """A service could not be started or stopped; the message says what to do."""


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    # "up" (answers), "starting" (alive, not answering), "down", "backoff" (crashed again
    # soon after a restart: the supervisor waits before the next one)
    state: str
    host: str
    port: int
    pid: int | None
    version: str | None
    restarts: int = 0  # by the supervisor, since it started
    metrics_port: int | None = None  # where it serves Prometheus metrics (infra/metrics.py)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def start_ticks(pid: int) -> int | None:
    """When a process started, in clock ticks since boot (/proc/<pid>/stat field 22).

    Its identity, with the pid: fixed for the process's life. psutil's `create_time()` adds the
    boot time from /proc/stat, a whole second that moves when the wall clock is adjusted, so two
    readings of one process can differ by a second (it did on the CI machine, and every live
    service looked dead)."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[19])


def _stat_fields(pid: int) -> list[bytes] | None:
    """/proc/<pid>/stat from field 3 (the state) on, or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count fields after its ')'.
    return stat[stat.rindex(b")") + 2 :].split()


@dataclass(frozen=True)
class PidRecord:
    pid: int
    start_ticks: int  # identity (see start_ticks)
    create_time: float  # wall clock, for uptimes only

    @classmethod
    def of(cls, pid: int) -> PidRecord:
        ticks = start_ticks(pid)
        if ticks is None:
            raise psutil.NoSuchProcess(pid)
        return cls(pid=pid, start_ticks=ticks, create_time=psutil.Process(pid).create_time())

    @classmethod
    def read(cls, path: Path) -> PidRecord | None:
        try:
            data = json.loads(path.read_text())
            return cls(
                pid=int(data["pid"]),
                start_ticks=int(data["start_ticks"]),
                create_time=float(data["create_time"]),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    def alive(self) -> bool:
        """The process this record names runs: not exited, not a zombie, its pid not reused.
        One read of /proc (the supervisor asks this of every service every second)."""
        fields = _stat_fields(self.pid)
        return fields is not None and fields[0] != b"Z" and int(fields[19]) == self.start_ticks

    def process(self) -> psutil.Process | None:
        """The live process this record names, or None if it exited or the pid was reused."""
        if not self.alive():
            return None
        try:
            return psutil.Process(self.pid)
        except psutil.Error:
            return None


def port_answers(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def port_holder(host: str, port: int) -> str:
    """Who listens on a port, for the 'port taken' error (best effort)."""
    try:
        for conn in psutil.net_connections(kind="tcp"):
            laddr = conn.laddr
            listening = conn.status == psutil.CONN_LISTEN and isinstance(laddr, tuple) and laddr
            if listening and getattr(laddr, "port", None) == port and conn.pid:
                proc = psutil.Process(conn.pid)
                return f"pid {conn.pid} ({' '.join(proc.cmdline())[:120]})"
    except psutil.Error:
        pass
    return "another process"


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.25) -> bool:
    """Poll a predicate until it holds or the deadline passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Service(ABC):
    """A process `fleet up` starts: subclasses say how to prepare, run and probe it."""

    name: str
    host: str
    port: int
    # Where the process serves /metrics (0: it does not); the stack assigns it
    # (infra/metrics.py) and hands it to the process as FLEET_PROCESS_METRICS_PORT.
    metrics_port: int = 0
    # What the last `launch` spawned (None: it found the service running). Tells a failed
    # start from an older process ending while `up` waits on it.
    spawned_pid: int | None = None

    def __init__(self, name: str, host: str, port: int, run_dir: Path) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.run_dir = run_dir

    # --- what a subclass provides ------------------------------------------------------

    @abstractmethod
    def command(self) -> Sequence[str]:
        """The argv that runs the service in the foreground."""

    def environment(self) -> Mapping[str, str]:
        return {}

    def prepare(self) -> None:
        """Write config, format storage: whatever must exist before the first start."""

    def ready(self) -> bool:
        """True when the service answers its clients (not merely listens)."""
        return port_answers(self.host, self.port)

    def version(self) -> str | None:
        return None

    def extra_ports(self) -> Sequence[int]:
        """Other ports the service binds, checked for conflicts before start."""
        return ()

    # --- process handling --------------------------------------------------------------

    @property
    def pid_path(self) -> Path:
        return self.run_dir / f"{self.name}.pid"

    @property
    def log_path(self) -> Path:
        return self.run_dir / f"{self.name}.log"

    def process(self) -> psutil.Process | None:
        record = PidRecord.read(self.pid_path)
        return record.process() if record else None

    def status(self) -> ServiceStatus:
        proc = self.process()
        state = "down" if proc is None else "up" if self.ready() else "starting"
        return ServiceStatus(
            name=self.name,
            state=state,
            host=self.host,
            port=self.port,
            pid=proc.pid if proc else None,
            version=self.version(),
            metrics_port=self.metrics_port or None,
        )

    def start(self, timeout: float) -> None:
        """Start the service unless it already runs, and return once it answers."""
        self.launch()
        self.wait_ready(timeout)

    @contextmanager
    def lock(self, blocking: bool = True) -> Iterator[bool]:
        """Hold this service's start/stop lock; yields False if `blocking` is off and another
        process holds it. An flock: released by the kernel if its holder dies."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with (self.run_dir / f"{self.name}.lock").open("a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def wanted(self) -> bool:
        """Started and not stopped on purpose: its pid file is there (alive or not)."""
        return self.pid_path.exists()

    def launch(self) -> None:
        """Spawn the service unless it already runs; do not wait for it."""
        with self.lock():
            self.launch_locked()

    def launch_locked(self) -> None:
        """`launch`, for a caller that holds the lock already."""
        if self.process() is not None:
            self.spawned_pid = None
            return
        self._check_ports_free()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.prepare()
        self._spawn()

    def bound_ports(self) -> Sequence[int]:
        """Ports this service listens on, checked for conflicts before it starts."""
        return (self.port, *self.extra_ports())

    def _check_ports_free(self) -> None:
        for port in self.bound_ports():
            if port_answers(self.host, port, timeout=0.2):
                raise ServiceError(
                    f"{self.name}: port {port} on {self.host} is taken by "
                    f"{port_holder(self.host, port)}; stop it or move the service with a "
                    f"FLEET_*_PORT variable ({self._pid_file_says()})"
                )

    def _pid_file_says(self) -> str:
        """What the pid file names, beside what that pid is now: for a 'port taken' error
        about a process the pid file should have named."""
        record = PidRecord.read(self.pid_path)
        if record is None:
            return "no pid file"
        return (
            f"pid file: pid {record.pid} started at tick {record.start_ticks}; "
            f"that pid now: {start_ticks(record.pid)}"
        )

    def _spawn(self) -> None:
        env = {
            **os.environ,
            **self.environment(),
            # Always set: a process started by one that serves metrics must not take its port.
            "FLEET_PROCESS_METRICS_PORT": str(self.metrics_port),
        }
        with self.log_path.open("ab") as log:
            try:
                popen = subprocess.Popen(
                    list(self.command()),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    start_new_session=True,
                    cwd=self.run_dir,
                )
            except FileNotFoundError as exc:
                raise ServiceError(
                    f"{self.name}: cannot run {exc.filename}: not installed"
                ) from exc
        PidRecord.of(popen.pid).write(self.pid_path)
        self.spawned_pid = popen.pid

    def wait_ready(self, timeout: float) -> None:
        """Return once the service answers. A process this object did not start that ends
        meanwhile (a job's watchdog ending a call stuck on a lost broker) is started again,
        as the supervisor would; one this object started that ends is a failed start."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process() is None:
                if self.spawned_pid is None and self.wanted():
                    log.warning("%s ended while `up` waited on it; starting it again", self.name)
                    self.launch()
                    continue
                raise ServiceError(
                    f"{self.name} exited while starting; last lines of {self.log_path}:\n"
                    f"{log_tail(self.log_path)}"
                )
            if self.ready():
                return
            time.sleep(0.25)
        raise ServiceError(
            f"{self.name} did not answer on {self.host}:{self.port} within {timeout:.0f}s; "
            f"see {self.log_path}:\n{log_tail(self.log_path)}"
        )

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop exactly the process this service started; True if one was running. Holds the
        lock throughout, so the supervisor does not restart it meanwhile."""
        with self.lock():
            return self._stop_locked(timeout)

    def _stop_locked(self, timeout: float) -> bool:
        proc = self.process()
        if proc is None:
            self.pid_path.unlink(missing_ok=True)
            return False
        proc.send_signal(signal.SIGTERM)
        if not self._wait_gone(timeout):
            proc.kill()
            self._wait_gone(30)
        self.pid_path.unlink(missing_ok=True)
        return True

    def _wait_gone(self, timeout: float) -> bool:
        """Until the process is gone and its ports are free.

        Poll rather than wait(): a service whose parent is gone may linger as a zombie until
        something reaps it, and a zombie has stopped. But a many-threaded process can show as
        a zombie while its other threads still hold its sockets, so the ports are checked too.
        """
        return wait_until(
            lambda: (
                self.process() is None
                and not any(port_answers(self.host, port, 0.2) for port in self.bound_ports())
            ),
            timeout,
        )

    def terminate(self) -> None:
        """SIGTERM without waiting (to stop several services at once)."""
        proc = self.process()
        if proc is not None:
            proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL, for crash tests: no clean shutdown. The pid file stays (a crash), so the
        supervisor starts it again; returns once this process is gone and its ports are free
        or a new process already replaced it."""
        record = PidRecord.read(self.pid_path)
        proc = record.process() if record else None
        if record is None or proc is None:
            return
        proc.kill()
        wait_until(
            lambda: (
                record.process() is None
                and (
                    PidRecord.read(self.pid_path) != record
                    or not any(port_answers(self.host, port, 0.2) for port in self.bound_ports())
                )
            ),
            30,
        )

    def signal(self, signum: int) -> None:
        proc = self.process()
        if proc is None:
            raise ServiceError(f"{self.name} is not running")
        proc.send_signal(signum)
