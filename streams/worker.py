"""`python -m streams.worker`: the cold-path Faust worker (run by `fleet up`)."""

from __future__ import annotations

import logging
import time

import faust

from infra.settings import load_settings
from sinks.clickhouse import SinkUnavailable
from streams.app import ColdWorker


def main() -> None:
    settings = load_settings()
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    worker = ColdWorker(settings)
    # Versioned DDL, applied once; the folder may be held a moment by a direct `fleet sql`.
    deadline = time.monotonic() + 60
    while True:
        try:
            worker.sink.ensure_schema()
            break
        except SinkUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)
    from sinks.query_server import start_query_server

    server = start_query_server(worker.sink, settings.host, settings.query_port)
    try:
        faust.Worker(worker.app, loglevel=logging.INFO).execute_from_commandline()
    finally:
        server.close()


if __name__ == "__main__":
    main()
