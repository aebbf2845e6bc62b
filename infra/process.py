"""The `main()` of a platform process (`python -m ...` run by `fleet up`): logging, settings,
SIGTERM/SIGINT as a stop request, then the worker's `run(stopping)`."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from typing import Any, Protocol

from infra.settings import Settings, load_settings


class Runnable(Protocol):
    counters: Any

    def run(self, stopping: threading.Event) -> None: ...


def process_main(name: str, build: Callable[[Settings], Runnable]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    log = logging.getLogger(f"fleetstream.{name}")
    settings = load_settings()
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    worker = build(settings)
    log.info("%s up", name)
    worker.run(stopping)
    log.info("%s stopped: %s", name, worker.counters)
