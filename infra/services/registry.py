"""Apicurio Registry 3 (Quarkus), schemas stored in Kafka (kafkasql) so ids survive restarts.

Clients use its Confluent-compatible API at `/apis/ccompat/v7` (confluent-kafka's
SchemaRegistryClient). Apicurio 3.3 is built for Java 21, so it runs on the newest JDK found.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from infra.services.base import Service
from infra.services.java import find_java, maven_fetch
from infra.settings import PROJECT_ROOT, Settings

REGISTRY_POM = PROJECT_ROOT / "infra" / "registry" / "pom.xml"
REGISTRY_MIN_JAVA = 21
# The journal topic Apicurio keeps every schema in; declared here so `fleet status` can name it.
REGISTRY_JOURNAL_TOPIC = "_registry.journal"
REGISTRY_SNAPSHOTS_TOPIC = "_registry.snapshots"


def ensure_registry_app(settings: Settings) -> Path:
    home = settings.lib_dir / "apicurio"
    maven_fetch(REGISTRY_POM, "dependency:unpack", home, {"registry.home": str(home)})
    return home


def _get_json(url: str, timeout: float = 2.0) -> dict[str, object] | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback
            data = json.loads(response.read())
            return data if isinstance(data, dict) else None
    except (OSError, urllib.error.URLError, ValueError):
        return None


class SchemaRegistry(Service):
    def __init__(self, settings: Settings) -> None:
        super().__init__("registry", settings.host, settings.registry_port, settings.run_dir)
        self.settings = settings
        self.home = settings.lib_dir / "apicurio"

    def extra_ports(self) -> Sequence[int]:
        return (self.settings.registry_management_port,)

    def prepare(self) -> None:
        ensure_registry_app(self.settings)
        find_java(REGISTRY_MIN_JAVA, self.settings.registry_java_home)  # fail early and clearly

    def command(self) -> Sequence[str]:
        java = find_java(REGISTRY_MIN_JAVA, self.settings.registry_java_home)
        return [
            str(java),
            f"-Xmx{self.settings.registry_heap}",
            "-XX:+UseSerialGC",
            # C1 only: clients cache the few schemas it serves, so its code is never hot, and
            # C2 compiling it cost more than it saved (idle CPU, bench ledger).
            "-XX:TieredStopAtLevel=1",
            "-Djava.awt.headless=true",
            "-jar",
            str(self.home / "quarkus-run.jar"),
        ]

    def environment(self) -> Mapping[str, str]:
        s = self.settings
        return {
            "APICURIO_STORAGE_KIND": "kafkasql",
            "APICURIO_KAFKASQL_BOOTSTRAP_SERVERS": s.bootstrap_servers,
            "APICURIO_KAFKASQL_TOPIC": REGISTRY_JOURNAL_TOPIC,
            "APICURIO_KAFKASQL_SNAPSHOTS_TOPIC": REGISTRY_SNAPSHOTS_TOPIC,
            "QUARKUS_HTTP_HOST": s.host,
            "QUARKUS_HTTP_PORT": str(s.registry_port),
            "QUARKUS_MANAGEMENT_HOST": s.host,
            "QUARKUS_MANAGEMENT_PORT": str(s.registry_management_port),
            "QUARKUS_LOG_CONSOLE_COLOR": "false",
        }

    def _info(self) -> dict[str, object] | None:
        return _get_json(f"http://{self.host}:{self.port}/apis/registry/v3/system/info")

    def ready(self) -> bool:
        # The API answers before the kafkasql storage has replayed its journal: a schema id
        # asked for in between is "not found" (a decoder would dead-letter good records). The
        # management port's readiness includes the storage's own (PersistenceSimpleReadiness
        # Check: journal read up to the marker this process wrote at start).
        health = _get_json(
            f"http://{self.host}:{self.settings.registry_management_port}/health/ready"
        )
        return (
            health is not None
            and health.get("status") == "UP"
            and self._info() is not None
            and _get_json_list_ok(self.settings.registry_url)
        )

    def version(self) -> str | None:
        info = self._info()
        version = info.get("version") if info else None
        return str(version) if version else None


def _get_json_list_ok(registry_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{registry_url}/subjects", timeout=2.0) as response:  # noqa: S310
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False
