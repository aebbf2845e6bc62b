"""The cold-path worker (streams/cold/loader.py) as a background service of `fleet up`.

It owns the embedded chDB folder and answers `fleet sql` on the query port while it runs.
"""

from __future__ import annotations

from infra.services.base import port_answers
from infra.services.platform import PlatformProcess
from infra.settings import Settings


class ColdWorkerService(PlatformProcess):
    def __init__(self, settings: Settings) -> None:
        super().__init__(
            "cold-worker", settings, settings.query_port, "infra.process", "cold-worker"
        )

    def ready(self) -> bool:
        return self.reported_by_me() and port_answers(self.host, self.port)
