"""SQL text handling with no database: comments, statements, file headers, read-only guard.

A tiny scanner splits SQL into code, quoted text and comments the way ClickHouse's lexer
does (``'…'`` strings with backslash or doubled-quote escapes, `` `…` `` and ``"…"``
identifiers, ``$tag$…$tag$`` heredocs, ``--``, ``#`` and ``/* */`` comments), so a ``;`` or a
keyword inside a string or a comment is never taken for code.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

__all__ = [
    "NotReadOnly",
    "Param",
    "SqlFile",
    "check_read_only",
    "code_only",
    "load_sql_file",
    "parse_sql_file",
    "split_statements",
    "strip_comments",
]


class Part(Enum):
    code = "code"
    quoted = "quoted"
    comment = "comment"


_HEREDOC = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")


def _quoted_end(sql: str, start: int, quote: str) -> int:
    """Index just past the quoted text opened at ``start`` (or the end of ``sql``)."""
    i = start + 1
    while i < len(sql):
        char = sql[i]
        if char == "\\":
            i += 2
            continue
        if char == quote:
            if i + 1 < len(sql) and sql[i + 1] == quote:
                i += 2
                continue
            return i + 1
        i += 1
    return len(sql)


def _comment_end(sql: str, start: int) -> int:
    if sql.startswith("/*", start):
        end = sql.find("*/", start + 2)
        return len(sql) if end < 0 else end + 2
    end = sql.find("\n", start)
    return len(sql) if end < 0 else end


def _special_end(sql: str, i: int) -> tuple[Part, int] | None:
    """The part starting at ``i`` and where it ends, if ``i`` opens a quote or a comment."""
    char = sql[i]
    if char in "'\"`":
        return Part.quoted, _quoted_end(sql, i, char)
    if sql.startswith(("--", "/*"), i) or char == "#":
        return Part.comment, _comment_end(sql, i)
    if char == "$":
        heredoc = _HEREDOC.match(sql, i)
        if heredoc:
            end = sql.find(heredoc.group(0), heredoc.end())
            return Part.quoted, len(sql) if end < 0 else end + len(heredoc.group(0))
    return None


def scan(sql: str) -> Iterator[tuple[Part, str]]:
    """``sql`` as consecutive (kind, text) parts; their texts join back to ``sql``."""
    code_start = i = 0
    while i < len(sql):
        special = _special_end(sql, i)
        if special is None:
            i += 1
            continue
        if i > code_start:
            yield Part.code, sql[code_start:i]
        kind, end = special
        yield kind, sql[i:end]
        code_start = i = end
    if code_start < len(sql):
        yield Part.code, sql[code_start:]


def strip_comments(sql: str) -> str:
    """``sql`` without its comments (a comment becomes one space, line comments keep '\\n')."""
    return "".join(" " if kind is Part.comment else text for kind, text in scan(sql)).strip()


def code_only(sql: str) -> str:
    """``sql`` with comments dropped and string literals emptied: what keyword checks read.

    Quoted identifiers (`` `name` ``, ``"name"``) keep their name, unquoted: ClickHouse
    accepts a quoted function name, so the checks must see it.
    """
    out = []
    for kind, text in scan(sql):
        if kind is Part.code:
            out.append(text)
        elif kind is Part.comment:
            out.append(" ")
        elif text[0] in '`"':
            out.append(text[1:-1] if len(text) >= 2 and text[-1] == text[0] else text[1:])
        else:
            out.append("''")
    return "".join(out)


def split_statements(sql: str) -> list[str]:
    """The statements of a script, comments removed, split on ``;`` outside quotes."""
    statements: list[str] = []
    current: list[str] = []
    for kind, text in scan(sql):
        if kind is Part.comment:
            current.append(" ")
            continue
        if kind is Part.quoted:
            current.append(text)
            continue
        pieces = text.split(";")
        for piece in pieces[:-1]:
            current.append(piece)
            statements.append("".join(current))
            current = []
        current.append(pieces[-1])
    statements.append("".join(current))
    return [s.strip() for s in statements if s.strip()]


# --- read-only guard -----------------------------------------------------------------------

READ_ONLY_KEYWORDS = frozenset({"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXPLAIN", "EXISTS"})
# Table functions that reach files, the network or programs: a query server answering on
# loopback must not become a way to read the owner's files or call out.
_DENIED_FUNCTIONS = (
    "file|fileCluster|url|urlCluster|s3|s3Cluster|gcs|hdfs|hdfsCluster|azureBlobStorage|"
    "azureBlobStorageCluster|remote|remoteSecure|cluster|clusterAllReplicas|mysql|postgresql|"
    "sqlite|mongodb|redis|jdbc|odbc|executable|executablePool|input|python|dictionary"
)
_DENIED_FUNCTION = re.compile(rf"\b({_DENIED_FUNCTIONS})\s*\(", re.IGNORECASE)
_INTO_OUTFILE = re.compile(r"\bINTO\s+OUTFILE\b", re.IGNORECASE)
_FIRST_WORD = re.compile(r"[\s(]*([A-Za-z]+)")


class NotReadOnly(ValueError):
    """A statement the read-only query path refuses, with the reason."""


def check_read_only(sql: str) -> str:
    """The one statement in ``sql`` (comments and a trailing ``;`` removed) if it only reads.

    Raises :class:`NotReadOnly` for anything else. This is a guard for clear errors; the
    query path also runs with the ``readonly=2`` setting, which the engine enforces.
    """
    statements = split_statements(sql)
    if not statements:
        raise NotReadOnly("empty query")
    if len(statements) > 1:
        raise NotReadOnly("one statement at a time")
    statement = statements[0]
    code = code_only(statement)
    first = _FIRST_WORD.match(code)
    keyword = first.group(1).upper() if first else ""
    if keyword not in READ_ONLY_KEYWORDS:
        allowed = ", ".join(sorted(READ_ONLY_KEYWORDS))
        raise NotReadOnly(f"only read-only statements ({allowed}) are allowed, got {keyword!r}")
    if _INTO_OUTFILE.search(code):
        raise NotReadOnly("INTO OUTFILE is not allowed")
    denied = _DENIED_FUNCTION.search(code)
    if denied:
        raise NotReadOnly(f"table function {denied.group(1)}() is not allowed")
    return statement


# --- analyst SQL files ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Param:
    """One query parameter a file declares: ``-- params: name Type default``."""

    name: str
    type: str
    default: str | None


@dataclass(frozen=True, slots=True)
class SqlFile:
    """An analyst query file: what it answers, its parameters, and the statement."""

    answers: str
    params: tuple[Param, ...]
    sql: str

    def bind(self, given: Mapping[str, str]) -> dict[str, str]:
        """Parameter values for a run: the given ones over the declared defaults."""
        known = {p.name for p in self.params}
        unknown = sorted(set(given) - known)
        if unknown:
            raise ValueError(f"unknown parameter(s) {unknown}; this query takes {sorted(known)}")
        values: dict[str, str] = {}
        for param in self.params:
            value = given.get(param.name, param.default)
            if value is None:
                raise ValueError(f"missing parameter {param.name!r} ({param.type})")
            values[param.name] = value
        return values


_HEADER = re.compile(r"^\s*--\s*(answers|params?)\s*:\s*(.*?)\s*$", re.IGNORECASE)
_PARAM = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s+(\S+)(?:\s+(.*))?$")


def _default(text: str | None) -> str | None:
    """A declared default: absent means required, ``''`` means the empty string."""
    if text is None:
        return None
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _parse_params(text: str) -> list[Param]:
    params = []
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        if entry.lower() in {"none", "(none)", "-"}:
            continue
        match = _PARAM.match(entry)
        if not match:
            raise ValueError(f"bad params entry {entry!r}: expected 'name Type [default]'")
        params.append(Param(match.group(1), match.group(2), _default(match.group(3))))
    return params


def parse_sql_file(text: str) -> SqlFile:
    """Read the ``-- answers:`` and ``-- params:`` header lines and the statement after them.

    ``-- params:`` takes ``name Type default`` entries, one per line or separated by ``;``.
    """
    answers: list[str] = []
    params: list[Param] = []
    for line in text.splitlines():
        match = _HEADER.match(line)
        if not match:
            continue
        if match.group(1).lower() == "answers":
            answers.append(match.group(2))
        else:
            params.extend(_parse_params(match.group(2)))
    statements = split_statements(text)
    if len(statements) != 1:
        raise ValueError(f"a query file holds one statement, found {len(statements)}")
    return SqlFile(" ".join(answers), tuple(params), statements[0])


def load_sql_file(path: Path) -> SqlFile:
    return parse_sql_file(path.read_text(encoding="utf-8"))
