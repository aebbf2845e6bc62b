"""Plain configuration of the jobs app, built by the composition root (infra) from its settings.

Nothing here reads the platform's Settings: the caller passes what a job worker needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class TopicDecl:
    """One topic of the platform's catalogue as a job sees it."""

    name: str
    partitions: int
    schema: str | None = None  # the .avsc stem of an Avro value (schemas/avro/), else None


@dataclass(frozen=True)
class JobsConfig:
    job: str  # the job's name: its Faust app id and consumer group
    brokers: tuple[str, ...]  # host:port
    registry_url: str
    state_dir: Path  # this job's own directory (Faust's datadir: tables' local state)
    partitions: int  # default partition count of topics a job creates
    replication_factor: int
    web_port: int | None = None  # None: no web view
    topics: tuple[TopicDecl, ...] = field(default_factory=tuple)

    def dlq_topic(self) -> str:
        return f"dlq.jobs.{self.job}"
