"""The Apache Doris tables, derived from the Arrow declarations (pure): one
:class:`DorisTable` per table says what Arrow does not (its UNIQUE KEY, its sequence column, the
columns the server fills), and :func:`create_table_ddl` writes its ``CREATE TABLE``.

The statements are the Doris sink's versioned migrations (:data:`DORIS_MIGRATIONS`), recorded in
its ``schema_migrations`` by version and name like ``queries/ddl/`` on ClickHouse. A recorded
migration is immutable: a Doris that applied version 1 never runs it again, so a column added to
a declaration later reaches it only through a new version (an ``ALTER TABLE ... ADD COLUMN``),
never through an edited version 1. tests/unit/sinks/test_doris_ddl.py pins versions 1-6.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import pyarrow as pa

from queries.migrations import Migration
from sinks import warehouse_tables as tables
from sinks.quality.quarantine import QUARANTINE_SCHEMA

__all__ = [
    "DORIS_MIGRATIONS",
    "DORIS_TABLES",
    "DorisTable",
    "ServerColumn",
    "column_definitions",
    "create_table_ddl",
    "doris_migrations",
    "doris_type",
    "schema_migrations_ddl",
]


@dataclass(frozen=True, slots=True)
class ServerColumn:
    """A column Doris fills itself, so the loads (and Arrow) do not carry it."""

    name: str
    definition: str  # type, nullability and default as Doris writes them


# When the row was stored: every table has it.
STORED_AT: Final = ServerColumn("stored_at", "DATETIME(3) NULL DEFAULT CURRENT_TIMESTAMP(3)")


@dataclass(frozen=True, slots=True)
class DorisTable:
    """One warehouse table as Doris declares it; its columns are ``schema``'s."""

    version: int  # the migration that creates it: recorded, so never renumbered
    name: str
    schema: pa.Schema
    unique_key: tuple[str, ...]
    sequence_col: str | None = None
    server_columns: tuple[ServerColumn, ...] = (STORED_AT,)
    not_null: frozenset[str] = frozenset()  # Arrow-nullable columns Doris declares NOT NULL


# Key columns are VARCHAR (Doris refuses STRING in a key); tenant columns too, as the row
# filters compare them. Other text is STRING: Doris allows it in any value column.
_KEY_TEXT: Final = "VARCHAR(256)"
_TEXT: Final = "STRING"
# Doris integers are signed: an unsigned Arrow integer takes the next wider one.
_INTEGERS: Final = {
    pa.int8(): "TINYINT",
    pa.uint8(): "SMALLINT",
    pa.int16(): "SMALLINT",
    pa.uint16(): "INT",
    pa.int32(): "INT",
    pa.uint32(): "BIGINT",
    pa.int64(): "BIGINT",
    pa.uint64(): "BIGINT",  # seq and versions stay far below 2**63
}
_SCALARS: Final = {pa.float64(): "DOUBLE", pa.float32(): "FLOAT", pa.bool_(): "BOOLEAN"}


def doris_type(data_type: pa.DataType, *, key: bool = False) -> str:
    """The Doris type of an Arrow type (``key``: a key or tenant column, VARCHAR for text)."""
    if pa.types.is_string(data_type) or pa.types.is_large_string(data_type):
        return _KEY_TEXT if key else _TEXT
    if pa.types.is_timestamp(data_type) and data_type.unit == "ms":
        return "DATETIME(3)"
    if isinstance(data_type, pa.MapType):
        return f"MAP<{doris_type(data_type.key_type)}, {doris_type(data_type.item_type)}>"
    found = _INTEGERS.get(data_type) or _SCALARS.get(data_type)
    if found is None:
        raise ValueError(f"no Doris type for Arrow {data_type}")
    return found


def _definition(column: pa.Field, table: DorisTable) -> str:
    key = column.name in table.unique_key
    tenant = column.name in tables.TENANT_COLUMNS
    type_ = doris_type(column.type, key=key or tenant)
    if tenant:  # empty until the registry tells the device's tenant
        return f'{type_} NOT NULL DEFAULT ""'
    if key and column.nullable:
        raise ValueError(f"{table.name}.{column.name}: a key column must be NOT NULL in Arrow")
    # MAP columns stay NULL, as the tables the first migrations created have them.
    nullable = isinstance(column.type, pa.MapType) or (
        column.nullable and column.name not in table.not_null
    )
    return f"{type_} {'NULL' if nullable else 'NOT NULL'}"


def column_definitions(table: DorisTable) -> tuple[tuple[str, str], ...]:
    """(name, definition) in Doris's order: the key first (Doris requires it to lead, in key
    order), then the other Arrow columns, the server's, and the tenant last (as on ClickHouse,
    where it came later)."""
    fields = {f.name: f for f in table.schema}
    server = {c.name for c in table.server_columns}
    if server & fields.keys():
        raise ValueError(f"{table.name}: {sorted(server & fields.keys())} are Arrow columns")
    needed = {*table.unique_key, *([table.sequence_col] if table.sequence_col else [])}
    if needed - fields.keys() - server:
        raise ValueError(f"{table.name}: {sorted(needed - fields.keys() - server)} undeclared")
    rest = [n for n in fields if n not in table.unique_key and n not in tables.TENANT_COLUMNS]
    arrow = [fields[n] for n in (*table.unique_key, *rest)]
    tenant = [fields[n] for n in tables.TENANT_COLUMNS if n in fields]
    return (
        *((f.name, _definition(f, table)) for f in arrow),
        *((c.name, c.definition) for c in table.server_columns),
        *((f.name, _definition(f, table)) for f in tenant),
    )


