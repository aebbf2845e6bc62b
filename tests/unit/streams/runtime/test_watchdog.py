"""The process deadline for calls that ignore their own timeout (streams/runtime/watchdog.py)."""

from __future__ import annotations

import faulthandler
import subprocess
import sys
import time

import pytest

from streams.runtime.watchdog import Watchdog

STUCK_CALL = """
import time
from streams.runtime.watchdog import Watchdog

def send_offsets():
    time.sleep(60)  # librdkafka's send_offsets_to_transaction, waiting for a lost coordinator

watchdog = Watchdog()
watchdog.arm({outer})
with watchdog.within(0.2):
    pass  # returns in time: the outer deadline is armed again
with watchdog.within({inner}):
    send_offsets()
"""


def run(outer: float, inner: float) -> subprocess.CompletedProcess[str]:
    code = STUCK_CALL.format(outer=outer, inner=inner)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(("outer", "inner"), [(120.0, 0.5), (0.5, 120.0)])
def test_a_call_past_the_nearer_deadline_ends_the_process_with_its_stack(
    outer: float, inner: float
) -> None:
    done = run(outer, inner)
    assert done.returncode != 0
    assert "in send_offsets" in done.stderr, done.stderr


def test_arming_again_within_the_slack_keeps_the_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    armed: list[float] = []
    monkeypatch.setattr(faulthandler, "dump_traceback_later", lambda t, exit: armed.append(t))
    monkeypatch.setattr(faulthandler, "cancel_dump_traceback_later", lambda: None)
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    watchdog = Watchdog()
    watchdog.arm(180.0)
    clock[0] += 0.5  # the next batch, half a second later: the timer stays
    watchdog.arm(180.0)
    clock[0] += 1.0  # past the slack: armed again
    watchdog.arm(180.0)
    watchdog.arm(10.0)  # a nearer deadline is always armed
    assert armed == [180.0, 180.0, 10.0]
