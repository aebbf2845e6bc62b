"""The supervisor (infra/supervisor.py) on stand-in services (a sleeping or a crashing Python
process), and the stack's broker count taken from the state folder (issue 12, finding 3)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from infra.services.base import PidRecord, Service, ServiceError, wait_until
from infra.settings import Settings
from infra.stack import Stack
from infra.supervisor import LONGEST_DELAY_S, STABLE_S, Supervisor, restart_delay


class Sleeper(Service):
    """A process that runs until killed; or, with `crash`, exits at once."""

    def __init__(self, run_dir: Path, name: str = "sleeper", crash: bool = False) -> None:
        super().__init__(name, "127.0.0.1", 1, run_dir)
        self.crash = crash

    def command(self) -> Sequence[str]:
        code = "raise SystemExit(1)" if self.crash else "import time; time.sleep(600)"
        return [sys.executable, "-c", code]

    def bound_ports(self) -> Sequence[int]:
        return ()

    def ready(self) -> bool:
        return self.process() is not None


@pytest.fixture
def sleeper(tmp_path: Path) -> Iterator[Sleeper]:
    service = Sleeper(tmp_path)
    yield service
    service.stop(5)


def test_restart_delay_is_immediate_after_a_stable_run_then_doubles_to_a_bound() -> None:
    assert restart_delay(1) == 0.0
    assert [restart_delay(n) for n in (2, 3, 4, 5)] == [1.0, 2.0, 4.0, 8.0]
    assert restart_delay(50) == LONGEST_DELAY_S


def test_a_killed_service_is_started_again_and_counted(sleeper: Sleeper) -> None:
    sleeper.launch()
    first = PidRecord.read(sleeper.pid_path)
    supervisor = Supervisor([sleeper])
    supervisor.tick(time.time())
    assert supervisor.watches["sleeper"].restarts == 0

    sleeper.kill()
    supervisor.tick(time.time() + STABLE_S)  # it had run long enough: restarted at once
    second = PidRecord.read(sleeper.pid_path)
    assert second is not None
    assert second != first
    assert second.process() is not None
    report = supervisor.report(time.time())["services"]["sleeper"]
    assert report["restarts"] == 1
    assert report["state"] == "watching"


def test_a_service_stopped_on_purpose_is_left_alone(sleeper: Sleeper) -> None:
    sleeper.launch()
    supervisor = Supervisor([sleeper])
    supervisor.tick(time.time())
    assert sleeper.stop(5)
    supervisor.tick(time.time() + STABLE_S)
    assert sleeper.process() is None
    assert not sleeper.wanted()
    assert supervisor.watches["sleeper"].restarts == 0


def test_no_restart_while_a_stop_holds_the_lock(sleeper: Sleeper) -> None:
    sleeper.launch()
    supervisor = Supervisor([sleeper])
    with sleeper.lock():
        sleeper.kill()
        supervisor.tick(time.time() + STABLE_S)
        assert sleeper.process() is None  # the holder decides, not the supervisor
    supervisor.tick(time.time() + STABLE_S)
    assert sleeper.process() is not None


def test_up_starts_again_a_running_service_that_ends_while_up_waits(sleeper: Sleeper) -> None:
    sleeper.launch()
    before = PidRecord.read(sleeper.pid_path)
    again = Sleeper(sleeper.run_dir)  # the next `fleet up`: finds it running, spawns nothing
    again.launch()
    assert again.spawned_pid is None
    sleeper.kill()  # e.g. a job's watchdog ending a call stuck on a lost broker
    again.wait_ready(10)
    after = PidRecord.read(sleeper.pid_path)
    assert after is not None
    assert after != before
    assert after.process() is not None


class Crasher(Sleeper):
    """Exits at once, never having answered."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(run_dir, "crasher", crash=True)

    def ready(self) -> bool:
        return False


def test_a_service_that_ends_right_after_its_own_start_is_a_failed_start(tmp_path: Path) -> None:
    crasher = Crasher(tmp_path)
    crasher.launch()
    with pytest.raises(ServiceError, match="exited while starting"):
        crasher.wait_ready(10)


def test_a_service_that_keeps_crashing_backs_off_longer_each_time(tmp_path: Path) -> None:
    crasher = Sleeper(tmp_path, "crasher", crash=True)
    crasher.launch()
    assert wait_until(lambda: crasher.process() is None, 10, 0.05)
    supervisor = Supervisor([crasher])
    watch = supervisor.watches["crasher"]
    waits = []
    now = time.time()
    for _ in range(4):
        supervisor.tick(now)  # notices the death, schedules (or does) the restart
        if watch.next_attempt > now:
            waits.append(round(watch.next_attempt - now, 1))
            assert supervisor.report(now)["services"]["crasher"]["state"] == "backoff"
            now = watch.next_attempt
            supervisor.tick(now)  # the restart, once the back-off has passed
        assert wait_until(lambda: crasher.process() is None, 10, 0.05)
    assert waits == [1.0, 2.0, 4.0]
    assert watch.restarts == 4
    crasher.pid_path.unlink()


def _formatted(state_dir: Path, brokers: int) -> None:
    for i in range(brokers):
        (state_dir / "kafka" / f"kafka-{i}" / "data").mkdir(parents=True)


def test_down_and_status_act_on_the_brokers_the_state_folder_holds(tmp_path: Path) -> None:
    _formatted(tmp_path, 3)
    stack = Stack(Settings(state_dir=tmp_path))  # no FLEET_BROKERS, no --brokers
    assert [b.name for b in stack.brokers] == ["kafka-0", "kafka-1", "kafka-2"]
    assert stack.settings.bootstrap_servers.count(",") == 2
    names = [s.name for s in stack.status().services]
    assert [n for n in names if n.startswith("kafka")] == ["kafka-0", "kafka-1", "kafka-2"]


def test_an_explicit_smaller_count_still_stops_every_broker_there(tmp_path: Path) -> None:
    _formatted(tmp_path, 3)
    stack = Stack(Settings(state_dir=tmp_path, brokers=1))
    assert [b.name for b in stack.brokers] == ["kafka-0"]
    assert [b.name for b in stack.stray_brokers] == ["kafka-1", "kafka-2"]


def test_a_fresh_folder_takes_the_configured_count(tmp_path: Path) -> None:
    assert len(Stack(Settings(state_dir=tmp_path)).brokers) == 1
    assert len(Stack(Settings(state_dir=tmp_path, brokers=3)).brokers) == 3
