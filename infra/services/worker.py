"""The cold-path worker (streams/cold/loader.py) as a background service of `fleet up`.

It owns the embedded chDB folder and answers `fleet sql` on the query port while it runs. With
an Apache Doris warehouse there is no query port (Doris is a server, reached directly): it is
ready once it reports from its status file.
"""

from __future__ import annotations

from infra.services.base import port_answers
from infra.services.platform import PlatformProcess
from infra.settings import Settings
from sinks.doris import is_doris_dsn


class ColdWorkerService(PlatformProcess):
    def __init__(self, settings: Settings) -> None:
        super().__init__(
            "cold-worker", settings, settings.query_port, "infra.process", "cold-worker"
        )

    def ready(self) -> bool:
        if is_doris_dsn(self.settings.warehouse_dsn):
            return self.reported_by_me()
        return self.reported_by_me() and port_answers(self.host, self.port)
