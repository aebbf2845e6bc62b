"""A platform process's life around its worker: logging, SIGTERM/SIGINT as a stop request,
then the worker's `run(stopping)`. The composition root (infra/process.py) reads the settings,
builds the worker from its small config, and hands it here."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from prometheus_client.core import Metric


class Runnable(Protocol):
    counters: Any

    def run(self, stopping: threading.Event) -> None: ...

    def metrics(self) -> Iterable[Metric]:
        """Its counters as Prometheus metric families (streams/runtime/metrics.py)."""
        ...


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")


def run_until_stopped(name: str, build: Callable[[], Runnable]) -> None:
    """Build the worker, run it until SIGTERM or SIGINT, log what it counted."""
    log = logging.getLogger(f"fleetstream.{name}")
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    worker = build()
    log.info("%s up", name)
    worker.run(stopping)
    log.info("%s stopped: %s", name, worker.counters)
