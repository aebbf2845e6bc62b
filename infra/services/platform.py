"""The platform's own Python processes (bridge, cold-path worker) as services of `fleet up`.

Each runs `python -m <module>` with the stack's settings in its environment and reports its
counters, with its pid, in `<run dir>/<name>.json`.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from infra.services.base import Service
from infra.settings import Settings, settings_env
from streams.runtime.status import read_status


class PlatformProcess(Service):
    def __init__(self, name: str, settings: Settings, port: int, module: str, *args: str) -> None:
        super().__init__(name, settings.host, port, settings.run_dir)
        self.settings = settings
        self.argv = [sys.executable, "-m", module, *args]

    def command(self) -> Sequence[str]:
        return self.argv

    def environment(self) -> Mapping[str, str]:
        return settings_env(self.settings)

    def counters(self) -> dict[str, Any]:
        """What the running process last reported."""
        return read_status(self.run_dir / f"{self.name}.json")

    def reported_by_me(self) -> bool:
        """The status file is this process's (not a leftover of an earlier one)."""
        proc = self.process()
        return proc is not None and self.counters().get("pid") == proc.pid

    def version(self) -> str | None:
        try:
            return version("fleetstream")
        except PackageNotFoundError:
            return None
