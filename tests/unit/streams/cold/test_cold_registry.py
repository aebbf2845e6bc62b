"""The device registry in the cold path: registry.devices records -> the tenant lookup."""

from __future__ import annotations

import pytest

from schemas.codec import AvroCodec, load_schema
from streams.cold.registry import UNKNOWN, DeviceTenants, Tenant, apply_device
from streams.runtime.tables import UnreadableRecord
from tests.support.records import device_record

CODEC = AvroCodec(load_schema("Device"), schema_id=3)


def device(
    device_id: str, org: str = "acme", project: str = "plant", group: str = "line-1"
) -> bytes:
    record = device_record(device_id, org=org, project=project, group=group)
    return CODEC.encode(record.to_record())


def test_records_become_tenants_and_a_move_or_tombstone_follows() -> None:
    devices = DeviceTenants()
    apply_device(devices, CODEC, "d-1", device("d-1"))
    apply_device(devices, CODEC, "d-2", device("d-2", org="globex", project="p", group="g"))
    assert devices.lookup("d-1") == Tenant("acme", "plant", "line-1")
    apply_device(devices, CODEC, "d-1", device("d-1", group="line-2"))
    assert devices.lookup("d-1") == Tenant("acme", "plant", "line-2")
    apply_device(devices, CODEC, "d-2", None)
    assert devices.lookup("d-2") is None
    assert len(devices) == 1


def test_a_batch_is_looked_up_as_columns_with_unknown_devices_flagged() -> None:
    devices = DeviceTenants()
    apply_device(devices, CODEC, "d-1", device("d-1"))
    apply_device(devices, CODEC, "d-2", device("d-2", org="globex", project="p", group="g"))
    columns = devices.tenants(["d-2", "nobody", "d-1", "d-2"])
    assert columns.org == ["globex", UNKNOWN.org, "acme", "globex"]
    assert columns.project == ["p", "", "plant", "p"]
    assert columns.group == ["g", "", "line-1", "g"]
    assert columns.unknown == [1]
    assert columns.as_columns()["org"] is columns.org
    assert devices.tenants([]).unknown == []


def test_an_unreadable_record_deletes_its_key_and_raises_for_the_error_channel() -> None:
    devices = DeviceTenants()
    apply_device(devices, CODEC, "d-1", device("d-1"))
    with pytest.raises(UnreadableRecord) as refused:
        apply_device(devices, CODEC, "d-1", b"\x07not avro")
    assert refused.value.reason
    assert devices.lookup("d-1") is None
    with pytest.raises(UnreadableRecord, match="empty tenant"):
        apply_device(devices, CODEC, "d-3", device("d-3", org=""))
    assert devices.lookup("d-3") is None
