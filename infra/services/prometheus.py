"""The Prometheus server (Debian's `prometheus` package) as a service of `fleet up`.

It scrapes every platform process's /metrics (infra/metrics.py) and evaluates the platform's
recording and alerting rules (infra/prometheus.py); config and rules are written anew before
each start, from the stack's process list. Bound to the stack's loopback host; its data lives in
``<state dir>/prometheus``. `FLEET_PROMETHEUS=false` leaves it out of the stack.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from infra.metrics import ScrapeTarget
from infra.prometheus import write_files
from infra.services.base import Service
from infra.settings import Settings

BINARY = "prometheus"


@dataclass(frozen=True)
class FiringAlert:
    name: str
    severity: str
    summary: str
    labels: dict[str, str]
    state: str  # "firing" or "pending"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PrometheusService(Service):
    def __init__(self, settings: Settings, targets: Callable[[], Sequence[ScrapeTarget]]) -> None:
        super().__init__("prometheus", settings.host, settings.prometheus_port, settings.run_dir)
        self.settings = settings
        self.targets = targets
        self.folder = settings.state_dir / "prometheus"
        self.metrics_port = settings.prometheus_port  # it serves its own /metrics there

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.folder / "prometheus.yml"

    def prepare(self) -> None:
        write_files(self.settings, self.targets(), self.folder)

    def command(self) -> Sequence[str]:
        return [
            shutil.which(BINARY) or f"/usr/bin/{BINARY}",
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.folder / 'data'}",
            f"--storage.tsdb.retention.time={self.settings.prometheus_retention}",
            f"--web.listen-address={self.host}:{self.port}",
            f"--web.external-url={self.url}",
            "--web.enable-lifecycle",
            "--log.level=warn",
        ]

    def _get(self, path: str, timeout: float = 2.0) -> Any:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=timeout) as response:  # noqa: S310 - loopback
            return json.loads(response.read()) if path.startswith("/api/") else response.status

    def ready(self) -> bool:
        try:
            return bool(self._get("/-/ready") == 200)
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def version(self) -> str | None:
        try:
            out = subprocess.run(
                [shutil.which(BINARY) or BINARY, "--version"],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            ).stdout
        except OSError:
            return None
        found = re.search(r"version (\S+)", out)
        return found.group(1) if found else None

    def alerts(self) -> list[FiringAlert]:
        """The platform alerts pending or firing now (its HTTP API); [] if it does not answer."""
        try:
            body = self._get("/api/v1/alerts")
        except (OSError, ValueError, urllib.error.URLError):
            return []
        found = []
        for item in body.get("data", {}).get("alerts", []):
            labels = dict(item.get("labels", {}))
            found.append(
                FiringAlert(
                    name=labels.pop("alertname", "?"),
                    severity=labels.pop("severity", ""),
                    summary=str(item.get("annotations", {}).get("summary", "")),
                    labels=labels,
                    state=str(item.get("state", "")),
                )
            )
        return found

    def targets_health(self) -> dict[str, str]:
        """Each scraped process's health as Prometheus sees it ("up", "down", "unknown")."""
        body = self._get("/api/v1/targets?state=active")
        return {
            str(t["labels"].get("process", t["scrapeUrl"])): str(t["health"])
            for t in body.get("data", {}).get("activeTargets", [])
        }
