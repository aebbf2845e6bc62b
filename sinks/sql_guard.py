"""The SQL port's statement guard: an allow-list checked on ClickHouse's own parse of the query.

A deny-list of words misses what it does not name (``filesystem()``, ``oss()``, ``cosn()`` and
some fifty other table functions once read the platform's keys or called out), and a scanner of
our own can disagree with ClickHouse's lexer. So the warehouse parses the query itself:

1. ``SELECT formatQuery('<query>')`` parses it (one statement only: a second one after ``;``
   is a syntax error) and prints it canonically: no comments, keywords in capitals, literals
   escaped. That canonical text is what is checked **and** what is run.
2. ``EXPLAIN AST <canonical>`` gives the syntax tree, parsed here (:func:`parse_tree`) strictly:
   an unknown node, a line out of place or a wrong child count refuses the query.
3. :func:`check_tree` walks every node. Allowed: ``SELECT`` (``WITH``, ``UNION``,
   ``INTERSECT``/``EXCEPT``, subqueries, joins) over the warehouse's own tables, ``DESCRIBE``,
   ``EXISTS``, ``SHOW TABLES`` and ``EXPLAIN`` of those; table functions of
   :data:`TABLE_FUNCTIONS` only (they make numbers, nothing else). Refused, with the reason:
   every other statement (writes, DDL, ``SYSTEM``, ``KILL``, ``SET``, ``USE``), any other
   table function (files, URLs, object stores, other servers, dictionaries), tables of another
   database than the warehouse's (``system``, ``information_schema``), a ``SETTINGS`` clause
   (the server's limits stand), ``INTO OUTFILE``, and the scalar functions that reach files,
   dictionaries, other tables or the server's configuration (:data:`DENIED_FUNCTIONS`).

The checks are pure functions of the tree (unit-tested with hostile inputs);
:func:`check_query` ties them to a :class:`Parser`, which the warehouse sink implements over its
own connection (so a ClickHouse server parses with its own version too).

ClickHouse parse errors come back as :class:`Refused` too: a query the parser does not accept
is not run. The engine is the second line: the read connections run with ``readonly=1`` and
the limits set (``sinks.clickhouse.ReadLimits``), so a setting cannot be changed at all.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol

from queries.sqltext import NotReadOnly, Part, scan, split_statements

__all__ = [
    "ALLOWED_NODES",
    "DENIED_FUNCTIONS",
    "SYSTEM_TABLES",
    "TABLE_FUNCTIONS",
    "Checked",
    "Node",
    "Parser",
    "Refused",
    "check_canonical",
    "check_query",
    "check_tree",
    "format_query_sql",
    "parse_tree",
    "sql_string",
]


class Refused(NotReadOnly):
    """A statement the SQL port does not run; the message names what was refused and why."""


# Table functions that only generate rows from their arguments: no file, network, table or
# dictionary behind them. Everything else (file, filesystem, url, s3, oss, cosn, remote, mysql,
# merge, dictionary, executable, ... and those added by future versions) is refused.
TABLE_FUNCTIONS: Final = frozenset(
    {
        "numbers",
        "numbers_mt",
        "zeros",
        "zeros_mt",
        "generate_series",
        "generateseries",
        "values",
        "view",  # view(SELECT ...): its query is checked like any subquery
        "null",
    }
)
# Tables of the `system` database that hold no information: the rest (users, tables,
# processes, settings, query_log, disks, ...) describe the server and its neighbours.
SYSTEM_TABLES: Final = frozenset(
    {"system.one", "system.numbers", "system.numbers_mt", "system.zeros", "system.zeros_mt"}
)
# Scalar functions that reach outside the query's own data: files, dictionaries (and through
# them other servers), Join tables, other servers' tables, models on disk, the server's settings,
# macros, certificates, HTTP headers, and the introspection functions. Matched lower-case, and
# by prefix for the families (dictGet*, joinGet*, addressTo*, ...).
DENIED_FUNCTIONS: Final = frozenset(
    {
        "file",
        "hascolumnintable",
        "catboostevaluate",
        "modelevaluate",
        "naivebayesclassifier",
        "getsetting",
        "getsettingordefault",
        "getserversetting",
        "getmergetreesetting",
        "getmacro",
        "getclienthttpheader",
        "showcertificate",
        "demangle",
        "filesystemavailable",
        "filesystemcapacity",
        "filesystemunreserved",
        "currentprofiles",
        "enabledprofiles",
        "defaultprofiles",
        "currentroles",
        "enabledroles",
        "defaultroles",
        "initialqueryid",
        "queryid",
        "input",
        "sleep",  # sleep(n) holds a thread doing nothing; sleepEachRow is bounded per block
    }
)
DENIED_PREFIXES: Final = ("dict", "joinget", "addressto", "trace", "__")
# IN-family functions whose right side may name a table: `x IN system.users` reads it.
_IN_FUNCTIONS: Final = frozenset(
    {
        "in",
        "notin",
        "globalin",
        "globalnotin",
        "nullin",
        "notnullin",
        "globalnullin",
        "globalnotnullin",
    }
)
# Every node kind the walk knows. Anything else (a statement kind, a construct added by a later
# ClickHouse) is refused rather than guessed about.
ALLOWED_NODES: Final = frozenset(
    {
        "SelectWithUnionQuery",
        "SelectIntersectExceptQuery",
        "SelectQuery",
        "ExpressionList",
        "Identifier",
        "Literal",
        "Function",
        "Asterisk",
        "QualifiedAsterisk",
        "ColumnsRegexpMatcher",
        "ColumnsListMatcher",
        "QualifiedColumnsRegexpMatcher",
        "QualifiedColumnsListMatcher",
        "ColumnsTransformerList",
        "ColumnsApplyTransformer",
        "ColumnsExceptTransformer",
        "ColumnsReplaceTransformer",
        "Replacement",
        "ColumnsReplaceTransformer::Replacement",
        "TablesInSelectQuery",
        "TablesInSelectQueryElement",
        "TableExpression",
        "TableIdentifier",
        "TableJoin",
        "ArrayJoin",
        "Subquery",
        "OrderByElement",
        "WithElement",
        "WindowDefinition",
        "WindowListElement",
        "SampleRatio",
        "QueryParameter",
        "InterpolateElement",
        "Interpolate",
        "DataType",
        "NameTypePair",
        "ColumnDeclaration",
        "Alias",
        "Lambda",
        "StorageOrderBy",
        # statements, allowed only at the root (see _check_root)
        "DescribeQuery",
        "ExistsTableQuery",
        "ShowTables",
        "Explain",
    }
)
_STATEMENTS: Final = frozenset(
    {"SelectWithUnionQuery", "DescribeQuery", "ExistsTableQuery", "ShowTables", "Explain"}
)
EXPLAIN_KINDS: Final = frozenset(
    {
        "EXPLAIN",
        "EXPLAIN AST",
        "EXPLAIN SYNTAX",
        "EXPLAIN PLAN",
        "EXPLAIN PIPELINE",
        "EXPLAIN QUERY TREE",
        "EXPLAIN ESTIMATE",
    }
)

_LINE = re.compile(r"^( *)([A-Za-z_][A-Za-z0-9_:]*)(?: (.*))?$")
_CHILDREN = re.compile(r" \(children (\d+)\)$")
_ALIAS = re.compile(r" \(alias [^()]*\)$")
_SAFE_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_IDENTIFIER_PARAM = re.compile(r"\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*:\s*Identifier\s*\}", re.I)
# The formatter prints these clauses at the start of a line, and nowhere else (a literal's line
# breaks are escaped, identifiers with escapes are refused).
_FORMAT_LINE = re.compile(r"^FORMAT\s+(\S+)\s*$", re.M)
_OUTFILE_LINE = re.compile(r"^INTO OUTFILE\b", re.M)
_FIRST_WORD = re.compile(r"[\s(]*([A-Za-z]+)")
_FIRST_WORDS = frozenset({"SELECT", "WITH", "DESCRIBE", "DESC", "EXISTS", "SHOW", "EXPLAIN"})
_SHOW_TABLES = re.compile(r"SHOW TABLES(?: (?:NOT )?I?LIKE '[^'\\]*')?")
_EXISTS = re.compile(r"EXISTS(?: TABLE)? ([A-Za-z_][A-Za-z0-9_]*)")


@dataclass(frozen=True, slots=True)
class Node:
    """One node of ``EXPLAIN AST``: its kind, the rest of its line (name, alias), children."""

    kind: str
    text: str = ""
    children: tuple[Node, ...] = ()

    @property
    def name(self) -> str:
        """The node's name without its alias: a function's, a table's, a literal."""
        return _ALIAS.sub("", self.text)

    def walk(self) -> Iterator[tuple[Node, Node | None]]:
        """Every node beneath and including this one, with its parent."""
        stack: list[tuple[Node, Node | None]] = [(self, None)]
        while stack:
            node, parent = stack.pop()
            yield node, parent
            stack.extend((child, node) for child in reversed(node.children))


