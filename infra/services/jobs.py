"""The Faust jobs shipped with the platform (streams/jobs/shipped/) as services of `fleet up`.

Each runs ``python -m infra.jobs <file> --web-port N`` (what `fleet jobs run` does), so it is
listed by `fleet jobs list` too; it answers once its Faust web view does.
"""

from __future__ import annotations

from pathlib import Path

from infra.services.platform import PlatformProcess
from infra.settings import Settings

SHIPPED_DIR = Path(__file__).resolve().parents[2] / "streams" / "jobs" / "shipped"
# (job name = file stem = consumer group, its input topics), in port order from jobs_web_port.
SHIPPED_JOBS = (
    ("fleet_health", ("telemetry.raw",)),
    ("alert_webhooks", ("alerts",)),
)


class ShippedJobService(PlatformProcess):
    def __init__(self, settings: Settings, index: int) -> None:
        job, self.inputs = SHIPPED_JOBS[index]
        self.job = job
        self.file = SHIPPED_DIR / f"{job}.py"
        super().__init__(
            f"job-{job.replace('_', '-')}",
            settings,
            settings.jobs_web_port + index,
            "infra.jobs",
            str(self.file),
            "--web-port",
            str(settings.jobs_web_port + index),
        )


def shipped_jobs(settings: Settings) -> list[ShippedJobService]:
    return [ShippedJobService(settings, i) for i in range(len(SHIPPED_JOBS))]
