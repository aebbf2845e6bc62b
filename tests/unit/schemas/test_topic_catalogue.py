"""The topic catalogue (schemas/topics.py) is the one place topics are declared."""

from __future__ import annotations

import pytest

from schemas.codec import SCHEMA_DIR, load_schema
from schemas.topics import SCHEMAS, TOPICS, TOPICS_BY_NAME, schema_of


def test_names_are_unique() -> None:
    assert len(TOPICS_BY_NAME) == len(TOPICS)


def test_every_schema_named_is_an_avro_file() -> None:
    for topic, schema in SCHEMAS.items():
        assert (SCHEMA_DIR / f"{schema}.avsc").is_file(), topic
        assert load_schema(schema)["name"].endswith(schema)


def test_every_avro_file_is_some_topics_schema() -> None:
    assert {path.stem for path in SCHEMA_DIR.glob("*.avsc")} == set(SCHEMAS.values())


def test_schema_of() -> None:
    assert schema_of("telemetry.raw") == "Telemetry"
    assert schema_of("mqtt.downlink") == "Downlink"
    with pytest.raises(KeyError, match="no Avro topic"):
        schema_of("dlq.ingest")


def test_the_words_agree_with_the_schema() -> None:
    for spec in TOPICS:
        if spec.value.startswith("Avro "):
            assert spec.schema is not None, spec.name


def test_the_ingest_layer_names_only_catalogued_topics() -> None:
    from ingest.bridge import CANARY_TOPIC, DLQ_TOPIC, ROUTES
    from ingest.downlink import DOWNLINK_TOPIC
    from ingest.enforcement import DEVICES

    names = {CANARY_TOPIC, DLQ_TOPIC, DOWNLINK_TOPIC, DEVICES}
    names |= {route.kafka_topic for route in ROUTES.values()}
    assert names <= set(TOPICS_BY_NAME)
    for route in ROUTES.values():
        assert route.schema == TOPICS_BY_NAME[route.kafka_topic].schema
