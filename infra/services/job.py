"""The platform's stream jobs (streams/job_registry.py) as services of `fleet up`.

One class for every job: its command, port and readiness follow from its registry entry.
A kit job runs ``python -m infra.process <name>``; a shipped Faust job runs
``python -m infra.jobs <file> --web-port N`` (what `fleet jobs run` does, so `fleet jobs list`
lists it too) and answers once its Faust web view does.
"""

from __future__ import annotations

from collections.abc import Sequence

from infra.services.base import port_answers
from infra.services.platform import PlatformProcess
from infra.settings import Settings
from sinks.doris import is_doris_dsn
from streams.job_registry import JOBS, JobEntry, JobKind, Listens


def job_port(settings: Settings, job: JobEntry) -> int:
    """The port a job's process answers on (or, listening on none, the Kafka it reads)."""
    match job.listens:
        case Listens.QUERY:
            return settings.query_port
        case Listens.JOB_WEB:
            return settings.jobs_web_port + job.index
        case _:
            return settings.kafka_port


def job_command(settings: Settings, job: JobEntry) -> tuple[str, ...]:
    """`python -m` and what follows, for a job's process."""
    if job.kind is JobKind.FAUST:
        return ("infra.jobs", str(job.file), "--web-port", str(job_port(settings, job)))
    return ("infra.process", job.name)


class JobService(PlatformProcess):
    def __init__(self, settings: Settings, job: JobEntry) -> None:
        self.job = job
        super().__init__(job.name, settings, job_port(settings, job), *job_command(settings, job))

    def bound_ports(self) -> Sequence[int]:
        return () if self.job.listens is Listens.NOTHING else (self.port,)

    def ready(self) -> bool:
        if self.job.kind is JobKind.FAUST:
            return super().ready()
        if not self.reported_by_me():
            return False
        if self.job.listens is Listens.NOTHING:
            return bool(self.counters().get("ready"))
        if self.job.listens is Listens.QUERY and is_doris_dsn(self.settings.warehouse_dsn):
            return True  # Doris is a server, reached directly: the loader serves no query port
        return port_answers(self.host, self.port)


def job_services(settings: Settings) -> dict[str, JobService]:
    """Every job of the registry, by name, in the registry's order."""
    return {job.name: JobService(settings, job) for job in JOBS}
