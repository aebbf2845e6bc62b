"""The HTTP API (infra/api/: devices, grants, twins, rules, rollouts) as a `fleet up` service."""

from __future__ import annotations

from infra.services.base import port_answers
from infra.services.platform import PlatformProcess
from infra.settings import Settings


class ApiService(PlatformProcess):
    def __init__(self, settings: Settings) -> None:
        super().__init__("api", settings, settings.api_port, "infra.api.app")

    def ready(self) -> bool:
        """Its own status file says ready (tables read to their end) and the port answers."""
        return (
            self.reported_by_me()
            and bool(self.counters().get("ready"))
            and port_answers(self.host, self.port)
        )
