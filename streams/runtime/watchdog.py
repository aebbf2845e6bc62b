"""A deadline on the process: a call that has not returned by then ends it, with every
thread's stack in its log, and the supervisor starts a new one (which fences and aborts what
this one left open).

For calls that may ignore their own timeout: librdkafka's `send_offsets_to_transaction` can
wait forever for a group coordinator that a broker restart made it forget (librdkafka #5456,
#5511, open in 2.16); a job stuck in it holds its partitions and answers nothing. One
deadline is armed at a time (faulthandler has one timer per process): a shorter one for a
single call is nested in the loop's, which is re-armed with what is left of it afterwards.
"""

from __future__ import annotations

import faulthandler
import time
from collections.abc import Iterator
from contextlib import contextmanager

# Arming starts a thread (faulthandler's timer): a loop arming its deadline before every batch
# re-arms it only when that moves the deadline by more than this (or a tenth of the limit).
# A deadline may thus fire that much earlier than asked.
REARM_SLACK_S = 1.0


class Watchdog:
    def __init__(self) -> None:
        self._deadline: float | None = None

    def arm(self, limit_s: float) -> None:
        """End the process if it is not re-armed or cancelled within `limit_s`."""
        deadline = time.monotonic() + limit_s
        current = self._deadline
        if current is not None and 0 <= deadline - current < min(REARM_SLACK_S, limit_s / 10):
            return
        self._deadline = deadline
        faulthandler.dump_traceback_later(limit_s, exit=True)

    def cancel(self) -> None:
        self._deadline = None
        faulthandler.cancel_dump_traceback_later()

    @contextmanager
    def within(self, limit_s: float) -> Iterator[None]:
        """The block must return within `limit_s` (or the armed deadline, if sooner)."""
        outer = self._deadline
        if outer is not None:
            limit_s = min(limit_s, max(outer - time.monotonic(), 0.001))
        faulthandler.dump_traceback_later(limit_s, exit=True)
        try:
            yield
        finally:
            if outer is None:
                faulthandler.cancel_dump_traceback_later()
            else:
                faulthandler.dump_traceback_later(max(outer - time.monotonic(), 0.001), exit=True)
