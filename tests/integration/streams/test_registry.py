"""The schema registry (Apicurio, kafkasql storage) through its Confluent-compatible API."""

from __future__ import annotations

import json
import uuid

from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

from infra.settings import Settings
from infra.stack import Stack


def _schema(name: str) -> Schema:
    record = {
        "type": "record",
        "name": name,
        "namespace": "io.fleetstream.test",
        "fields": [{"name": "device_id", "type": "string"}, {"name": "seq", "type": "long"}],
    }
    return Schema(json.dumps(record), "AVRO")


def test_a_schema_id_survives_a_registry_restart(stack: Stack, settings: Settings) -> None:
    subject = f"test-{uuid.uuid4().hex[:12]}-value"
    schema = _schema(f"T{uuid.uuid4().hex[:8]}")
    schema_id = SchemaRegistryClient({"url": settings.registry_url}).register_schema(
        subject, schema
    )

    stack.registry.stop()
    assert stack.registry.status().state == "down"
    stack.registry.start(settings.startup_timeout_s)

    fresh = SchemaRegistryClient({"url": settings.registry_url})  # no client-side cache
    fetched = fresh.get_schema(schema_id)
    assert json.loads(fetched.schema_str) == json.loads(schema.schema_str)
    assert fresh.get_latest_version(subject).schema_id == schema_id
