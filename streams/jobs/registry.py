"""The device registry on the jobs app: a read-only Faust GlobalTable of ``registry.devices``.

The registry agent owns ``registry.devices`` (compacted, key = device id, Avro ``Device``);
a job reads it through :meth:`streams.jobs.app.JobsApp.devices`, a GlobalTable whose
changelog *is* that topic: every worker of the job holds the whole registry, recovered from
the topic at start and followed while it runs. Jobs never write it (the table refuses).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from faust.tables.globaltable import GlobalTable

from streams.hot.health import UNREGISTERED  # the group of a device the registry does not know


def group_path(device: Mapping[str, Any] | None) -> str:
    """``org/project/group`` of a registry entry; :data:`UNREGISTERED` for none."""
    if not device:
        return UNREGISTERED
    return f"{device['org']}/{device['project']}/{device['group']}"


class ReadOnlyError(TypeError):
    """A job tried to change the registry table: commands go through the registry agent."""


class RegistryTable(GlobalTable):
    """GlobalTable of ``registry.devices``: device id -> the ``Device`` entry as a dict.

    Values are plain dicts (the Avro fields by name), not records, so that a deleted device's
    tombstone is a deletion rather than a decode error. Read with ``devices.get(device_id)``
    or :meth:`group_of`; any write raises :class:`ReadOnlyError`.
    """

    def _changelog_topic_name(self) -> str:
        # Faust names a table's changelog "<app>-<table>-changelog" in places (its partition
        # assignor among them) even when the table was given another topic: this one's is
        # registry.devices.
        if self._changelog_topic is not None:
            return str(self._changelog_topic.get_topic_name())
        return str(super()._changelog_topic_name())

    def group_of(self, device_id: str) -> str:
        """The device's ``org/project/group``, or ``unregistered``."""
        return group_path(self.get(device_id))

    def __setitem__(self, key: Any, value: Any) -> None:
        raise ReadOnlyError("the device registry is read-only (the registry agent writes it)")

    def __delitem__(self, key: Any) -> None:
        raise ReadOnlyError("the device registry is read-only (the registry agent writes it)")

    def on_key_set(self, key: Any, value: Any) -> None:  # update(), setdefault(), ...
        raise ReadOnlyError("the device registry is read-only (the registry agent writes it)")

    def on_key_del(self, key: Any) -> None:
        raise ReadOnlyError("the device registry is read-only (the registry agent writes it)")
