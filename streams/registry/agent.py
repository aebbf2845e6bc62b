"""The registry agent: commands on `registry.commands` -> authorized -> `registry.devices`,
and every decision to `audit.log`. I/O-free; the stream worker runs it in its transactions.

The device table is owned per partition (rebuilt from the compacted `registry.devices`, which
is co-partitioned with `registry.commands`), so a command always sees the effect of the one
before it on the same device. Grants are a global table (`rbac.grants`, every worker reads it
whole), applied with :func:`streams.registry.rbac.authorize` inside :func:`streams.registry.apply`.
A command that cannot be read (unknown kind, invalid principal) is a dead letter with its
reason; every readable command leaves exactly one audit record, allowed or not.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from streams.registry.devices import (
    Applied,
    AuditDecision,
    AuditRecord,
    DeviceRecord,
    apply,
    command_from_record,
)
from streams.registry.rbac import GrantSet
from streams.runtime.metrics import counted, counted_by
from streams.runtime.records import DeadLetter, SourceRecord

STAGE = "registry"


@dataclass
class RegistryCounters:
    commands: int = counted("Registry commands handled")
    malformed: int = counted("Registry commands that could not be read")
    decisions: dict[str, int] = counted_by(
        "decision",
        "Registry commands decided, by decision (applied, unchanged, denied, refused)",
        start=lambda: {d.value: 0 for d in AuditDecision},
    )


class RegistryAgent:
    def __init__(self) -> None:
        self.counters = RegistryCounters()
        self.devices: dict[str, DeviceRecord] = {}
        self.partition_of: dict[str, int] = {}
        self.grants: dict[str, GrantSet] = {}

    def set_grants(self, key: str, grants: GrantSet | None) -> None:
        if grants is None:
            self.grants.pop(key, None)
        else:
            self.grants[key] = grants

    def restore(self, partition: int, device_id: str, record: DeviceRecord | None) -> None:
        if record is None:
            self.devices.pop(device_id, None)
            self.partition_of.pop(device_id, None)
        else:
            self.devices[device_id] = record
            self.partition_of[device_id] = partition

    def drop_partitions(self, partitions: set[int]) -> None:
        for device_id in [d for d, p in self.partition_of.items() if p in partitions]:
            self.restore(-1, device_id, None)

    def on_command(
        self,
        source: SourceRecord,
        record: Mapping[str, Any],
        now_ms: int,
        devices: dict[str, DeviceRecord],
        audits: list[AuditRecord],
        dead: list[DeadLetter],
    ) -> None:
        """Apply one command: a changed device goes to `devices`, its decision to `audits`."""
        self.counters.commands += 1
        try:
            command = command_from_record(record)
        except (ValueError, KeyError) as exc:
            self.counters.malformed += 1
            dead.append(DeadLetter(source, "invalid_command", str(exc), stage=STAGE))
            return
        current = self.devices.get(command.device_id)
        result = apply(command, current, self.grants, now_ms)
        audits.append(result.audit)
        self.counters.decisions[result.audit.decision.value] += 1
        if isinstance(result, Applied) and result.record is not current:
            self.devices[command.device_id] = result.record
            self.partition_of[command.device_id] = source.partition
            devices[command.device_id] = result.record