@dataclass(frozen=True, slots=True)
class Checked:
    """A query the guard lets through: run ``sql`` (the canonical text), nothing else."""

    sql: str
    statement: str
    tables: frozenset[str] = field(default_factory=frozenset)
    table_functions: frozenset[str] = field(default_factory=frozenset)
    output_format: str | None = None


class Parser(Protocol):
    """The warehouse's own parser: what :func:`check_query` asks."""

    def format_query(self, sql: str) -> str:
        """``formatQuery(sql)``: raises :class:`Refused` when ClickHouse cannot parse it."""
        ...

    def explain_ast(self, sql: str, params: Mapping[str, str]) -> str:
        """The text of ``EXPLAIN AST <sql>`` (parameters bound); raises :class:`Refused`."""
        ...


# --- the tree ------------------------------------------------------------------------------


def parse_tree(text: str) -> Node:
    """The root node of an ``EXPLAIN AST`` text. Strict: one space of indent per level, every
    ``(children N)`` matched, no stray line; anything else raises :class:`Refused`."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise Refused("refused: the warehouse returned no syntax tree for the query")
    parsed: list[tuple[int, str, str, int]] = []
    for line in lines:
        children = _CHILDREN.search(line)
        match = _LINE.match(line[: children.start()] if children else line)
        if match is None:
            raise Refused(f"refused: unexpected syntax tree line {line.strip()[:60]!r}")
        indent, kind, rest = match.groups()
        count = int(children.group(1)) if children else 0
        parsed.append((len(indent), kind, (rest or "").strip(), count))
    root, end = _build(parsed, 0, 0)
    if end != len(parsed):
        raise Refused("refused: more than one statement in the syntax tree")
    return root


def _build(lines: list[tuple[int, str, str, int]], i: int, depth: int) -> tuple[Node, int]:
    indent, kind, text, count = lines[i]
    if indent != depth:
        raise Refused(f"refused: syntax tree out of shape at {kind}")
    children: list[Node] = []
    i += 1
    while i < len(lines) and lines[i][0] > depth:
        child, i = _build(lines, i, depth + 1)
        children.append(child)
    if len(children) != count:
        raise Refused(f"refused: syntax tree out of shape at {kind} ({len(children)}/{count})")
    return Node(kind, text, tuple(children)), i


# --- the checks (pure) ---------------------------------------------------------------------


def _denied_function(name: str) -> bool:
    lower = name.lower()
    return lower in DENIED_FUNCTIONS or lower.startswith(DENIED_PREFIXES)


def _table_allowed(name: str, database: str) -> bool:
    """A table name as the tree prints it: unqualified names resolve in the warehouse's
    database (or are a WITH name); qualified ones must name it, or a harmless system table."""
    if "." not in name:
        return True
    if name.lower() in SYSTEM_TABLES:
        return True
    db, _, table = name.partition(".")
    return db == database and "." not in table and bool(table)


def _check_node(node: Node, parent: Node | None, database: str, seen: _Seen) -> None:
    kind = node.kind
    if kind not in ALLOWED_NODES:
        raise Refused(f"refused: {kind} is not allowed on the SQL port (read-only SELECT only)")
    if kind in _STATEMENTS and kind != "SelectWithUnionQuery" and parent is not None:
        raise Refused(f"refused: {kind} inside a query")
    if kind == "Function":
        name = node.name.split(" ", 1)[0]
        if parent is not None and parent.kind == "TableExpression":
            if name.lower() not in TABLE_FUNCTIONS:
                raise Refused(
                    f"refused: table function {name}() is not allowed (only "
                    f"{', '.join(sorted(TABLE_FUNCTIONS))}): it could read files or reach "
                    "other servers"
                )
            seen.table_functions.add(name.lower())
        elif _denied_function(name):
            raise Refused(
                f"refused: function {name}() is not allowed: it reaches files, dictionaries, "
                "other tables or the server's configuration"
            )
        elif name.lower() in _IN_FUNCTIONS:
            _check_in_operand(node, database, seen)
    elif kind == "TableIdentifier":
        table = node.name
        if not _table_allowed(table, database):
            raise Refused(
                f"refused: table {table} is not allowed: only the warehouse's own tables "
                f"(database {database!r})"
            )
        seen.tables.add(table)
    elif kind == "Set":
        raise Refused("refused: a SETTINGS clause is not allowed (the port's limits stand)")


def _check_in_operand(node: Node, database: str, seen: _Seen) -> None:
    """``x IN db.table`` reads that table: hold it to the table rule."""
    args = node.children[0].children if node.children else ()
    if len(args) == 2 and args[1].kind == "Identifier":
        table = args[1].name
        if not _table_allowed(table, database):
            raise Refused(f"refused: table {table} is not allowed (IN {table})")
        seen.tables.add(table)


@dataclass
class _Seen:
    tables: set[str] = field(default_factory=set)
    table_functions: set[str] = field(default_factory=set)


def _check_root(root: Node, canonical: str) -> str:
    """The statement kind, if the root is one the port answers."""
    kind = root.kind
    if kind not in _STATEMENTS:
        first = canonical.split(None, 1)[0].upper() if canonical.strip() else kind
        raise Refused(
            f"refused: {first} statements are not allowed: the SQL port answers SELECT, "
            "WITH, UNION, DESCRIBE, EXISTS, SHOW TABLES and EXPLAIN only"
        )
    if kind == "ShowTables" and _SHOW_TABLES.fullmatch(canonical.strip()) is None:
        raise Refused("refused: SHOW TABLES lists the warehouse's tables only (no FROM, no IN)")
    if kind == "ExistsTableQuery" and _EXISTS.fullmatch(canonical.strip()) is None:
        raise Refused("refused: EXISTS [TABLE] name, of a warehouse table only")
    if kind == "Explain":
        explain = root.name.strip()
        if explain not in EXPLAIN_KINDS:
            raise Refused(f"refused: {explain} is not allowed")
    return {
        "SelectWithUnionQuery": "SELECT",
        "DescribeQuery": "DESCRIBE",
        "ExistsTableQuery": "EXISTS",
        "ShowTables": "SHOW TABLES",
        "Explain": "EXPLAIN",
    }[kind]


def _root_clauses(root: Node) -> list[Node]:
    """The root's children after its body: FORMAT (an Identifier), INTO OUTFILE (a Literal),
    SETTINGS (a Set), as the tree prints them. The body itself is walked as usual."""
    if root.kind == "SelectWithUnionQuery":
        return list(root.children[1:])
    if root.kind in ("ShowTables", "ExistsTableQuery"):
        return list(root.children)
    return [c for c in root.children if c.kind in ("Identifier", "Literal", "Set")]


def check_canonical(canonical: str) -> str | None:
    """Checks on the canonical text itself; returns its FORMAT, if any.

    Refuses a second statement, ``INTO OUTFILE``, and quoted identifiers holding escapes or
    control characters (the tree prints names raw: a name with a line break could forge lines).
    """
    if len(split_statements(canonical)) != 1:
        raise Refused("refused: one statement at a time")
    for kind, text in scan(canonical):
        if kind is Part.quoted and text[:1] in '`"' and re.search(r"[\\\x00-\x1f\x7f]", text):
            raise Refused(f"refused: quoted identifier {text[:40]!r} holds escapes")
    first = _FIRST_WORD.match(canonical)
    if first is None or first.group(1).upper() not in _FIRST_WORDS:
        word = first.group(1).upper() if first else canonical[:20]
        raise Refused(
            f"refused: {word} statements are not allowed: the SQL port answers SELECT, "
            "WITH, UNION, DESCRIBE, EXISTS, SHOW TABLES and EXPLAIN only"
        )
    code = " ".join(text for kind, text in scan(canonical) if kind is Part.code)
    if re.search(r"\bSETTINGS\b", code):
        raise Refused("refused: a SETTINGS clause is not allowed (the port's limits stand)")
    if _OUTFILE_LINE.search(canonical):
        raise Refused("refused: INTO OUTFILE is not allowed (the port writes no files)")
    formats = _FORMAT_LINE.findall(canonical)
    return formats[-1] if formats else None


def check_tree(root: Node, canonical: str, database: str) -> Checked:
    """The guard's decision on a parsed tree (pure). Raises :class:`Refused`."""
    statement = _check_root(root, canonical)
    clauses = _root_clauses(root)
    for clause in clauses:
        if clause.kind == "Set" and root.kind == "Explain":
            raise Refused("refused: EXPLAIN options are not allowed")
        if clause.kind == "Set":
            raise Refused("refused: a SETTINGS clause is not allowed (the port's limits stand)")
        if clause.kind == "Literal":
            raise Refused("refused: INTO OUTFILE is not allowed (the port writes no files)")
    seen = _Seen()
    skip = {id(clause) for clause in clauses if clause.kind == "Identifier"}
    for node, parent in root.walk():
        if id(node) in skip:
            continue
        _check_node(node, parent, database, seen)
    return Checked(
        sql=canonical,
        statement=statement,
        tables=frozenset(seen.tables),
        table_functions=frozenset(seen.table_functions),
    )


