"""The Doris tables derived from the Arrow declarations (sinks/doris_ddl.py): their columns,
keys and properties as Doris's SQL (read back with sqlglot's doris dialect, as the stand-in
reads them), and the recorded migrations 1-6 kept as they were applied."""

from __future__ import annotations

import dataclasses
import hashlib

import pyarrow as pa
import pytest
import sqlglot
from sqlglot import exp

from sinks.doris_ddl import (
    DORIS_MIGRATIONS,
    DORIS_TABLES,
    DorisTable,
    create_table_ddl,
    doris_migrations,
    doris_type,
)
from sinks.warehouse_tables import TENANT_COLUMNS

# The sha256 of each recorded migration's statement (replication_num 1). Versions 1-6 were
# queries/doris/ddl/001_telemetry.sql ... 006_quarantine.sql before they were derived.
RECORDED: dict[tuple[int, str], str] = {
    (1, "telemetry"): "04a8d263f6e2039aea4a0f3caf7aee2f91f1ff52d89e11a3c9f8c2c522952048",
    (2, "device_events"): "d661eb88a96ec98465bf40812aab43345b2ffe49b395d1353901750790d286cb",
    (3, "twin_history"): "c2b50ea94f9de238a071e60968c15953c00bfc48715a73b29483a78c80cdbe7e",
    (4, "ota_events"): "1236ab403c2abde00e0a02d4e45151c3d3e1a323bee52ce12ba5bb4e42041213",
    (5, "alerts"): "d23bfac714fcf49200c57bbac6c722d0a3e162ad5010a0275ec920f1969ac748",
    (6, "quarantine"): "0afb2bc5072d573b9821981a8c4c2dff586728ee24d9c2013df6707bc6b7d2d1",
}


def _parsed(statement: str) -> exp.Create:
    tree = sqlglot.parse_one(statement, read="doris")
    assert isinstance(tree, exp.Create)
    return tree


def _columns(tree: exp.Create) -> dict[str, str]:
    """Each column's definition as sqlglot writes it back (type and constraints)."""
    return {c.name: c.sql("doris").split(" ", 1)[1] for c in tree.find_all(exp.ColumnDef)}


def _properties(tree: exp.Create) -> dict[str, str]:
    props = tree.args["properties"].expressions
    return {p.name: p.args["value"].name for p in props if type(p) is exp.Property}


@pytest.mark.parametrize("table", DORIS_TABLES, ids=lambda t: t.name)
def test_a_table_has_its_arrow_columns_and_the_servers_with_the_key_leading(
    table: DorisTable,
) -> None:
    tree = _parsed(create_table_ddl(table))
    columns = _columns(tree)
    server = [c.name for c in table.server_columns]
    assert sorted(columns) == sorted([*table.schema.names, *server])
    assert list(columns)[: len(table.unique_key)] == list(table.unique_key)
    (unique,) = tree.find_all(exp.UniqueKeyProperty)
    assert [e.name for e in unique.expressions] == list(table.unique_key)
    for key in table.unique_key:
        assert columns[key] in ("VARCHAR(256) NOT NULL", "BIGINT NOT NULL", "DATETIME(3) NOT NULL")
    for tenant in TENANT_COLUMNS:
        assert columns[tenant] == "VARCHAR(256) NOT NULL DEFAULT ''"
    assert columns["stored_at"].startswith("DATETIME(3) NULL DEFAULT")  # the load time
    properties = _properties(tree)
    assert properties["enable_unique_key_merge_on_write"] == "true"
    assert properties.get("function_column.sequence_col") == table.sequence_col


def test_nullability_follows_arrow_but_where_doris_declares_otherwise() -> None:
    telemetry, quarantine = DORIS_TABLES[0], DORIS_TABLES[-1]
    columns = _columns(_parsed(create_table_ddl(telemetry)))
    assert (columns["temperature"], columns["ts"]) == ("DOUBLE NULL", "DATETIME(3) NOT NULL")
    assert columns["extra"] == "MAP<STRING, DOUBLE> NULL"  # as version 1 declared it
    quarantined = _columns(_parsed(create_table_ddl(quarantine)))
    assert (quarantined["rule"], quarantined["reason"]) == ("STRING NOT NULL", "STRING NOT NULL")
    assert quarantined["released"] == "TINYINT NOT NULL DEFAULT '0'"


@pytest.mark.parametrize(
    ("arrow", "key", "doris"),
    [
        (pa.string(), True, "VARCHAR(256)"),
        (pa.string(), False, "STRING"),
        (pa.uint32(), False, "BIGINT"),  # Doris's INT is signed
        (pa.int32(), False, "INT"),
        (pa.uint64(), True, "BIGINT"),
        (pa.timestamp("ms", tz="UTC"), False, "DATETIME(3)"),
        (pa.map_(pa.string(), pa.string()), False, "MAP<STRING, STRING>"),
    ],
)
def test_arrow_types_become_doris_types(arrow: pa.DataType, key: bool, doris: str) -> None:
    assert doris_type(arrow, key=key) == doris


def test_a_nullable_or_undeclared_key_is_refused() -> None:
    telemetry = DORIS_TABLES[0]
    with pytest.raises(ValueError, match="NOT NULL"):
        create_table_ddl(dataclasses.replace(telemetry, unique_key=("device_id", "temperature")))
    with pytest.raises(ValueError, match="undeclared"):
        create_table_ddl(dataclasses.replace(telemetry, sequence_col="nowhere"))
    with pytest.raises(ValueError, match="no Doris type"):
        doris_type(pa.list_(pa.int8()))


def test_replication_num_is_applied_to_every_table() -> None:
    for migration in doris_migrations(replication_num=3):
        (statement,) = migration.statements
        properties = _properties(_parsed(statement))
        assert properties["replication_num"] == "3", migration.name
    with pytest.raises(ValueError, match="at least 1"):
        create_table_ddl(DORIS_TABLES[0], replication_num=0)


def test_the_recorded_migrations_keep_their_versions_names_and_statements() -> None:
    current = {
        (m.version, m.name): hashlib.sha256("\n".join(m.statements).encode()).hexdigest()
        for m in DORIS_MIGRATIONS
    }
    assert list(current) == sorted(current), "migrations are applied in version order"
    for recorded, digest in RECORDED.items():
        assert current.get(recorded) == digest, (
            f"Doris migration {recorded} changed, but a Doris that recorded it will never run it "
            "again. Keep that version's statement as it was (leave a column added to the Arrow "
            "declaration out of its CREATE TABLE, e.g. by a field on DorisTable) and add a new "
            "version to DORIS_MIGRATIONS with ALTER TABLE ... ADD COLUMN; re-record the digest "
            "here only for a change that leaves the created table identical."
        )
