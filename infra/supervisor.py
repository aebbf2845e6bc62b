"""The supervisor: restarts any process `fleet up` started that died, as systemd's
Restart=always would, with bounded back-off for one that keeps crashing.

`python -m infra.supervisor` runs in the background (started last by `fleet up`, stopped first
by `fleet down`). Twice a second it looks at every service of the stack: a service whose pid
file is there but whose process is gone crashed (or was killed), and is started again with
the service's own `launch` (its prepare step, port checks and pid file, as `fleet up` does).
A service stopped on purpose has no pid file and is left alone; starting and stopping hold the
service's lock, so the supervisor never races `fleet up`, `fleet down` or a test.

Back-off: a service that ran at least STABLE_S before it died is started again at once; one
that dies again sooner waits 1 s, 2 s, 4 s ... up to LONGEST_DELAY_S (state "backoff" in
`fleet status`). Restart counts are written to `<run dir>/supervisor.json`, which `fleet
status` shows.

Why the platform's own and not supervisord: every service already knows how to prepare
itself (format Kafka's storage, write Mosquitto's config, refresh the CRL), check its ports,
record a pid with its start time and say when it is ready; supervisord would have to become
the parent of every process, so `fleet up`, the per-service start/stop used by tests and the
pid-file contract would all be rewritten around its RPC, for one loop of about a hundred lines.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from prometheus_client.core import Metric

from infra.metrics import serve_process_metrics
from infra.services.base import PidRecord, Service, ServiceError
from infra.settings import Settings, load_settings, settings_env
from streams.runtime.metrics import labelled_counter
from streams.runtime.status import read_status, write_status

log = logging.getLogger("fleetstream.supervisor")

TICK_S = 1.0  # a dead process is seen within a second (idle: each tick reads every pid file)
STABLE_S = 10.0  # a process that ran this long before dying is restarted at once
FIRST_DELAY_S = 1.0
LONGEST_DELAY_S = 30.0
HEARTBEAT_S = 5.0  # a status file older than this: the supervisor is not watching


def restart_delay(crashes_in_a_row: int) -> float:
    """Pure: how long to wait before the next start of a service that crashed
    `crashes_in_a_row` times, each soon after its start (1 = after a stable run)."""
    if crashes_in_a_row <= 1:
        return 0.0
    return min(FIRST_DELAY_S * 2.0 ** (crashes_in_a_row - 2), LONGEST_DELAY_S)


@dataclass
class Watch:
    """What the supervisor knows of one service."""

    restarts: int = 0
    crashes_in_a_row: int = 0
    started_at: float | None = None  # wall clock of the process it last saw or started
    next_attempt: float = 0.0  # wall clock; 0 = no restart pending
    last_error: str = ""

    def on_death(self, now: float) -> None:
        """The process is gone: schedule the restart the back-off allows."""
        ran_for = now - self.started_at if self.started_at is not None else STABLE_S
        self.crashes_in_a_row = 1 if ran_for >= STABLE_S else self.crashes_in_a_row + 1
        self.next_attempt = now + restart_delay(self.crashes_in_a_row)

    def state(self, now: float) -> str:
        return "backoff" if self.next_attempt > now else "watching"


class Supervisor:
    """One pass over the services per `tick`; I/O is each service's own."""

    def __init__(self, services: Sequence[Service]) -> None:
        self.services = services
        self.watches: dict[str, Watch] = {s.name: Watch() for s in services}

    def tick(self, now: float) -> None:
        for service in self.services:
            with service.lock(blocking=False) as held:
                if held:  # else a start or stop is under way: leave it to its caller
                    self._look_at(service, self.watches[service.name], now)

    def _look_at(self, service: Service, watch: Watch, now: float) -> None:
        record = PidRecord.read(service.pid_path)
        if record is None:
            watch.next_attempt = 0.0  # not wanted (stopped on purpose, or never started)
            return
        if record.alive():
            watch.started_at = record.create_time
            if watch.next_attempt == 0.0 and now - record.create_time >= STABLE_S:
                watch.crashes_in_a_row = 0
            return
        if watch.next_attempt == 0.0:
            watch.on_death(now)
            log.warning(
                "%s (pid %d) is gone; restart in %.1fs",
                service.name,
                record.pid,
                watch.next_attempt - now,
            )
        if now < watch.next_attempt:
            return
        try:
            service.launch_locked()
        except (ServiceError, OSError) as exc:
            watch.last_error = str(exc)[:300]
            watch.started_at = now
            watch.on_death(now)
            log.warning("%s did not start (%s)", service.name, exc)
            return
        watch.restarts += 1
        watch.next_attempt = 0.0
        watch.started_at = time.time()
        log.warning("%s restarted (%d restarts)", service.name, watch.restarts)

    def report(self, now: float) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "heartbeat": now,
            "services": {
                name: {
                    **asdict(watch),
                    "state": watch.state(now),
                    "retry_in_s": round(max(0.0, watch.next_attempt - now), 1),
                }
                for name, watch in self.watches.items()
            },
        }