def _quoted(name: str) -> str:
    return f"`{name}`"  # every name: `group` is a reserved word


def _properties(table: DorisTable, replication_num: int) -> str:
    pairs = [("enable_unique_key_merge_on_write", "true")]
    if table.sequence_col:
        pairs.append(("function_column.sequence_col", table.sequence_col))
    pairs.append(("replication_num", str(replication_num)))
    return ",\n".join(f'    "{k}" = "{v}"' for k, v in pairs)


def create_table_ddl(table: DorisTable, replication_num: int = 1) -> str:
    """``CREATE TABLE IF NOT EXISTS``: UNIQUE KEY with merge-on-write, hashed on the first key
    column into automatic buckets, ``replication_num`` copies of each tablet."""
    if replication_num < 1:
        raise ValueError(f"replication_num must be at least 1, not {replication_num}")
    columns = column_definitions(table)
    width = max(len(_quoted(name)) for name, _ in columns)
    lines = ",\n".join(f"    {_quoted(n).ljust(width)} {d}" for n, d in columns)
    key = ", ".join(_quoted(k) for k in table.unique_key)
    return (
        f"CREATE TABLE IF NOT EXISTS {_quoted(table.name)} (\n{lines}\n)\n"
        f"UNIQUE KEY({key})\n"
        f"DISTRIBUTED BY HASH({_quoted(table.unique_key[0])}) BUCKETS AUTO\n"
        f"PROPERTIES (\n{_properties(table, replication_num)}\n)"
    )


def schema_migrations_ddl(replication_num: int = 1) -> str:
    """The table recording which versions were applied (by name, to catch a renamed one)."""
    return (
        "CREATE TABLE IF NOT EXISTS schema_migrations (\n"
        "    version INT NOT NULL,\n"
        "    name VARCHAR(256) NOT NULL,\n"
        "    applied_at DATETIME(3) NULL\n"
        ") UNIQUE KEY(version)\n"
        "DISTRIBUTED BY HASH(version) BUCKETS 1\n"
        f'PROPERTIES ("replication_num" = "{replication_num}")'
    )


def _declared(
    version: int, name: str, unique_key: tuple[str, ...], sequence_col: str | None = None
) -> DorisTable:
    """A table whose columns are the loads' (:data:`sinks.warehouse_tables.ARROW_SCHEMAS`)."""
    return DorisTable(version, name, tables.ARROW_SCHEMAS[name], unique_key, sequence_col)


DORIS_TABLES: Final = (
    # One row per telemetry message. UNIQUE KEY (device_id, seq) with merge-on-write: a message
    # re-sent in another batch replaces its row instead of doubling it; the sequence column
    # received_at keeps the copy the bridge received last, whatever order the loads commit in.
    # A re-sent whole batch is refused by its Stream Load label first.
    _declared(1, tables.TELEMETRY_TABLE, ("device_id", "seq"), "received_at"),
    # One row per device lifecycle event: telemetry's exactly-once design.
    _declared(2, tables.EVENTS_TABLE, ("device_id", "seq"), "received_at"),
    # One row per device-twin version (topic twin.state). The sequence column last_reported_seq
    # keeps the newest report when the hot worker re-publishes a version (as
    # ReplacingMergeTree(last_reported_seq) does on ClickHouse).
    _declared(3, tables.TWIN_HISTORY_TABLE, ("device_id", "version"), "last_reported_seq"),
    # One row per (rollout, cohort) per rollout version (topic ota.rollouts). No sequence
    # column: the cold worker keeps the newest of the versions sharing a millisecond within a
    # batch, and batches load in topic order from its one writer thread.
    _declared(4, tables.OTA_EVENTS_TABLE, ("rollout_id", "cohort", "updated_at")),
    # A raise and its resolve share alert_id (from device, rule and raising seq), so the key is
    # (alert_id, status): a re-delivered record replaces itself, a resolve never its raise.
    _declared(5, tables.ALERTS_TABLE, ("alert_id", "status")),
    # Telemetry rows the quality gate refused, with the rule, the reason and the batch. The
    # sequence column `released` keeps the released copy once `fleet quality release` wrote it.
    DorisTable(
        6,
        tables.QUARANTINE_TABLE,
        QUARANTINE_SCHEMA,
        ("device_id", "seq"),
        sequence_col="released",
        server_columns=(STORED_AT, ServerColumn("released", 'TINYINT NOT NULL DEFAULT "0"')),
        not_null=frozenset({"rule", "reason"}),  # the gate always gives both
    ),
)


def doris_migrations(replication_num: int = 1) -> tuple[Migration, ...]:
    """One migration per table, named after it, in version order."""
    ordered = sorted(DORIS_TABLES, key=lambda t: t.version)
    return tuple(
        Migration(t.version, t.name, (create_table_ddl(t, replication_num),)) for t in ordered
    )


DORIS_MIGRATIONS: Final = doris_migrations()
