"""`python -m streams.worker`: the cold-path worker (run by `fleet up`).

It owns the embedded chDB folder, so it also answers `fleet sql` on the query port. SIGTERM
finishes the batch in hand (stored and committed), then exits.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading

from infra.settings import Settings, load_settings
from sinks.clickhouse import SinkUnavailable
from streams.cold.loader import ColdWorker
from streams.query_access import serve_warehouse_queries
from streams.runtime.transactions import Backoff

log = logging.getLogger("fleetstream.worker")


def apply_schema(worker: ColdWorker, stopping: threading.Event) -> bool:
    """Versioned DDL, applied once the warehouse answers: it may be down, or the embedded
    folder held by another process for a while. Waits with back-off (reporting why in the
    status file) rather than giving up: what waits in Kafka is loaded once it is back.
    Returns False if asked to stop first."""
    for delay in Backoff(first=0.5, longest=5.0).delays():
        try:
            worker.sink.ensure_schema()
            return True
        except SinkUnavailable as exc:
            worker.counters.retries += 1
            worker.write_status(ready=False, waiting_for=str(exc))
            log.warning("warehouse unavailable (%s); retrying in %.1fs", exc, delay)
            if stopping.wait(delay):
                return False
    return False


async def serve(settings: Settings) -> None:
    worker = ColdWorker(settings)
    halt = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: halt.set())
    if not apply_schema(worker, halt):
        worker.close()
        return
    server = serve_warehouse_queries(settings)
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
