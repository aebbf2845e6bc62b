from __future__ import annotations

import pytest
from pydantic import ValidationError

from infra.settings import Settings


def test_settings_come_from_fleet_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_KAFKA_PORT", "19092")
    monkeypatch.setenv("FLEET_BROKERS", "3")
    settings = Settings()
    assert settings.bootstrap_servers == "127.0.0.1:19092,127.0.0.1:19094,127.0.0.1:19096"
    assert settings.controller_port(1) == 19095
    assert settings.replication_factor == 3
    assert settings.min_insync_replicas == 2


def test_single_broker_defaults() -> None:
    settings = Settings()
    assert settings.bootstrap_servers == "127.0.0.1:9092"
    assert settings.replication_factor == 1
    assert settings.min_insync_replicas == 1
    assert settings.registry_url == "http://127.0.0.1:8081/apis/ccompat/v7"


def test_a_non_loopback_host_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_HOST", "0.0.0.0")
    with pytest.raises(ValidationError, match="loopback"):
        Settings()


def test_settings_are_immutable() -> None:
    with pytest.raises(ValidationError):
        Settings().kafka_port = 1  # type: ignore[misc]
