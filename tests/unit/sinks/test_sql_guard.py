"""The SQL port's statement guard (sinks/sql_guard.py): an allow-list on ClickHouse's own parse.

The tree checks are pure (hand-written trees below); the hostile inputs go through the real
parser, an in-memory chDB in this process (no service), exactly as the query port parses them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from queries.sqltext import NotReadOnly, code_only, load_sql_file
from sinks.clickhouse import ClickHouseSink, QueryFailed
from sinks.sql_guard import (
    Checked,
    Refused,
    check_canonical,
    check_tree,
    format_query_sql,
    parse_tree,
    sql_string,
)

QUERIES = Path(__file__).resolve().parents[3] / "queries"


@pytest.fixture(scope="module")
def warehouse() -> Iterator[ClickHouseSink]:
    """An empty in-memory chDB: the parser needs no tables. Closed at the end of the module,
    so a later test may open a chDB folder in this process."""
    sink = ClickHouseSink("chdb://:memory:", query_timeout_s=10)
    yield sink
    sink.close()


def refusal(warehouse: ClickHouseSink, sql: str) -> str:
    with pytest.raises((Refused, QueryFailed)) as caught:
        warehouse.check(sql)
    return str(caught.value)


# --- allowed ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(QUERIES.glob("*.sql")), ids=lambda p: p.name)
def test_every_analyst_query_file_passes(warehouse: ClickHouseSink, path: Path) -> None:
    sql_file = load_sql_file(path)
    params = {p.name: p.default if p.default is not None else "x" for p in sql_file.params}
    checked = warehouse.check(sql_file.sql, params)
    assert checked.statement == "SELECT"
    assert checked.tables, "an analyst query reads warehouse tables"


@pytest.mark.parametrize(
    ("sql", "statement"),
    [
        ("SELECT 1", "SELECT"),
        ("/* why */ SeLeCt -- a comment\n 1;", "SELECT"),
        ("WITH w AS (SELECT * FROM telemetry) SELECT count() FROM w", "SELECT"),
        ("SELECT (SELECT max(seq) FROM default.telemetry)", "SELECT"),
        ("(SELECT 1) UNION ALL (SELECT 2)", "SELECT"),
        ("SELECT 1 INTERSECT SELECT 2 EXCEPT SELECT 3", "SELECT"),
        ("SELECT * FROM numbers(3) AS n JOIN zeros(3) AS z ON n.number = z.zero", "SELECT"),
        ("SELECT * FROM telemetry FINAL SAMPLE 1/10 PREWHERE seq > 1 ORDER BY ALL", "SELECT"),
        ("SELECT count() OVER w FROM telemetry WINDOW w AS (PARTITION BY device_id)", "SELECT"),
        ("SELECT x -> x + 1, CAST(1 AS String), 1::UInt8, map('a', 1)", "SELECT"),
        ("SELECT COLUMNS('a') APPLY(toString), * EXCEPT (seq) FROM telemetry", "SELECT"),
        ("SELECT * FROM system.one", "SELECT"),
        ("SELECT count() FROM numbers(20) WHERE NOT ignore(sleepEachRow(0.1))", "SELECT"),
        ("SELECT 'filesystem(''/etc'')', 'INSERT; DROP TABLE x'", "SELECT"),
        ("DESCRIBE TABLE telemetry", "DESCRIBE"),
        ("EXISTS TABLE telemetry", "EXISTS"),
        ("SHOW TABLES", "SHOW TABLES"),
        ("EXPLAIN SELECT count() FROM telemetry", "EXPLAIN"),
    ],
)
def test_reads_of_the_warehouse_pass(warehouse: ClickHouseSink, sql: str, statement: str) -> None:
    checked = warehouse.check(sql)
    assert checked.statement == statement
    code = code_only(checked.sql)
    assert ";" not in code
    assert "--" not in code
    assert "/*" not in code


def test_what_is_run_is_the_canonical_text(warehouse: ClickHouseSink) -> None:
    checked = warehouse.check("select /* x */ device_id from telemetry -- y")
    assert checked.sql == "SELECT device_id\nFROM telemetry"
    assert checked.tables == frozenset({"telemetry"})


def test_identifier_parameters_are_bound_before_the_check(warehouse: ClickHouseSink) -> None:
    sql = "SELECT count() FROM {table:Identifier} WHERE startsWith(device_id, {p:String})"
    assert warehouse.check(sql, {"table": "telemetry", "p": "x"}).tables == {"telemetry"}
    qualified = "SELECT * FROM {d:Identifier}.{t:Identifier}"
    assert "system.users" in refusal_with(warehouse, qualified, {"d": "system", "t": "users"})
    forged = {"t": "x\n TableIdentifier y"}
    message = refusal_with(warehouse, "SELECT * FROM {t:Identifier}", forged)
    assert "not a plain name" in message


def refusal_with(warehouse: ClickHouseSink, sql: str, params: dict[str, str]) -> str:
    with pytest.raises((Refused, QueryFailed)) as caught:
        warehouse.check(sql, params)
    return str(caught.value)


# --- refused ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "names"),
    [
        # table functions that reach files, URLs, object stores, other servers
        ("SELECT content FROM filesystem('/work/.state/pki')", "filesystem()"),
        ("select CONTENT from FileSystem('/etc') -- quiet", "FileSystem()"),
        ("SELECT * FROM `filesystem`('/etc')", "filesystem()"),
        ("SELECT * FROM file('/etc/passwd', 'LineAsString')", "file()"),
        ("SELECT * FROM url('http://127.0.0.1:1/', CSV, 'a String')", "url()"),
        ("SELECT * FROM oss('http://127.0.0.1:1/b/k', CSV, 'a String')", "oss()"),
        ("SELECT * FROM cosn('http://127.0.0.1:1/b/k', CSV, 'a String')", "cosn()"),
        ("SELECT * FROM s3('http://127.0.0.1:1/b/k', CSV, 'a String')", "s3()"),
        ("SELECT * FROM remote('127.0.0.1:1', system.one)", "remote()"),
        ("SELECT * FROM mysql('127.0.0.1:1', 'd', 't', 'u', 'p')", "mysql()"),
        ("SELECT * FROM merge('system', '.*')", "merge()"),
        ("SELECT * FROM dictionary('d')", "dictionary()"),
        ("SELECT * FROM executable('x.sh', TSV, 'a String')", "executable()"),
        ("SELECT * FROM loop(numbers(3))", "loop()"),
        # ... nested: joins, IN, scalar subqueries, CTEs, UNION branches, view()
        ("SELECT * FROM numbers(1) JOIN url('http://x/', CSV, 'a String') ON 1", "url()"),
        ("SELECT 1 WHERE 'x' IN (SELECT content FROM filesystem('/'))", "filesystem()"),
        ("SELECT (SELECT any(content) FROM filesystem('/'))", "filesystem()"),
        ("WITH k AS (SELECT * FROM filesystem('/')) SELECT * FROM k", "filesystem()"),
        ("SELECT 1 UNION ALL SELECT count() FROM s3('http://x/b/k')", "s3()"),
        ("SELECT * FROM view(SELECT * FROM filesystem('/'))", "filesystem()"),
        ("SELECT * FROM (SELECT * FROM (SELECT * FROM oss('http://x/b/k')))", "oss()"),
        ("EXPLAIN SELECT * FROM cosn('http://x/b/k')", "cosn()"),
        ("DESCRIBE TABLE file('/etc/passwd')", "file()"),
        # scalar functions that reach outside
        ("SELECT file('/etc/passwd')", "file()"),
        ("SELECT dictGet('d', 'a', 1)", "dictGet()"),
        ("SELECT joinGet('j', 'a', 1)", "joinGet()"),
        ("SELECT hasColumnInTable('127.0.0.1', 'system', 'users', 'name')", "hasColumnInTable()"),
        ("SELECT getSetting('max_execution_time')", "getSetting()"),
        # tables of other databases
        ("SELECT * FROM system.users", "system.users"),
        ("SELECT name FROM `system`.`tables`", "system.tables"),
        ('SELECT * FROM "system".processes', "system.processes"),
        ("SELECT * FROM INFORMATION_SCHEMA.TABLES", "INFORMATION_SCHEMA.TABLES"),
        ("SELECT 1 WHERE 1 IN system.users", "system.users"),
        ("SELECT * FROM telemetry JOIN system.query_log USING (x)", "system.query_log"),
        ("SHOW TABLES FROM system", "SHOW TABLES"),
        ("SHOW DATABASES", "SHOW TABLES"),
        ("SHOW CREATE TABLE telemetry", "SHOW"),
        ("DESCRIBE TABLE system.users", "system.users"),
        ("SELECT 1 WHERE 1 GLOBAL IN system.users", "system.users"),
        ("SELECT * FROM telemetry WHERE device_id IN (SELECT name FROM system.users)", "users"),
        ("SELECT * FROM fileCluster('c', '/x')", "fileCluster()"),
        ("SELECT * FROM icebergLocal('/x')", "icebergLocal()"),
        ("SELECT * FROM (EXPLAIN AST SELECT 1)", "viewExplain()"),
        ("SELECT dictGetOrDefault('d', 'a', 1, 2)", "dictGetOrDefault()"),
        ("EXISTS TABLE system.users", "EXISTS"),
        # settings, outfile, format
        ("SELECT 1 SETTINGS max_execution_time = 0", "SETTINGS"),
        ("select 1 settings readonly = 0", "SETTINGS"),
        ("SELECT * FROM (SELECT 1 SETTINGS max_memory_usage = 0)", "SETTINGS"),
        ("SELECT 1 INTO OUTFILE '/tmp/x'", "INTO OUTFILE"),
        ("EXPLAIN PLAN actions = 1 SELECT 1", "EXPLAIN options"),
        # statements
        ("INSERT INTO telemetry SELECT * FROM telemetry", "INSERT"),
        ("ALTER TABLE telemetry DELETE WHERE 1", "ALTER"),
        ("alter table telemetry update seq = 1 where 1", "ALTER"),
        ("CREATE TABLE x (a Int8) ENGINE = Memory", "CREATE"),
        ("DROP TABLE telemetry", "DROP"),
        ("TRUNCATE TABLE telemetry", "TRUNCATE"),
        ("SYSTEM SHUTDOWN", "SYSTEM"),
        ("KILL QUERY WHERE 1", "KILL"),
        ("SET max_execution_time = 0", "SET"),
        ("USE system", "USE"),
        ("GRANT ALL ON *.* TO default", "GRANT"),
        ("OPTIMIZE TABLE telemetry FINAL", "OPTIMIZE"),
        ("/* SELECT */ DROP TABLE telemetry", "DROP"),
        # more than one statement, forged tree lines
        ("SELECT 1; DROP TABLE telemetry", "Multi-statements"),
        ("SELECT 1; SELECT * FROM filesystem('/')", "Multi-statements"),
        ("SELECT 1 AS `x\n   TableIdentifier telemetry`", "escapes"),
        ("", "empty"),
    ],
)
def test_hostile_statements_are_refused_naming_what(
    warehouse: ClickHouseSink, sql: str, names: str
) -> None:
    message = refusal(warehouse, sql)
    assert names.lower() in message.lower(), message


def test_a_refusal_is_a_not_read_only_error() -> None:
    assert issubclass(Refused, NotReadOnly)


# --- the tree parser and checks, pure ------------------------------------------------------


def test_the_tree_parser_is_strict() -> None:
    good = "SelectWithUnionQuery (children 1)\n ExpressionList (children 1)\n  Literal UInt64_1"
    assert parse_tree(good).children[0].children[0].text == "UInt64_1"
    for bad in (
        "",
        "SelectWithUnionQuery (children 2)\n ExpressionList",  # a child missing
        "SelectWithUnionQuery\n ExpressionList",  # an undeclared child
        "SelectWithUnionQuery (children 1)\n   ExpressionList",  # skipped a level
        "SelectWithUnionQuery\nSelectWithUnionQuery",  # two statements
        "SelectWithUnionQuery (children 1)\n Identifier a\nb",  # a forged line
        "Select-With (children 1)",
    ):
        with pytest.raises(Refused):
            parse_tree(bad)


def _select(*body: str) -> str:
    """A SELECT whose one clause is ``body`` (its lines, indented from level 3)."""
    lines = ["SelectWithUnionQuery (children 1)", " ExpressionList (children 1)"]
    lines.append("  SelectQuery (children 1)")
    return "\n".join(lines + list(body))


def test_unknown_nodes_are_refused_rather_than_guessed() -> None:
    tree = parse_tree(_select("   SomethingNew (children 1)", "    Literal UInt64_1"))
    with pytest.raises(Refused, match="SomethingNew"):
        check_tree(tree, "SELECT 1", "default")


def test_table_functions_are_checked_by_position() -> None:
    table = [
        "   TablesInSelectQuery (children 1)",
        "    TablesInSelectQueryElement (children 1)",
        "     TableExpression (children 1)",
        "      Function s3Cluster (children 1)",
        "       ExpressionList",
    ]
    with pytest.raises(Refused, match=r"s3Cluster\(\)"):
        check_tree(parse_tree(_select(*table)), "SELECT * FROM s3Cluster()", "default")
    allowed = [line.replace("s3Cluster", "numbers") for line in table]
    checked = check_tree(parse_tree(_select(*allowed)), "SELECT * FROM numbers()", "default")
    assert checked == Checked("SELECT * FROM numbers()", "SELECT", frozenset(), {"numbers"})


def test_the_canonical_text_checks() -> None:
    assert check_canonical("SELECT 1\nFORMAT JSON") == "JSON"
    assert check_canonical("SELECT 'FORMAT JSON'") is None
    for bad in (
        "SELECT 1\nINTO OUTFILE 'x'",
        "SELECT `a\\nb`",
        "DROP TABLE t",
        "SELECT 1; SELECT 2",
    ):
        with pytest.raises(Refused):
            check_canonical(bad)


def test_the_query_travels_to_the_parser_as_a_literal() -> None:
    assert sql_string("it's \\ here") == "'it\\'s \\\\ here'"
    assert format_query_sql("SELECT ');DROP'") == "SELECT formatQuery('SELECT \\');DROP\\'')"
