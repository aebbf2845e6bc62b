"""The device registry in the cold path: who each device belongs to, when its rows are loaded.

The cold worker reads ``registry.devices`` (compacted, key = device id, Avro ``Device``, owned
by the registry agent of the hot job) as a read-only global table of the kit
(:class:`streams.runtime.tables.GlobalTable`): read to its end before the first batch, then
followed before each batch it stores. :class:`DeviceTenants` is the lookup: device id ->
:class:`Tenant` (organization, project, group), one at a time (:meth:`DeviceTenants.lookup`)
or for a whole batch (:meth:`DeviceTenants.tenants`, columns ready for Arrow).

A device the registry does not hold (never provisioned, or deleted) has no tenant: its rows
get empty tenant columns (:data:`UNKNOWN`), and :attr:`TenantColumns.unknown` tells which.

**Error channel.** A registry record that does not decode, or decodes to an invalid device,
is dead-lettered through the table's :class:`~streams.runtime.tables.TableErrors` (the worker
writes :meth:`DeviceRegistry.take_dead_letters` into its dead-letter topic) and deletes its key,
as the hot job's registry table does.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from confluent_kafka import Message

from schemas.codec import AvroCodec, Decoded
from streams.runtime.clients import KafkaConfig, registered_codecs
from streams.runtime.records import DeadLetter
from streams.runtime.tables import GlobalTable, TableErrors, UnreadableRecord, key_text

__all__ = [
    "DEVICES",
    "UNKNOWN",
    "DeviceRegistry",
    "DeviceTenants",
    "Tenant",
    "TenantColumns",
    "apply_device",
    "tenant_of",
]

DEVICES: Final = "registry.devices"
DEVICE_SCHEMA: Final = "Device"


@dataclass(frozen=True, slots=True)
class Tenant:
    """Where a device belongs: its organization, project and group (names, as the registry
    spells them; a group name is unique within its project)."""

    org: str
    project: str
    group: str


UNKNOWN: Final = Tenant("", "", "")


@dataclass(frozen=True, slots=True)
class TenantColumns:
    """The tenants of a batch, column by column (row i is device_ids[i]); ``unknown`` holds the
    row indices whose device the registry does not hold (their columns are empty strings)."""

    org: list[str]
    project: list[str]
    group: list[str]
    unknown: list[int]

    def as_columns(self) -> dict[str, list[str]]:
        return {"org": self.org, "project": self.project, "group": self.group}


def tenant_of(record: Mapping[str, Any]) -> Tenant:
    """The tenant of a decoded ``Device`` record; raises UnreadableRecord if it names none."""
    try:
        tenant = Tenant(str(record["org"]), str(record["project"]), str(record["group"]))
    except KeyError as exc:
        raise UnreadableRecord("invalid_record", f"device without {exc}") from None
    if not (tenant.org and tenant.project and tenant.group):
        raise UnreadableRecord("invalid_record", f"device with an empty tenant: {tenant}")
    return tenant


class DeviceTenants:
    """device id -> :class:`Tenant`, thread-safe (applied by the table's reader, looked up by
    the writer thread or anyone else). Pure: tests without services."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tenants: dict[str, Tenant] = {}

    def set(self, device_id: str, tenant: Tenant | None) -> None:
        """The registry's latest word on a device (None: it is gone)."""
        with self._lock:
            if tenant is None:
                self._tenants.pop(device_id, None)
            else:
                self._tenants[device_id] = tenant

    def lookup(self, device_id: str) -> Tenant | None:
        with self._lock:
            return self._tenants.get(device_id)

    def tenants(self, device_ids: Sequence[str]) -> TenantColumns:
        """The tenants of ``device_ids``, as columns (one lock for the batch)."""
        orgs: list[str] = []
        projects: list[str] = []
        groups: list[str] = []
        unknown: list[int] = []
        with self._lock:
            get = self._tenants.get
            for i, device_id in enumerate(device_ids):
                tenant = get(device_id)
                if tenant is None:
                    unknown.append(i)
                    tenant = UNKNOWN
                orgs.append(tenant.org)
                projects.append(tenant.project)
                groups.append(tenant.group)
        return TenantColumns(orgs, projects, groups, unknown)

    def __len__(self) -> int:
        with self._lock:
            return len(self._tenants)


def apply_device(
    devices: DeviceTenants, codec: AvroCodec, device_id: str, value: bytes | None
) -> None:
    """One record of ``registry.devices``: a device's tenant, or its deletion (a tombstone).
    What cannot be used deletes the key, then raises UnreadableRecord (the error channel)."""
    if value is None:
        devices.set(device_id, None)
        return
    decoded = codec.decode(value)
    try:
        if not isinstance(decoded, Decoded):
            raise UnreadableRecord(str(decoded.reason), decoded.detail)
        tenant = tenant_of(decoded.record)
    except UnreadableRecord:
        devices.set(device_id, None)
        raise
    devices.set(device_id, tenant)


class DeviceRegistry:
    """``registry.devices`` followed by the cold worker: :meth:`catch_up` once before loading,
    :meth:`refresh` before each batch (never blocks), :attr:`devices` the lookup."""

    def __init__(
        self, kafka: KafkaConfig, stage: str = "cold", codec: AvroCodec | None = None
    ) -> None:
        self.devices = DeviceTenants()
        self.errors = TableErrors(stage)
        self._codec = codec or registered_codecs(kafka, {DEVICES: DEVICE_SCHEMA})[DEVICES]
        self._table = GlobalTable(kafka, DEVICES, self.apply, errors=self.errors)
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    def apply(self, msg: Message) -> None:
        """One record of the topic (:func:`apply_device`)."""
        apply_device(self.devices, self._codec, key_text(msg), msg.value())

    def catch_up(self) -> int:
        """Block until every device written so far is known (raises if Kafka is away or the
        topic is missing: the caller retries)."""
        applied = self._table.catch_up()
        self._ready = True
        return applied

    def refresh(self) -> int:
        """Apply what the registry wrote since; never blocks."""
        return self._table.poll()

    def take_dead_letters(self) -> list[DeadLetter]:
        """Unreadable registry records not yet written (write them, or hand them back with
        :meth:`returned`)."""
        return self.errors.take()

    def returned(self, dead: Sequence[DeadLetter]) -> None:
        self.errors.returned(dead)

    def close(self) -> None:
        self._table.close()