def _check_params(canonical: str, params: Mapping[str, str]) -> None:
    """``{name:Identifier}`` parameters must be plain names (the tree prints them raw)."""
    for name in _IDENTIFIER_PARAM.findall(canonical):
        value = params.get(name)
        if value is not None and _SAFE_IDENTIFIER.fullmatch(value) is None:
            raise Refused(f"refused: identifier parameter {name!r} is not a plain name")


def sql_string(text: str) -> str:
    """``text`` as a ClickHouse string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def format_query_sql(sql: str) -> str:
    """The statement that asks the warehouse to parse and print ``sql`` (no injection: the
    query travels as a string literal)."""
    return f"SELECT formatQuery({sql_string(sql)})"


def check_query(
    sql: str, params: Mapping[str, str], parser: Parser, database: str = "default"
) -> Checked:
    """Parse ``sql`` with the warehouse's parser and check it; the :class:`Checked` query's
    ``sql`` is the one to run. Raises :class:`Refused` (a parse error included)."""
    if not sql.strip():
        raise Refused("refused: empty query")
    canonical = parser.format_query(sql).strip()
    output_format = check_canonical(canonical)
    # FORMAT is the protocol's business: checked and run without it, handed back apart.
    body = _FORMAT_LINE.sub("", canonical).strip()
    _check_params(body, params)
    tree = parse_tree(parser.explain_ast(body, params))
    checked = check_tree(tree, body, database)
    return Checked(
        checked.sql, checked.statement, checked.tables, checked.table_functions, output_format
    )
