"""The cold-path Faust worker (streams/worker.py) as a background service of `fleet up`.

It owns the embedded chDB folder and answers `fleet sql` on the query port while it runs.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from infra.services.base import Service
from infra.settings import Settings, settings_env


class ColdWorkerService(Service):
    def __init__(self, settings: Settings) -> None:
        super().__init__("cold-worker", settings.host, settings.query_port, settings.run_dir)
        self.settings = settings

    def command(self) -> Sequence[str]:
        return [sys.executable, "-m", "streams.worker"]

    def environment(self) -> Mapping[str, str]:
        return settings_env(self.settings)

    def counters(self) -> dict[str, Any]:
        try:
            data = json.loads((self.run_dir / "cold-worker.json").read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def ready(self) -> bool:
        proc = self.process()
        return (
            proc is not None
            and self.counters().get("pid") == proc.pid
            and super().ready()  # the query port answers
        )

    def version(self) -> str | None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("fleetstream")
        except PackageNotFoundError:
            return None
