"""Faust records derived from the .avsc files, and the platform's topics on the jobs app."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from infra.jobs import job_name, jobs_config, scaffold, topic_decls
from infra.settings import Settings
from schemas.codec import SCHEMA_DIR, load_schema
from streams.jobs import Alert, Device, DeviceEvent, JobsApp, PlatformTopics, Telemetry, TwinState
from streams.jobs.app import attribute_name
from streams.jobs.records import all_records, python_type
from tests.support.records import device_record

SCHEMAS = sorted(p.stem for p in SCHEMA_DIR.glob("*.avsc"))


@pytest.mark.parametrize("schema", SCHEMAS)
def test_each_record_has_exactly_the_fields_of_its_avsc(schema: str) -> None:
    record = all_records()[schema]
    fields = {f["name"] for f in load_schema(schema)["fields"]}
    assert set(record._options.fields) == fields
    assert record.__name__ == load_schema(schema)["name"]


def test_the_platform_records_are_named_after_their_schemas() -> None:
    for record in (Telemetry, DeviceEvent, Alert, TwinState, Device):
        assert set(record._options.fields) == {
            f["name"] for f in load_schema(record.__name__)["fields"]
        }


def test_attribute_access_by_field_name_and_the_schema_defaults() -> None:
    event = DeviceEvent(device_id="d", seq=4, ts=1, received_at=2, type="reboot")
    assert (event.device_id, event.seq, event.type) == ("d", 4, "reboot")
    assert (event.message, event.attributes) == (None, {})
    twin = TwinState(
        device_id="d",
        version=1,
        desired="{}",
        reported="{}",
        desired_metadata="{}",
        reported_metadata="{}",
    )
    assert (twin.last_reported_seq, twin.updated_at) == (-1, 0)


def test_a_mutable_default_is_not_shared_between_records() -> None:
    one = Telemetry(device_id="a", seq=1, ts=0, received_at=0)
    two = Telemetry(device_id="b", seq=1, ts=0, received_at=0)
    one.extra["co2"] = 1.0
    assert two.extra == {}


def test_the_dict_handed_to_the_codec_has_no_faust_metadata() -> None:
    device = Device(**device_record("d").to_record())
    representation = device.to_representation()
    assert "__faust" not in representation
    assert set(representation) == {f["name"] for f in load_schema("Device")["fields"]}


@pytest.mark.parametrize(
    ("avro", "python"),
    [
        ("string", str),
        ({"type": "long", "logicalType": "timestamp-millis"}, int),
        (["null", "double"], float | None),
        ({"type": "map", "values": "string"}, dict[str, str]),
        ({"type": "array", "items": "long"}, list[int]),
        ({"type": "enum", "name": "E", "symbols": ["a"]}, str),
    ],
)
def test_avro_types_map_to_python_types(avro: Any, python: Any) -> None:
    assert python_type(avro) == python


def _settings(tmp_path: Path) -> Settings:
    return Settings(state_dir=tmp_path, default_partitions=3)  # type: ignore[call-arg]


def test_the_jobs_config_comes_from_the_settings_and_the_topic_catalogue(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    config = jobs_config(settings, "my_job", web_port=6100)
    assert config.brokers == tuple(settings.bootstrap_servers.split(","))
    assert config.registry_url == settings.registry_url
    assert config.state_dir == tmp_path / "jobs" / "my_job"
    assert config.dlq_topic() == "dlq.jobs.my_job"
    schemas = {decl.name: decl.schema for decl in topic_decls(settings)}
    assert schemas["telemetry.raw"] == "Telemetry"
    assert schemas["device.events"] == "DeviceEvent"
    assert schemas["alerts"] == "Alert"
    assert schemas["twin.state"] == "TwinState"
    assert schemas["registry.devices"] == "Device"
    # Every Avro topic of the catalogue (the old parse of its value text missed four).
    assert schemas["mqtt.downlink"] == "Downlink"


def test_the_platform_topics_by_attribute_with_their_records(tmp_path: Path) -> None:
    app = JobsApp()
    app.configure(jobs_config(_settings(tmp_path), "my_job"))
    topics = PlatformTopics(app)
    assert app.conf.id == "my_job"  # the consumer group: the job's name
    expected = {
        "telemetry": ("telemetry.raw", Telemetry),
        "device_events": ("device.events", DeviceEvent),
        "alerts": ("alerts", Alert),
        "twin_state": ("twin.state", TwinState),
        "registry_devices": ("registry.devices", Device),
    }
    for attribute, (name, record) in expected.items():
        topic = getattr(topics, attribute)
        assert topic.get_topic_name() == name
        assert topic.value_type.__name__ == record.__name__
        assert getattr(topics, attribute) is topic  # one each
    with pytest.raises(AttributeError, match="no platform topic"):
        _ = topics.nonexistent
    assert attribute_name("telemetry.raw") == "telemetry"


def test_a_job_name_is_a_module_name() -> None:
    assert job_name(Path("/x/fleet_health.py")) == "fleet_health"
    with pytest.raises(ValueError, match="module name"):
        job_name(Path("fleet-health.py"))


def test_fleet_jobs_new_writes_a_job_whose_test_passes(tmp_path: Path) -> None:
    job, test = scaffold(tmp_path, "my_job")
    assert "from streams.jobs import app, topics" in job.read_text()
    with pytest.raises(FileExistsError):
        scaffold(tmp_path, "my_job")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)],
        cwd=tmp_path,
        capture_output=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout.decode() + run.stderr.decode()
