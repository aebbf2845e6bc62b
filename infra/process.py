"""The platform's stream processes, as `fleet up` starts them: `python -m infra.process <name>`.

The composition root's half of a process entry: read the settings, build the small config the
worker takes (Kafka endpoints, options, paths) and hand it to the kit
(streams/runtime/process.py: logging, SIGTERM/SIGINT as a stop request, the worker's run).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from infra.keys import token_dir
from infra.metrics import serve_process_metrics
from infra.settings import Settings, load_settings
from streams.runtime.clients import KafkaConfig
from streams.runtime.process import Runnable, configure_logging, run_until_stopped

if TYPE_CHECKING:
    from streams.registry.query_access import QueryPortConfig


def kafka_config(settings: Settings, client_id: str = "fleetstream") -> KafkaConfig:
    return KafkaConfig(settings.bootstrap_servers, settings.registry_url, client_id)


def query_port_config(settings: Settings) -> QueryPortConfig:
    """The cold worker's query port: where, with what limits, who may (tokens, grants)."""
    from sinks.clickhouse import ReadLimits
    from streams.registry.query_access import QueryPortConfig

    limits = ReadLimits(
        timeout_s=settings.query_timeout_s, max_memory_bytes=settings.query_max_memory_bytes
    )
    return QueryPortConfig(
        kafka=kafka_config(settings),
        host=settings.host,
        port=settings.query_port,
        warehouse_dsn=settings.warehouse_dsn,
        limits=limits,
        token_dir=token_dir(settings),
        run_dir=settings.run_dir,
    )


def process_main(name: str, build: Callable[[Settings], Runnable]) -> None:
    configure_logging()
    settings = load_settings()
    settings.run_dir.mkdir(parents=True, exist_ok=True)

    def built() -> Runnable:
        worker = build(settings)
        serve_process_metrics(settings, worker.metrics)
        return worker

    run_until_stopped(name, built)


def hot_worker(settings: Settings) -> Runnable:
    from streams.hot.job import HOT_JOB
    from streams.runtime.job import JobOptions, TransactionalJob

    options = JobOptions(
        status_path=settings.run_dir / f"{HOT_JOB.name}.json",
        instance=settings.hot_instance,
        max_batch=settings.hot_max_batch,
        poll_ms=settings.hot_poll_ms,
    )
    return TransactionalJob(HOT_JOB, kafka_config(settings, HOT_JOB.name), options)


class NoQueryPort:
    """The query port of a warehouse that is a server itself (Doris): nothing to serve."""

    def close(self) -> None:
        return None


def cold_worker_main() -> None:
    from sinks.doris import is_doris_dsn, parse_doris_dsn
    from streams.cold.loader import COLD_JOB, Closeable, serve
    from streams.runtime.loader import LoaderOptions

    configure_logging()
    settings = load_settings()
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    options = LoaderOptions(
        status_path=settings.run_dir / f"{COLD_JOB.name}.json",
        batch_rows=settings.sink_batch_rows,
        batch_seconds=settings.sink_batch_seconds,
    )

    def serve_queries() -> Closeable:
        from streams.registry.query_access import serve_warehouse_queries

        return serve_warehouse_queries(query_port_config(settings))

    where = f"{settings.host}:{settings.query_port}"
    if is_doris_dsn(settings.warehouse_dsn):
        # Doris is a server: analysts and `fleet sql` reach it over its MySQL protocol; the
        # ClickHouse-protocol query port serves an embedded chDB folder only.
        serve_queries, where = NoQueryPort, parse_doris_dsn(settings.warehouse_dsn).dsn
    kafka = kafka_config(settings, COLD_JOB.name)
    asyncio.run(
        serve(
            kafka,
            options,
            settings.warehouse_dsn,
            serve_queries,
            where,
            expose=lambda worker: serve_process_metrics(settings, worker.loader.metrics),
        )
    )


# The platform's stream jobs, one line each: `python -m infra.process <name>` runs it.
JOBS: dict[str, Callable[[], None]] = {
    "hot-worker": lambda: process_main("hot worker", hot_worker),
    "cold-worker": cold_worker_main,
}


def main(argv: list[str] | None = None) -> None:
    name = (argv if argv is not None else sys.argv[1:] or [""])[0]
    if name not in JOBS:
        raise SystemExit(f"usage: python -m infra.process {'|'.join(JOBS)} (not {name!r})")
    JOBS[name]()


if __name__ == "__main__":
    main()
