"""The process deadline for calls that ignore their own timeout (streams/runtime/watchdog.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

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
