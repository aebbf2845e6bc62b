"""`fleet status --json`, `fleet down`, `fleet up` as an operator runs them."""

from __future__ import annotations

import json
import subprocess
import uuid

from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

from infra.settings import PROJECT_ROOT, Settings
from infra.stack import Stack
from infra.topics import list_topics
from tests.conftest import settings_env

FLEET = str(PROJECT_ROOT / ".venv" / "bin" / "fleet")


def _fleet(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FLEET, *args], env=settings_env(settings), capture_output=True, text=True, timeout=300
    )


def test_status_json_lists_every_service_and_topic(stack: Stack, settings: Settings) -> None:
    result = _fleet(settings, "status", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout.strip().splitlines()[-1])
    services = {s["name"]: s for s in status["services"]}
    assert set(services) == {
        "kafka-0",
        "registry",
        "mosquitto",
        "enforcer",
        "bridge-0",
        "cold-worker",
        "hot-worker",
        "ota-controller",
        "api",
        "job-fleet-health",
        "job-alert-webhooks",
        "supervisor",
        "prometheus",
    }
    for name, service in services.items():
        assert service["state"] == "up", name
        assert isinstance(service["restarts"], int), name
        assert service["host"] == "127.0.0.1"
        assert isinstance(service["pid"], int)
        assert service["version"]
    assert services["mosquitto"]["port"] == settings.mqtt_port
    assert services["prometheus"]["port"] == settings.prometheus_port
    # Every platform process serves Prometheus metrics on a port of its own.
    metered = {n: s["metrics_port"] for n, s in services.items() if s["metrics_port"]}
    assert set(metered) == set(services) - {"kafka-0", "registry", "mosquitto"}
    assert len(set(metered.values())) == len(metered)
    assert isinstance(status["alerts"], list)  # Prometheus' pending and firing alerts
    assert "telemetry.raw" in {t["name"] for t in status["topics"]}


def test_down_then_up_brings_back_topics_and_schemas(stack: Stack, settings: Settings) -> None:
    subject = f"e2e-{uuid.uuid4().hex[:10]}-value"
    schema = Schema(
        json.dumps({"type": "record", "name": "E2E", "fields": [{"name": "x", "type": "int"}]}),
        "AVRO",
    )
    schema_id = SchemaRegistryClient({"url": settings.registry_url}).register_schema(
        subject, schema
    )
    topics_before = list_topics(settings)
    pids_before = {s.name: s.pid for s in stack.status().services}

    down = _fleet(settings, "down")
    assert down.returncode == 0, down.stderr
    for service in stack.services:
        assert service.status().state == "down"
        assert pids_before[service.name] is not None
        # Stopped on purpose, the supervisor first: nothing is started again behind `down`.
        assert not service.wanted(), service.name
    stopped = _fleet(settings, "status", "--json")
    assert stopped.returncode == 3  # not everything up

    up = _fleet(settings, "up")
    assert up.returncode == 0, up.stderr + up.stdout
    assert list_topics(settings) == topics_before
    fetched = SchemaRegistryClient({"url": settings.registry_url}).get_schema(schema_id)
    assert json.loads(fetched.schema_str) == json.loads(schema.schema_str)


def test_up_reports_a_taken_port_clearly(stack: Stack, settings: Settings, tmp_path) -> None:
    # A second stack in another folder wants the ports the test stack holds.
    clash = settings.model_copy(update={"state_dir": tmp_path / "other"})
    try:
        result = _fleet(clash, "up")
        assert result.returncode == 1
        assert "is taken by" in result.stderr
        assert str(settings.kafka_port) in result.stderr
    finally:
        # Whatever the clash stack did start must not outlive the test (it would hold ports).
        _fleet(clash, "down")
