"""`python -m streams.worker`: the cold-path worker (run by `fleet up`).

It owns the embedded chDB folder, so it also answers `fleet sql` on the query port. SIGTERM
finishes the batch in hand (stored and committed), then exits.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

from infra.settings import Settings, load_settings
from sinks.clickhouse import SinkUnavailable
from sinks.query_server import start_query_server
from streams.app import ColdWorker

log = logging.getLogger("fleetstream.worker")


def apply_schema(worker: ColdWorker, timeout_s: float = 60.0) -> None:
    """Versioned DDL, applied once; the folder may be held a moment by a direct `fleet sql`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            worker.sink.ensure_schema()
            return
        except SinkUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


async def serve(settings: Settings) -> None:
    worker = ColdWorker(settings)
    apply_schema(worker)
    server = start_query_server(worker.sink, settings.host, settings.query_port)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    log.info("cold-path worker up; queries on %s:%d", settings.host, settings.query_port)
    try:
        await worker.run(stopping)
    finally:
        server.close()
        worker.close()
        log.info("cold-path worker stopped: %s", worker.counters)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = load_settings()
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
