"""SQL text without a database: statements, the read-only guard, query file headers, DDL
migrations and the runner's output formats."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest

from queries.migrations import (
    DDL_DIR,
    Migration,
    MigrationError,
    load_migrations,
    parse_migration,
    pending_migrations,
)
from queries.result import QueryResult
from queries.runner import QueryError, prepare, render
from queries.sqltext import (
    NotReadOnly,
    check_read_only,
    code_only,
    load_sql_file,
    parse_sql_file,
    split_statements,
    strip_comments,
)

QUERIES_DIR = DDL_DIR.parent
ANALYST_FILES = sorted(QUERIES_DIR.glob("*.sql"))

# --- statements ----------------------------------------------------------------------------


def test_statements_split_on_semicolons_outside_quotes_and_comments() -> None:
    script = """
    -- a comment; not a statement
    CREATE TABLE a (s String DEFAULT ';') ENGINE = Memory;
    /* block; comment */ SELECT 'x;y', `odd;name`, "also;odd" FROM a;
    # hash comment; too
    SELECT $$here;doc$$
    """
    assert split_statements(script) == [
        "CREATE TABLE a (s String DEFAULT ';') ENGINE = Memory",
        "SELECT 'x;y', `odd;name`, \"also;odd\" FROM a",
        "SELECT $$here;doc$$",
    ]


def test_escaped_quotes_stay_inside_strings() -> None:
    assert split_statements(r"SELECT 'it\'s; fine', 'a''b;c'; SELECT 2") == [
        r"SELECT 'it\'s; fine', 'a''b;c'",
        "SELECT 2",
    ]


def test_comments_are_stripped_but_strings_kept() -> None:
    assert strip_comments("SELECT '-- not a comment' -- a comment\n") == (
        "SELECT '-- not a comment'"
    )
    assert code_only("SELECT 'INSERT' FROM `file`") == "SELECT '' FROM file"


# --- read-only guard -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1",
        "select count() from telemetry;",
        "  (SELECT 1) UNION ALL (SELECT 2)",
        "WITH x AS (SELECT 1) SELECT * FROM x",
        "SHOW TABLES",
        "DESCRIBE TABLE telemetry",
        "DESC telemetry",
        "EXPLAIN SELECT 1",
        "EXISTS TABLE telemetry",
        "-- header\n/* note */ SELECT 'DROP TABLE x; INSERT'",
        "SELECT device_id AS filename FROM telemetry",
    ],
)
def test_reads_pass_the_guard(sql: str) -> None:
    assert check_read_only(sql)


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("INSERT INTO telemetry VALUES (1)", "read-only"),
        ("/* SELECT */ DROP TABLE telemetry", "read-only"),
        ("-- SELECT\nALTER TABLE telemetry DELETE WHERE 1", "read-only"),
        ("SYSTEM STOP MERGES", "read-only"),
        ("SELECT 1; DROP TABLE telemetry", "one statement"),
        ("SELECT 1; SELECT 2", "one statement"),
        ("SELECT * FROM telemetry INTO OUTFILE '/tmp/x'", "OUTFILE"),
        ("SELECT * FROM file('/etc/passwd', 'LineAsString')", "file"),
        ("SELECT * FROM `file`('/etc/passwd')", "file"),
        ("SELECT * FROM url('http://example.com', 'CSV')", "url"),
        ("WITH 1 AS x SELECT * FROM remote('h', system.one)", "remote"),
        ("", "empty"),
        ("-- only a comment", "empty"),
    ],
)
def test_everything_else_is_refused(sql: str, reason: str) -> None:
    with pytest.raises(NotReadOnly, match=reason):
        check_read_only(sql)


# --- query files ---------------------------------------------------------------------------


def test_a_header_declares_answers_and_params() -> None:
    text = """-- answers: the thing
