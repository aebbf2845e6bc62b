"""The OTA rollout controller (streams/ota/worker.py) as a service of `fleet up`, and its process
entry point: `python -m infra.services.ota` reads the settings and runs the controller with the
small config it needs."""

from __future__ import annotations

from collections.abc import Sequence

from infra.process import process_main
from infra.services.platform import PlatformProcess
from infra.settings import Settings
from streams.ota.worker import OtaConfig, OtaWorker

MODULE = "infra.services.ota"


def ota_config(settings: Settings) -> OtaConfig:
    return OtaConfig(
        bootstrap_servers=settings.bootstrap_servers,
        registry_url=settings.registry_url,
        run_dir=settings.run_dir,
    )


class OtaControllerService(PlatformProcess):
    def __init__(self, settings: Settings) -> None:
        # Shown at the Kafka address it consumes from; it listens on no port of its own.
        super().__init__("ota-controller", settings, settings.kafka_port, MODULE)

    def bound_ports(self) -> Sequence[int]:
        return ()

    def ready(self) -> bool:
        return self.reported_by_me() and bool(self.counters().get("ready"))


def main() -> None:
    process_main("OTA controller", lambda settings: OtaWorker(ota_config(settings)))


if __name__ == "__main__":
    main()
