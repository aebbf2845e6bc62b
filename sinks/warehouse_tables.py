"""The warehouse's tables as the sinks write them: names, keys and Arrow columns (pure).

Every table an analyst reads carries its rows' tenant (:data:`TENANT_COLUMNS`: organization,
project, group), as the device registry said when the row was loaded: the query port's row
filters and a ClickHouse server's row policies limit each analyst to the granted ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final, TypeAlias

import pyarrow as pa

TELEMETRY_TABLE: Final = "telemetry"
EVENTS_TABLE: Final = "device_events"
TWIN_HISTORY_TABLE: Final = "twin_history"
OTA_EVENTS_TABLE: Final = "ota_events"
ALERTS_TABLE: Final = "alerts"
QUARANTINE_TABLE: Final = "quarantine"  # rows the quality gate refused (sinks/quality/)
# The tables keyed on (device_id, seq): what the count helpers (STORED_SQL, DUPLICATES_SQL)
# and `fleet demo` count. twin_history is keyed on (device_id, version), so it is not here.
DEDUPLICATED_TABLES: Final = frozenset({TELEMETRY_TABLE, EVENTS_TABLE})
# The tables write_arrow inserts into (each with a dedup token): the columns after device_id
# that the token hashes, sorted by. (device_id, seq) identifies a message; a twin version may
# be re-published with only last_reported_seq advanced, a copy that must not be dropped as a
# re-delivery, so its token hashes that too.
TOKEN_KEYS: Final[Mapping[str, tuple[str, ...]]] = {
    TELEMETRY_TABLE: ("seq",),
    EVENTS_TABLE: ("seq",),
    TWIN_HISTORY_TABLE: ("version", "last_reported_seq"),
    # (rollout_id, cohort, updated_at) identifies a row. Two rollout versions written in the
    # same millisecond share it: their tokens differ by state and counts, so the later one is
    # not dropped at insert (and, inserted last, it is the copy FINAL keeps).
    OTA_EVENTS_TABLE: (
        "cohort",
        "updated_at",
        "state",
        "current_cohort",
        "devices",
        "planned",
        "skipped",
        "sent",
        "in_progress",
        "succeeded",
        "failed",
        "rollback_sent",
        "rolled_back",
        "rollback_failed",
    ),
    ALERTS_TABLE: ("alert_id", "status"),
    QUARANTINE_TABLE: ("seq",),
}
# The first (string) key a token hashes, when a table is not keyed on device_id.
TOKEN_ID_COLUMN: Final[Mapping[str, str]] = {OTA_EVENTS_TABLE: "rollout_id"}

# Every table's rows carry their device's tenant (queries/ddl/006_tenant_columns.sql): the
# query port's row filters and a server's row policies limit analysts on these.
TENANT_COLUMNS: Final = ("org", "project", "group")
TENANT_TABLES: Final = frozenset(
    {
        TELEMETRY_TABLE,
        EVENTS_TABLE,
        TWIN_HISTORY_TABLE,
        OTA_EVENTS_TABLE,
        ALERTS_TABLE,
        QUARANTINE_TABLE,
    }
)
# Tables whose rows are derived from a tenant table's and carry its tenant columns.
ROLLUP_TABLES: Final = frozenset({"telemetry_1m"})
# Columns of a batch given apart from its records (the tenants, looked up for the whole batch).
Columns: TypeAlias = Mapping[str, Sequence[Any]]

_MS_UTC = pa.timestamp("ms", tz="UTC")
_TENANT_FIELDS = [pa.field(name, pa.string(), nullable=False) for name in TENANT_COLUMNS]
# A device's row starts with the device and its tenant; a device message's (telemetry, events,
# and the quarantine built from telemetry) goes on with its sequence number and times.
_DEVICE_FIELDS = [pa.field("device_id", pa.string(), nullable=False), *_TENANT_FIELDS]
_MESSAGE_FIELDS = [
    *_DEVICE_FIELDS,
    pa.field("seq", pa.uint64(), nullable=False),
    pa.field("ts", _MS_UTC, nullable=False),
    pa.field("received_at", _MS_UTC, nullable=False),
]
TELEMETRY_SCHEMA: Final = pa.schema(
    [
        *_MESSAGE_FIELDS,
        pa.field("temperature", pa.float64()),
        pa.field("humidity", pa.float64()),
        pa.field("battery", pa.float64()),
        pa.field("vibration_rms", pa.float64()),
        pa.field("extra", pa.map_(pa.string(), pa.float64()), nullable=False),
    ]
)
EVENT_SCHEMA: Final = pa.schema(
    [
        *_MESSAGE_FIELDS,
        pa.field("type", pa.string(), nullable=False),
        pa.field("message", pa.string()),
        pa.field("attributes", pa.map_(pa.string(), pa.string()), nullable=False),
    ]
)
# Documents as compact JSON text; delta is streams.hot.twin.delta as JSON, delta_keys its number
# of top-level keys (0: the device has converged).
TWIN_HISTORY_SCHEMA: Final = pa.schema(
    [
        *_DEVICE_FIELDS,
        pa.field("version", pa.uint64(), nullable=False),
        pa.field("updated_at", _MS_UTC, nullable=False),
        pa.field("desired", pa.string(), nullable=False),
        pa.field("reported", pa.string(), nullable=False),
        pa.field("delta", pa.string(), nullable=False),
        pa.field("delta_keys", pa.uint32(), nullable=False),
        pa.field("last_reported_seq", pa.int64(), nullable=False),
    ]
)
_COUNT = pa.uint32()
# One row per (rollout, cohort) of a rollout version; the counts are devices of the cohort per
# progress status (in_progress = downloading + verifying + installing).
OTA_EVENTS_SCHEMA: Final = pa.schema(
    [
        pa.field("rollout_id", pa.string(), nullable=False),
        *_TENANT_FIELDS,
        pa.field("updated_at", _MS_UTC, nullable=False),
        pa.field("state", pa.string(), nullable=False),
        pa.field("version", pa.string(), nullable=False),
        pa.field("target", pa.string(), nullable=False),
        pa.field("current_cohort", pa.int32(), nullable=False),
        pa.field("cohort", _COUNT, nullable=False),
        pa.field("devices", _COUNT, nullable=False),
        pa.field("planned", _COUNT, nullable=False),
        pa.field("skipped", _COUNT, nullable=False),
        pa.field("sent", _COUNT, nullable=False),
        pa.field("in_progress", _COUNT, nullable=False),
        pa.field("succeeded", _COUNT, nullable=False),
        pa.field("failed", _COUNT, nullable=False),
        pa.field("rollback_sent", _COUNT, nullable=False),
        pa.field("rolled_back", _COUNT, nullable=False),
        pa.field("rollback_failed", _COUNT, nullable=False),
        pa.field("reason", pa.string()),
    ]
)
# One row per alert lifecycle record (Avro Alert; the enums as their names).
ALERTS_SCHEMA: Final = pa.schema(
    [
        *_DEVICE_FIELDS,
        pa.field("alert_id", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("rule_id", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("value", pa.float64()),
        pa.field("threshold", pa.float64(), nullable=False),
        pa.field("severity", pa.string(), nullable=False),
        pa.field("seq", pa.int64(), nullable=False),
        pa.field("ts", _MS_UTC, nullable=False),
    ]
)
# The tables a sink's `write` takes rows for, and their columns.
ARROW_SCHEMAS: Final[Mapping[str, pa.Schema]] = {
    TELEMETRY_TABLE: TELEMETRY_SCHEMA,
    EVENTS_TABLE: EVENT_SCHEMA,
    TWIN_HISTORY_TABLE: TWIN_HISTORY_SCHEMA,
    OTA_EVENTS_TABLE: OTA_EVENTS_SCHEMA,
    ALERTS_TABLE: ALERTS_SCHEMA,
}