--          on two lines
-- params: minutes UInt32 60
-- params: prefix String ''; limit UInt32
SELECT {minutes:UInt32}, {prefix:String}, {limit:UInt32};
"""
    sql_file = parse_sql_file(text)
    assert sql_file.answers == "the thing"
    assert [(p.name, p.type, p.default) for p in sql_file.params] == [
        ("minutes", "UInt32", "60"),
        ("prefix", "String", ""),
        ("limit", "UInt32", None),
    ]
    assert sql_file.sql == "SELECT {minutes:UInt32}, {prefix:String}, {limit:UInt32}"
    assert sql_file.bind({"limit": "5"}) == {"minutes": "60", "prefix": "", "limit": "5"}
    with pytest.raises(ValueError, match="missing parameter 'limit'"):
        sql_file.bind({})
    with pytest.raises(ValueError, match="unknown parameter"):
        sql_file.bind({"limit": "1", "minuts": "5"})


PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*):([^}]+)\}")


@pytest.mark.parametrize("path", ANALYST_FILES, ids=lambda p: p.name)
def test_each_analyst_file_says_what_it_answers_and_declares_its_params(path: Path) -> None:
    sql_file = load_sql_file(path)
    assert len(sql_file.answers) > 20
    assert path.read_text().startswith("-- answers:")
    declared = {p.name: p.type for p in sql_file.params}
    used = {name: kind.strip() for name, kind in PLACEHOLDER.findall(sql_file.sql)}
    assert used == declared
    assert all(p.default is not None for p in sql_file.params), "every param has a default"
    assert "device_prefix" in declared
    assert check_read_only(sql_file.sql)


def test_the_required_analyst_questions_have_files() -> None:
    names = {p.stem for p in ANALYST_FILES}
    assert {
        "latest_reading",
        "metric_percentiles",
        "messages_per_minute",
        "silent_devices",
        "battery_drain",
    } <= names


def test_raw_telemetry_is_read_with_final() -> None:
    for path in ANALYST_FILES:
        sql = code_only(load_sql_file(path).sql)
        for match in re.finditer(r"\bFROM\s+(telemetry|device_events)\b(\s+\w+)?", sql):
            assert (match.group(2) or "").strip().upper() == "FINAL", path.name


# --- the runner's preparation and output ---------------------------------------------------


def test_a_file_argument_is_read_with_its_defaults() -> None:
    prepared = prepare("queries/silent_devices.sql", {"minutes": "5"})
    assert prepared.params == {"minutes": "5", "device_prefix": ""}
    assert "-- answers" not in prepared.sql
    assert prepared.sql.startswith("SELECT")
    assert prepared.source.endswith("silent_devices.sql")


def test_runner_errors_are_for_the_user() -> None:
    with pytest.raises(QueryError, match="no such query file"):
        prepare("queries/nope.sql")
    with pytest.raises(QueryError, match="unknown parameter"):
        prepare("queries/silent_devices.sql", {"hours": "1"})
    with pytest.raises(QueryError, match="read-only"):
        prepare("TRUNCATE TABLE telemetry")


def test_an_inline_statement_keeps_its_params() -> None:
    prepared = prepare("SELECT {n:UInt8}", {"n": "3"})
    assert (prepared.sql, prepared.params, prepared.source) == (
        "SELECT {n:UInt8}",
        {"n": "3"},
        "<inline>",
    )


RESULT = QueryResult(
    ("device_id", "ts", "p50", "extra", "message"),
    ("String", "DateTime64(3, 'UTC')", "Float64", "Map(String, Float64)", "Nullable(String)"),
    (
        ("dev-1", "2026-01-01T00:00:01.500000+00:00", 21.25, {"rpm": 1.0}, None),
        ("dev-2", "2026-01-01T00:00:02+00:00", 1e-9, {}, "a,b"),
    ),
)


def test_json_output_is_a_list_of_row_objects() -> None:
    rows = json.loads(render(RESULT, "json"))
    assert rows[0] == {
        "device_id": "dev-1",
        "ts": "2026-01-01T00:00:01.500000+00:00",
        "p50": 21.25,
        "extra": {"rpm": 1.0},
        "message": None,
    }
    assert len(rows) == 2


def test_csv_output_has_a_header_and_quotes() -> None:
    rows = list(csv.reader(io.StringIO(render(RESULT, "csv"))))
    assert rows[0] == list(RESULT.columns)
    assert rows[1] == ["dev-1", "2026-01-01T00:00:01.500000+00:00", "21.25", '{"rpm": 1.0}', ""]
    assert rows[2][2:] == ["1e-09", "{}", "a,b"]


def test_table_output_shows_every_column_and_row() -> None:
    text = render(RESULT, "table", width=160)
    for expected in ("device_id", "p50", "dev-1", "dev-2", "21.25", "2026-01-01 00:00:01.500"):
        assert expected in text
    assert "NULL" in text
    assert "2 rows" in text


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown format"):
        render(RESULT, "xml")  # type: ignore[arg-type]


# --- migrations ----------------------------------------------------------------------------


def test_the_ddl_files_are_ordered_unique_versions() -> None:
    migrations = load_migrations()
    versions = [m.version for m in migrations]
    assert versions == sorted(set(versions))
    assert versions[0] == 1
    names = [m.name for m in migrations]
    assert names[:3] == ["telemetry", "device_events", "telemetry_1m"]
    assert all(m.statements for m in migrations)
    assert len(migrations[2].statements) == 2  # the rollup table and its materialized view


def test_every_ddl_statement_is_idempotent_and_the_tables_are_the_contract() -> None:
    text = " ".join(s for m in load_migrations() for s in m.statements)
    for statement in (s for m in load_migrations() for s in m.statements):
        assert "IF NOT EXISTS" in statement
    for table in ("telemetry", "device_events", "telemetry_1m"):
        assert f"CREATE TABLE IF NOT EXISTS {table}\n" in text
    assert text.count("ORDER BY (device_id, seq)") == 2
    assert text.count("non_replicated_deduplication_window") == 5


def write(folder: Path, name: str, sql: str = "CREATE TABLE IF NOT EXISTS x (a UInt8)") -> None:
    (folder / name).write_text(sql + ";\n")


def test_migrations_load_in_version_order(tmp_path: Path) -> None:
    write(tmp_path, "010_later.sql")
    write(tmp_path, "002_second.sql", "SELECT 1; SELECT 2")
    write(tmp_path, "001_first.sql")
    migrations = load_migrations(tmp_path)
    assert [(m.version, m.name) for m in migrations] == [(1, "first"), (2, "second"), (10, "later")]
    assert migrations[1].statements == ("SELECT 1", "SELECT 2")


@pytest.mark.parametrize("name", ["1_short.sql", "001-dash.sql", "001_Upper.sql", "abc.sql"])
def test_badly_named_ddl_files_are_refused(tmp_path: Path, name: str) -> None:
    write(tmp_path, name)
    with pytest.raises(MigrationError, match="NNN_name"):
        load_migrations(tmp_path)


def test_duplicate_versions_and_empty_files_are_refused(tmp_path: Path) -> None:
    write(tmp_path, "001_a.sql")
    write(tmp_path, "001_b.sql")
    with pytest.raises(MigrationError, match="duplicate"):
        load_migrations(tmp_path)
    (tmp_path / "002_empty.sql").write_text("-- nothing\n")
    with pytest.raises(MigrationError, match="no statement"):
        parse_migration(tmp_path / "002_empty.sql")


def test_only_unrecorded_migrations_are_pending() -> None:
    migrations = (Migration(1, "a", ("x",)), Migration(2, "b", ("y",)), Migration(3, "c", ("z",)))
    assert pending_migrations(migrations, {}) == migrations
    assert pending_migrations(migrations, {1: "a", 2: "b"}) == migrations[2:]
    assert pending_migrations(migrations, {1: "a", 2: "b", 3: "c"}) == ()
    with pytest.raises(MigrationError, match="immutable"):
        pending_migrations(migrations, {1: "renamed"})
