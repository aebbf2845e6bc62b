"""The batch loop every transactional stream job runs: start, then one batch per step, with
recovery from transient Kafka errors (abort what is open, rewind to the last commit, back off,
go on) and its status written about once a second. A fatal error ends the process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

from streams.runtime.transactions import Backoff, is_transient
from streams.runtime.watchdog import Watchdog

log = logging.getLogger("fleetstream.transactions")


class BatchLoop:
    """A stream worker's life: `start()`, then `step()` (one batch, one transaction) until
    asked to stop, its status written about once a second, `close()` at the end.

    A transient Kafka error out of `start` or `step` does not end it: `recover()` (abort what
    is open, rewind state and positions to the last commit) runs after a back-off, until it
    succeeds; then the loop goes on (a failed start is tried again). Failures in a row back
    off longer, up to `backoff.longest`. A fatal error ends the process (the supervisor
    starts it again; the new one fences nothing but its own dead predecessor)."""

    backoff = Backoff(first=0.2, longest=5.0)
    # A step, start or recovery that has not returned after this long is stuck (a Kafka call
    # that ignores its timeout): the process dumps every thread's stack to its log and exits,
    # and the supervisor starts a new one. Below the consumer's max.poll.interval.ms (300 s).
    stall_limit_s = 180.0

    @cached_property
    def watchdog(self) -> Watchdog:
        return Watchdog()

    def start(self) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    def recover(self) -> None:
        """After a transient failure: abort what is open, rewind to the last commit."""
        raise NotImplementedError

    def write_status(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def on_transient(self, exc: BaseException) -> None:
        """A transient failure was met (a subclass counts it in its status)."""

    def run(self, stopping: threading.Event) -> None:
        failures = FailureStreak(self.backoff)
        try:
            if not self._until_done(self.start, stopping, failures, again=True):
                return
            reported_at = 0.0
            while not stopping.is_set():
                if not self._until_done(self.step, stopping, failures, again=False):
                    break
                if time.monotonic() - reported_at > 1.0:
                    self.write_status()
                    reported_at = time.monotonic()
        finally:
            self.watchdog.cancel()
            self.close()

    def _watch(self) -> None:
        """(Re)arm the stall watchdog for the next action."""
        self.watchdog.arm(self.stall_limit_s)

    def _until_done(
        self,
        action: Callable[[], None],
        stopping: threading.Event,
        failures: FailureStreak,
        again: bool,
    ) -> bool:
        """Run `action`; after a transient error, recover (backing off) and, if `again`, run
        it again until it succeeds. False if asked to stop meanwhile."""
        while True:
            try:
                self._watch()
                action()
                failures.reset()
                return True
            except Exception as exc:
                if not is_transient(exc):
                    raise
                self.on_transient(exc)
                log.warning("%s: transient Kafka error (%s); recovering", type(self).__name__, exc)
            while True:
                if stopping.wait(failures.next_delay()):
                    return False
                try:
                    self._watch()
                    self.recover()
                    break
                except Exception as exc:
                    if not is_transient(exc):
                        raise
                    self.on_transient(exc)
                    log.warning("recovery failed (%s); retrying", exc)
            if not again:
                return True  # rewound: the next step re-reads from the last commit


@dataclass
class FailureStreak:
    """Failures in a row and the back-off they earn: first, 2x, 4x ... up to longest."""

    backoff: Backoff
    count: int = 0

    def next_delay(self) -> float:
        delay = min(self.backoff.first * 2.0**self.count, self.backoff.longest)
        self.count += 1
        return delay

    def reset(self) -> None:
        self.count = 0
