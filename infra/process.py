"""The platform's stream processes, as `fleet up` starts them: `python -m infra.process <name>`,
one for every kit job of the job registry (streams/job_registry.py).

The composition root's half of a process entry: read the settings, build the small config the
worker takes (Kafka endpoints, options, paths) and hand it to the kit
(streams/runtime/process.py: logging, SIGTERM/SIGINT as a stop request, the worker's run).
A transactional job runs with the kit's default options unless `JOB_OPTIONS` takes some from
the settings; a loader needs its own main here (the cold loader serves the query port too).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from infra.keys import token_dir
from infra.metrics import serve_process_metrics
from infra.settings import Settings, load_settings
from streams.job_registry import JOBS as REGISTRY
from streams.job_registry import JobEntry, JobKind
from streams.runtime.clients import KafkaConfig
from streams.runtime.job import JobOptions, TransactionalJob
from streams.runtime.process import Runnable, configure_logging, run_until_stopped
from streams.runtime.spec import JobSpec

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


# What a transactional job takes from the settings beyond the kit's defaults (JobOptions).
JOB_OPTIONS: dict[str, Callable[[Settings], dict[str, Any]]] = {
    "hot-worker": lambda s: {
        "instance": s.hot_instance,
        "max_batch": s.hot_max_batch,
        "poll_ms": s.hot_poll_ms,
    },
    # How often rollouts check their timers (bake time, silent devices): once a second.
    "ota-controller": lambda _s: {"max_batch": 5000, "poll_ms": 50, "tick_s": 1.0},
}


def transactional_job(settings: Settings, job: JobEntry) -> TransactionalJob[Any]:
    """A transactional job of the registry on the kit's loop, with its options."""
    if not isinstance(job.spec, JobSpec):
        raise TypeError(f"{job.name} is not a transactional job")
    taken = JOB_OPTIONS[job.name](settings) if job.name in JOB_OPTIONS else {}
    options = JobOptions(status_path=settings.run_dir / f"{job.name}.json", **taken)
    return TransactionalJob(job.spec, kafka_config(settings, job.name), options)


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


# The loaders' mains (a loader serves more than its loop: the cold one, the query port).
LOADER_MAINS: dict[str, Callable[[], None]] = {"cold-worker": cold_worker_main}


def job_main(job: JobEntry) -> Callable[[], None]:
    if job.kind is JobKind.LOADER:
        return LOADER_MAINS[job.name]
    return lambda: process_main(job.name, lambda settings: transactional_job(settings, job))


# Every kit job of the registry: `python -m infra.process <name>` runs it.
JOBS: dict[str, Callable[[], None]] = {
    job.name: job_main(job) for job in REGISTRY if job.kind is not JobKind.FAUST
}


def main(argv: list[str] | None = None) -> None:
    name = (argv if argv is not None else sys.argv[1:] or [""])[0]
    if name not in JOBS:
        raise SystemExit(f"usage: python -m infra.process {'|'.join(JOBS)} (not {name!r})")
    JOBS[name]()


if __name__ == "__main__":
    main()
