"""The MQTT -> Kafka bridge (ingest/bridge.py) as a background service of `fleet up`, run as
`python -m infra.entrypoints.bridge <replica>`."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from infra.services.base import ServiceError
from infra.services.platform import PlatformProcess
from infra.settings import Settings
from ingest.health import ingesting


class BridgeService(PlatformProcess):
    def __init__(self, settings: Settings, replica: int = 0) -> None:
        # Shown at the broker address it consumes from; it listens on no port of its own.
        super().__init__(
            f"bridge-{replica}",
            settings,
            settings.mqtt_port,
            "infra.entrypoints.bridge",
            str(replica),
        )

    def bound_ports(self) -> Sequence[int]:
        return ()

    def ready(self) -> bool:
        """Up means ingesting, not merely connected (ingest/health.py): subscribed, and a
        message (a canary at least) went broker -> this bridge -> Kafka within the last
        seconds. So `fleet status` cannot say up while this replica's ingest is dead."""
        return self.reported_by_me() and ingesting(self.counters(), time.time())

    @property
    def status_path(self) -> Path:
        return self.run_dir / f"{self.name}.json"

    def has_run(self) -> bool:
        """This replica ran here at some point, so the broker may hold its session."""
        return self.status_path.exists() or self.process() is not None

    def retire(self, timeout: float = 600.0) -> None:
        """Take this replica out of service for good: stop it, drain its session into Kafka
        and end it (ingest/bridge.py, `--retire`), so no message stays stranded there."""
        self.stop()
        env = {**os.environ, **self.environment()}
        with self.log_path.open("ab") as log:
            done = subprocess.run(
                [*self.command(), "--retire"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.run_dir,
                timeout=timeout + 60,
                check=False,
            )
        if done.returncode != 0:
            raise ServiceError(
                f"{self.name}: not retired (see {self.log_path}); its session is kept"
            )
        self.status_path.unlink(missing_ok=True)
