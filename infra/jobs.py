"""Data engineers' Faust jobs (streams/jobs/): the composition root's side.

Derives the jobs app's plain config from the settings and the topic catalogue, runs a job
file as a Faust worker in the foreground, scaffolds new jobs and lists the jobs that ran.
Each job's state lives in ``<state_dir>/jobs/<name>/``: Faust's data dir and ``job.json``
(file, pid, input topics), which ``fleet jobs list`` reads.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from infra.metrics import serve_process_metrics
from infra.settings import Settings
from infra.topics import consumer_lag
from schemas.topics import TOPICS
from streams.jobs.config import JobsConfig, TopicDecl

_JOB_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


def job_name(path: Path) -> str:
    """The job's name (and consumer group): the file's stem, a Python identifier."""
    name = path.stem
    if not _JOB_NAME.match(name):
        raise ValueError(
            f"job file name {path.name!r}: use lower-case letters, digits and _ (a module name)"
        )
    return name


def jobs_dir(settings: Settings) -> Path:
    return settings.state_dir / "jobs"


def topic_decls(settings: Settings) -> tuple[TopicDecl, ...]:
    return tuple(
        TopicDecl(spec.name, spec.partitions or settings.default_partitions, spec.schema)
        for spec in TOPICS
        if not spec.name.startswith("_")
    )


def jobs_config(settings: Settings, job: str, web_port: int | None = None) -> JobsConfig:
    return JobsConfig(
        job=job,
        brokers=tuple(settings.bootstrap_servers.split(",")),
        registry_url=settings.registry_url,
        state_dir=jobs_dir(settings) / job,
        partitions=settings.default_partitions,
        replication_factor=settings.replication_factor,
        web_port=web_port,
        topics=topic_decls(settings),
    )


def configure_offline(job: str = "test") -> None:
    """Configure the jobs app from the settings without touching the stack (a job's unit test:
    the platform's topics and records exist; nothing connects until a worker starts)."""
    from infra.settings import load_settings
    from streams.jobs import app

    app.configure(jobs_config(load_settings(), job))


def _import_job(path: Path, name: str) -> None:
    # The job's own directory first, so a job can import modules beside it.
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


def _exit_while_starting(signum: int, _frame: object) -> None:
    raise SystemExit(0)


def run_job(settings: Settings, path: Path, web_port: int | None, loglevel: str) -> None:
    """Run the job file as a Faust worker until SIGINT/SIGTERM (never returns normally)."""
    # A service manager may stop the job while it is still starting (importing Faust and the
    # job takes seconds on a busy machine): exit cleanly then too. Faust's worker installs its
    # own handler once its loop runs.
    signal.signal(signal.SIGTERM, _exit_while_starting)
    import faust

    from streams.jobs import app
    from streams.jobs.metrics import faust_metrics

    path = path.resolve()
    name = job_name(path)
    config = jobs_config(settings, name, web_port)
    config.state_dir.mkdir(parents=True, exist_ok=True)
    app.configure(config)
    _import_job(path, name)
    if not app.agents:
        raise ValueError(f"{path.name} defines no @app.agent")
    inputs = sorted(
        {t for agent in app.agents.values() for t in getattr(agent.channel, "topics", ())}
    )
    JobRecord(name, str(path), os.getpid(), inputs).write(config.state_dir)
    serve_process_metrics(settings, lambda: faust_metrics(app))
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    # Faust's start-up spinner sets the root logger to DEBUG for its own handler, for good: every
    # debug call of aiokafka and Faust then builds a log record (a tenth of a job's CPU, profiled).
    worker.spinner = None
    worker.execute_from_commandline()


@dataclass(frozen=True)
class JobRecord:
    """What ``fleet jobs run`` leaves in the job's state dir for ``fleet jobs list``."""

    name: str
    file: str
    pid: int
    inputs: list[str]

    def write(self, state_dir: Path) -> None:
        (state_dir / "job.json").write_text(json.dumps(self.__dict__))

    @classmethod
    def read(cls, state_dir: Path) -> JobRecord | None:
        try:
            data = json.loads((state_dir / "job.json").read_text())
            return cls(data["name"], data["file"], int(data["pid"]), list(data["inputs"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None


@dataclass(frozen=True)
class JobStatus:
    name: str
    file: str
    state: str  # running or stopped
    lag: int | None  # None: the stack is not reachable


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_jobs(settings: Settings) -> list[JobStatus]:
    statuses = []
    root = jobs_dir(settings)
    for state_dir in sorted(root.iterdir()) if root.is_dir() else []:
        record = JobRecord.read(state_dir)
        if record is None:
            continue
        try:
            lag: int | None = consumer_lag(settings, record.name, record.inputs)
        except Exception:  # noqa: BLE001  # the stack down is a state to show, not a crash
            lag = None
        state = "running" if _alive(record.pid) else "stopped"
        statuses.append(JobStatus(record.name, record.file, state, lag))
    return statuses


JOB_TEMPLATE = '''"""{name}: a Faust job on the platform's topics (run: fleet jobs run {name}.py).

At least once: after a crash, what was in flight is processed again, so outputs are keyed
and idempotent (same input -> same key and value).
"""

from streams.jobs import app, topics

# A job's own output topic; created on start (the brokers never auto-create topics).
out = app.topic("{name}.out", key_type=str, value_type=str, key_serializer="raw",
                value_serializer="raw")


def describe(device_id: str, seq: int, temperature: float | None) -> str:
    """The job's logic, kept pure so a unit test needs no Kafka."""
    return f"{{device_id}}/{{seq}}: {{temperature}}"


@app.agent(topics.telemetry)
async def {name}(stream):
    async for reading in stream:
        key = f"{{reading.device_id}}/{{reading.seq}}"  # same input, same key: idempotent
        await out.send(key=key, value=describe(reading.device_id, reading.seq,
                                               reading.temperature))
'''

TEST_TEMPLATE = '''"""Unit test of the {name} job: its logic, without Kafka."""

from infra.jobs import configure_offline
from streams.jobs import Telemetry

configure_offline()  # the platform's topics on the app, as `fleet jobs run` sets them up

import {name} as job  # noqa: E402


def test_describe() -> None:
    reading = Telemetry(device_id="dev-1", seq=7, ts=0, received_at=0, temperature=21.5)
    assert job.describe(reading.device_id, reading.seq, reading.temperature) == "dev-1/7: 21.5"
'''


def scaffold(directory: Path, name: str) -> tuple[Path, Path]:
    """Write ``<name>.py`` and ``test_<name>.py`` in ``directory``; refuse to overwrite."""
    job_name(Path(f"{name}.py"))
    job, test = directory / f"{name}.py", directory / f"test_{name}.py"
    for path in (job, test):
        if path.exists():
            raise FileExistsError(f"{path} exists")
    directory.mkdir(parents=True, exist_ok=True)
    job.write_text(JOB_TEMPLATE.format(name=name))
    test.write_text(TEST_TEMPLATE.format(name=name))
    return job, test


def main(argv: list[str] | None = None) -> None:
    """``python -m infra.jobs FILE.py [--web-port N]``: a job as a service of `fleet up`."""
    import argparse

    from infra.settings import load_settings

    parser = argparse.ArgumentParser(prog="python -m infra.jobs", description=main.__doc__)
    parser.add_argument("file", type=Path)
    parser.add_argument("--web-port", type=int, default=None)
    parser.add_argument("--loglevel", default="warn")
    args = parser.parse_args(argv)
    run_job(load_settings(), args.file, args.web_port, args.loglevel)


if __name__ == "__main__":
    main()
