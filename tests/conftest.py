"""Fixtures shared by integration and e2e tests: a real stack on its own ports and state."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from infra.keys import key_passphrase
from infra.pki import CertificateAuthority
from infra.provision import provision_device
from infra.settings import PROJECT_ROOT, Settings
from infra.settings import settings_env as fleet_env
from infra.stack import Stack

# Test ports sit 10000 above the defaults (FLEET_TEST_PORT_OFFSET moves them), so a running
# `make demo` stack, or another checkout's tests, is left alone.
PORT_OFFSET = int(os.environ.get("FLEET_TEST_PORT_OFFSET", "10000"))
TEST_SETTINGS = {
    "state_dir": PROJECT_ROOT / ".state" / f"test-stack-{PORT_OFFSET}",
    "kafka_port": 9092 + PORT_OFFSET,
    "registry_port": 8081 + PORT_OFFSET,
    "registry_management_port": 9001 + PORT_OFFSET,
    "mqtt_port": 8883 + PORT_OFFSET,
    "query_port": 8124 + PORT_OFFSET,
    "query_timeout_s": 5.0,  # short, so the query port's time-limit test ends quickly
    "api_port": 8090 + PORT_OFFSET,
    "jobs_web_port": 6066 + PORT_OFFSET,
    "metrics_port": 9400 + PORT_OFFSET,
    "prometheus_port": 9390 + PORT_OFFSET,
    # Short, so a test sees a scrape, a rule evaluation and an alert firing within seconds.
    "prometheus_scrape_interval_s": 1.0,
    "prometheus_evaluation_interval_s": 1.0,
    "prometheus_alert_for_s": 2.0,
    "default_partitions": 3,
}


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that points a `fleet` subprocess at the same stack."""
    return {**os.environ, **fleet_env(settings)}


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings(**TEST_SETTINGS)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def stack(settings: Settings) -> Iterator[Stack]:
    """The whole stack, started once per session (idempotent), stopped at the end."""
    platform = Stack(settings)
    platform.up()
    yield platform
    if not os.environ.get("FLEET_TEST_KEEP_STACK"):
        platform.down()


@pytest.fixture
def ca(stack: Stack, settings: Settings) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(
        settings.pki_dir, passphrase=key_passphrase(settings)
    )


@dataclass(frozen=True)
class DeviceIdentity:
    device_id: str
    key: Path
    cert: Path
    serial: int


@pytest.fixture
def make_device(ca: CertificateAuthority, tmp_path: Path) -> Callable[..., DeviceIdentity]:
    """Factory: a device with a key made on its side and a certificate issued from its CSR."""

    def factory(prefix: str = "dev") -> DeviceIdentity:
        creds = provision_device(ca, f"{prefix}-{uuid.uuid4().hex[:10]}", tmp_path, "ec")
        return DeviceIdentity(creds.device_id, creds.key_path, creds.cert_path, creds.serial)

    return factory


@pytest.fixture
def new_topic(stack: Stack, settings: Settings) -> Callable[..., str]:
    """Factory: a uuid-named topic on the test stack."""
    from infra.topics import ensure_topics
    from schemas.topics import TopicSpec

    def factory(partitions: int = 1) -> str:
        name = f"test.{uuid.uuid4().hex[:12]}"
        ensure_topics(settings, [TopicSpec(name, "k", "v", partitions=partitions)])
        return name

    return factory