def reap_children() -> None:
    """Collect the exit status of processes this one started and that died, so none lingers
    as a zombie (their pid files are what the supervisor watches)."""
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def status_path(run_dir: Path) -> Path:
    return run_dir / "supervisor.json"


class SupervisorService(Service):
    """The supervisor as a service of `fleet up`: no port; ready when its heartbeat is fresh."""

    def __init__(self, settings: Settings) -> None:
        super().__init__("supervisor", settings.host, 0, settings.run_dir)
        self.settings = settings

    def command(self) -> Sequence[str]:
        return [sys.executable, "-m", "infra.supervisor"]

    def environment(self) -> Mapping[str, str]:
        return settings_env(self.settings)

    def bound_ports(self) -> Sequence[int]:
        return ()

    def version(self) -> str | None:
        try:
            return version("fleetstream")
        except PackageNotFoundError:
            return None

    def report(self) -> dict[str, Any]:
        """The last report of the running supervisor, or {} if it is not running."""
        proc = self.process()
        data = read_status(status_path(self.run_dir))
        if proc is None or data.get("pid") != proc.pid:
            return {}
        return data

    def ready(self) -> bool:
        heartbeat = self.report().get("heartbeat")
        return isinstance(heartbeat, float) and time.time() - heartbeat < HEARTBEAT_S

    def restarts(self) -> dict[str, dict[str, Any]]:
        """Per service, what the supervisor last reported (also after it stopped)."""
        services = read_status(status_path(self.run_dir)).get("services")
        return services if isinstance(services, dict) else {}


def supervisor_metrics(supervisor: Supervisor) -> Iterator[Metric]:
    restarts = {name: watch.restarts for name, watch in dict(supervisor.watches).items()}
    yield labelled_counter(
        "fleetstream_supervisor_restarts",
        "Processes started again after dying",
        "service",
        restarts,
    )


def watch_forever(settings: Settings, stopping: threading.Event) -> None:
    from infra.stack import Stack  # the stack imports this module

    supervisor = Supervisor(Stack(settings).supervised)
    # No Kafka client in here: the supervisor must outlive whatever a client library does
    # when brokers die (the consumer lag is probed in the API process, which it restarts).
    serve_process_metrics(settings, lambda: supervisor_metrics(supervisor))
    path = status_path(settings.run_dir)
    # Restart counts are the stack's, not this process's: carry them over a supervisor restart.
    before = read_status(path).get("services")
    for name, watch in supervisor.watches.items():
        counted = before.get(name, {}).get("restarts") if isinstance(before, dict) else None
        if isinstance(counted, int):
            watch.restarts = counted
    while not stopping.is_set():
        now = time.time()
        supervisor.tick(now)
        reap_children()
        write_status(path, supervisor.report(time.time()))
        stopping.wait(TICK_S)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = load_settings()
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    log.info("supervisor up: watching the stack in %s", settings.state_dir)
    watch_forever(settings, stopping)
    log.info("supervisor stopped")


if __name__ == "__main__":
    main()
