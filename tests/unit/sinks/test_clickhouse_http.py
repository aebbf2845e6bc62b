"""The ClickHouse HTTP protocol's pure parts (sinks/clickhouse_http.py)."""

from __future__ import annotations

import base64

import pytest

from sinks.clickhouse_http import (
    credential,
    error_body,
    is_settings_probe,
    parse_request,
    unescape_param,
)
from sinks.sql_guard import Refused


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize(
    ("authorization", "key", "query", "token"),
    [
        ("Bearer abc.def.ghi", None, {}, "abc.def.ghi"),
        (basic("alice", "abc.def.ghi"), None, {}, "abc.def.ghi"),
        (basic("alice", ""), None, {}, None),
        ("Basic !!!notbase64", None, {}, None),
        (None, "abc", {}, "abc"),
        (None, None, {"user": "alice", "password": "abc"}, "abc"),
        (None, None, {}, None),
        ("Bearer ", None, {}, None),
    ],
)
def test_the_token_is_the_password_or_the_bearer(
    authorization: str | None, key: str | None, query: dict[str, str], token: str | None
) -> None:
    assert credential(authorization, key, query) == token


def test_a_request_joins_query_parameter_and_body_and_unescapes_parameters() -> None:
    request = parse_request(
        {
            "query": "SELECT {s:String}",
            "param_s": "a\\tb\\\\c\\'d",
            "default_format": "JSONEachRow",
            "query_id": "q-1",
            "compress": "1",
            "wait_end_of_query": "1",
            "database": "default",
        },
        b"AS s",
    )
    assert request.sql == "SELECT {s:String}\nAS s"
    assert request.params == {"s": "a\tb\\c'd"}
    assert (request.default_format, request.query_id) == ("JSONEachRow", "q-1")
    assert parse_request({}, b"SELECT 1").default_format == "TabSeparated"


@pytest.mark.parametrize(
    ("query", "body", "problem"),
    [
        ({"max_execution_time": "0"}, b"SELECT 1", "max_execution_time"),
        ({"readonly": "0"}, b"SELECT 1", "readonly"),
        ({"max_memory_usage": "0"}, b"SELECT 1", "max_memory_usage"),
        ({"database": "system"}, b"SELECT 1", "database system"),
    ],
)
def test_settings_and_other_databases_are_refused_by_name(
    query: dict[str, str], body: bytes, problem: str
) -> None:
    with pytest.raises(Refused, match=problem):
        parse_request(query, body)


def test_malformed_requests_are_value_errors() -> None:
    with pytest.raises(ValueError, match="no query"):
        parse_request({}, b"  ")
    with pytest.raises(UnicodeDecodeError):
        parse_request({}, b"SELECT '\xff'")


def test_the_settings_probe_is_recognised_exactly() -> None:
    assert is_settings_probe("SELECT name, value, readonly FROM system.settings LIMIT 10000") == ""
    assert (
        is_settings_probe("select name,value,readonly from system.settings limit 1\n FORMAT Native")
        == "Native"
    )
    assert is_settings_probe("SELECT name, value FROM system.settings") is None
    assert (
        is_settings_probe("SELECT name, value, readonly FROM system.settings, system.users") is None
    )


def test_errors_are_written_as_clickhouse_writes_them() -> None:
    assert error_body(497, "ACCESS_DENIED", "refused: x") == (
        b"Code: 497. DB::Exception: refused: x. (ACCESS_DENIED)\n"
    )
    assert error_body(1, "X", "Code: 62. DB::Exception: bad") == b"Code: 62. DB::Exception: bad\n"
    assert unescape_param("\\n\\0x") == "\n\0x"
