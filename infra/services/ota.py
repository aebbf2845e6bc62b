"""The OTA rollout controller (streams/ota/job.py) as a service of `fleet up`, and its process
entry point: `python -m infra.services.ota` reads the settings and runs the controller's job
spec on the kit's transactional loop."""

from __future__ import annotations

from collections.abc import Sequence

from infra.process import kafka_config, process_main
from infra.services.platform import PlatformProcess
from infra.settings import Settings
from streams.ota.job import OTA_JOB, OtaState
from streams.runtime.job import JobOptions, TransactionalJob

MODULE = "infra.services.ota"


def ota_controller(settings: Settings) -> TransactionalJob[OtaState]:
    options = JobOptions(
        status_path=settings.run_dir / f"{OTA_JOB.name}.json",
        max_batch=5000,
        poll_ms=50,
        tick_s=1.0,  # how often rollouts check their timers (bake time, silent devices)
    )
    return TransactionalJob(OTA_JOB, kafka_config(settings, OTA_JOB.name), options)


class OtaControllerService(PlatformProcess):
    def __init__(self, settings: Settings) -> None:
        # Shown at the Kafka address it consumes from; it listens on no port of its own.
        super().__init__("ota-controller", settings, settings.kafka_port, MODULE)

    def bound_ports(self) -> Sequence[int]:
        return ()

    def ready(self) -> bool:
        return self.reported_by_me() and bool(self.counters().get("ready"))


def main() -> None:
    process_main("OTA controller", ota_controller)


if __name__ == "__main__":
    main()
