"""The platform's stream jobs, one line each: what `fleet up` runs, what `fleet status` shows
the consumer lag of, and what `python -m infra.process <name>` starts.

Adding a job is a file (its spec: a :class:`~streams.runtime.spec.JobSpec` on the kit, or a
Faust job file in streams/jobs/shipped/) and one line in :data:`JOBS`. The composition root
(infra/) derives the rest from these entries: the service of `fleet up` (infra/services/job.py),
its command, its port, its lag group. Nothing here reads the settings: a port is named by its
role (:class:`Listens`) and infra/ resolves it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from streams.cold.loader import COLD_JOB
from streams.hot.job import HOT_JOB
from streams.ota.job import OTA_JOB
from streams.runtime.loader import LoaderSpec
from streams.runtime.spec import JobSpec

SHIPPED_DIR = Path(__file__).resolve().parent / "jobs" / "shipped"


class JobKind(StrEnum):
    TRANSACTIONAL = "transactional"  # a JobSpec on the kit's transactional loop (exactly once)
    LOADER = "loader"  # a LoaderSpec on the kit's loader loop (batch, store, commit)
    FAUST = "faust"  # a Faust job file on the jobs app (at least once, idempotent keys)


class Listens(StrEnum):
    """The port a job's process answers on, by role (infra/ maps a role to its setting)."""

    NOTHING = "nothing"  # shown at the Kafka address it consumes from
    QUERY = "query"  # the warehouse's SQL port (the cold loader serves `fleet sql`)
    JOB_WEB = "job_web"  # a Faust job's web view: the jobs' first web port + its index


@dataclass(frozen=True)
class JobEntry:
    """One stream job of the platform."""

    name: str  # its service in `fleet up`/`fleet status`, its status file `<name>.json`
    kind: JobKind
    group: str  # its consumer group (`fleet status` shows its lag on `inputs`)
    inputs: tuple[str, ...]  # the topics it consumes
    listens: Listens = Listens.NOTHING
    file: Path | None = None  # a Faust job's file (its stem is its group)
    index: int = 0  # a Faust job's place among them: its web port is the first + index
    # What the kit runs (a transactional job's JobSpec, a loader's LoaderSpec); None: Faust.
    spec: JobSpec[Any] | LoaderSpec | None = field(default=None, compare=False, repr=False)


def transactional(spec: JobSpec[Any]) -> JobEntry:
    return JobEntry(spec.name, JobKind.TRANSACTIONAL, spec.group, tuple(spec.inputs), spec=spec)


def loader(spec: LoaderSpec, listens: Listens = Listens.NOTHING) -> JobEntry:
    inputs = tuple(source.topic for source in spec.sources)
    return JobEntry(spec.name, JobKind.LOADER, spec.group, inputs, listens, spec=spec)


def faust(stem: str, inputs: tuple[str, ...], index: int) -> JobEntry:
    """A shipped Faust job: `streams/jobs/shipped/<stem>.py`, consumer group = stem."""
    name = f"job-{stem.replace('_', '-')}"
    file = SHIPPED_DIR / f"{stem}.py"
    return JobEntry(name, JobKind.FAUST, stem, inputs, Listens.JOB_WEB, file, index)


JOBS: tuple[JobEntry, ...] = (
    loader(COLD_JOB, Listens.QUERY),
    transactional(HOT_JOB),
    transactional(OTA_JOB),
    faust("fleet_health", ("telemetry.digests",), index=0),
    faust("alert_webhooks", ("alerts",), index=1),
)
JOBS_BY_NAME = {job.name: job for job in JOBS}
