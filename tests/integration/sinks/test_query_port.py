"""The stack's SQL port (the cold worker's query server) as an outsider reaches it: plain HTTP.

Regression tests of issue 12, finding 4: the port read any local file (``filesystem()``), made
HTTP requests (``oss()``, ``cosn()``), let the caller lift its limits with SETTINGS, had no
authentication, served one query at a time, and a timeout broke the shared client.
Principals are new on every run, so a kept stack (FLEET_TEST_KEEP_STACK) never answers from an
earlier one.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import clickhouse_connect
import pyarrow as pa
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError

from infra.api.client import HotPathClient
from infra.keys import token_authority
from infra.pki import CertificateAuthority
from infra.provision import load_or_provision
from infra.services.base import wait_until
from infra.settings import PROJECT_ROOT, Settings
from infra.stack import Stack
from streams.registry.rbac import GrantSet, Principal, Resource, Role
from streams.registry.tokens import TokenAuthority
from tests.conftest import settings_env
from tests.support.faults import query as faults_query
from tests.support.fleet import BackgroundFleet, start_fleet, telemetry_sent

pytestmark = pytest.mark.integration

GRANT_TIMEOUT_S = 30.0
FLEET = str(PROJECT_ROOT / ".venv" / "bin" / "fleet")


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]  # JSONCompact's answer, or {"error": text, "code": exception code}
    seconds: float

    @property
    def text(self) -> str:
        return json.dumps(self.body)

    @property
    def error(self) -> str:
        return str(self.body.get("error", ""))

    @property
    def code(self) -> str:
        return str(self.body.get("code", ""))

    @property
    def rows(self) -> list[list[Any]]:
        return list(self.body["data"])


def ask(settings: Settings, sql: str, token: str | None, timeout: float = 60.0) -> Answer:
    """POST the query on the stack's query port in the ClickHouse HTTP protocol (JSONCompact),
    the token as a bearer, as any HTTP client would."""
    request = urllib.request.Request(
        f"http://{settings.host}:{settings.query_port}/?default_format=JSONCompact",
        data=sql.encode(),
    )
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return Answer(response.status, json.load(response), time.monotonic() - started)
    except urllib.error.HTTPError as exc:
        body = {
            "error": exc.read().decode(errors="replace"),
            "code": exc.headers.get("X-ClickHouse-Exception-Code", ""),
        }
        return Answer(exc.code, body, time.monotonic() - started)


def ask_refused(settings: Settings, sql: str, token: str | None) -> Answer:
    """Ask ``sql``, which the query server must refuse (403, and its error says so)."""
    answer = ask(settings, sql, token)
    assert answer.status == 403, (sql, answer)
    assert "refused" in answer.error, (sql, answer.body)
    return answer


@pytest.fixture(scope="module")
def tokens(stack: Stack, settings: Settings) -> TokenAuthority:
    return token_authority(settings)  # the key the platform verifies with


@pytest.fixture(scope="module")
def analyst(stack: Stack, settings: Settings, tokens: TokenAuthority) -> str:
    """A token of a new user holding viewer (telemetry.read) on a new organization, once the
    query port knows the grant."""
    principal = Principal.user(f"analyst-{uuid.uuid4().hex[:8]}")
    org = Resource(f"o{uuid.uuid4().hex[:6]}")
    client = HotPathClient(settings)
    try:
        client.put_grants(GrantSet.of(principal, (Role.viewer, org)))
    finally:
        client.close()
    token = tokens.issue(principal, ttl_s=3600)
    assert wait_until(lambda: ask(settings, "SELECT 1", token).status == 200, GRANT_TIMEOUT_S)
    return token


@pytest.fixture
def listener() -> Iterator[tuple[int, list[bytes]]]:
    """A loopback TCP port that records whatever connects to it (an SSRF would)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    seen: list[bytes] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(1)
                try:
                    seen.append(conn.recv(4096))
                except OSError:
                    seen.append(b"")

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1], seen
    stop.set()
    thread.join(timeout=5)
    server.close()


# --- authentication -------------------------------------------------------------------------


def test_no_token_is_401(settings: Settings, stack: Stack) -> None:
    answer = ask(settings, "SELECT count() FROM telemetry", None)
    assert answer.status == 401, answer
    assert answer.code == "516"  # AUTHENTICATION_FAILED
    assert "data" not in answer.body


def test_a_bad_token_is_401_and_a_token_without_grant_is_403(
    settings: Settings, stack: Stack, tokens: TokenAuthority, tmp_path: Any
) -> None:
    stranger = TokenAuthority.load_or_create(tmp_path / "not-the-platform")
    expired = tokens.issue(Principal.user("someone"), ttl_s=60, now=time.time() - 3600)
    for bad in ("not-a-jwt", stranger.issue(Principal.user("someone")), expired):
        answer = ask(settings, "SELECT 1", bad)
        assert answer.status == 401, answer
    who = f"nobody-{uuid.uuid4().hex[:8]}"
    nobody = tokens.issue(Principal.user(who))
    answer = ask(settings, "SELECT 1", nobody)
    assert answer.status == 403, answer
    assert "telemetry.read" in answer.error
    # The denial is logged with who and why, never the token.
    log = settings.run_dir / "cold-worker.log"
    assert wait_until(lambda: f"query port: 403 for user:{who}" in log.read_text(), 10)
    text = log.read_text()
    for token in (nobody, expired, "not-a-jwt"):
        assert token not in text
    assert nobody.split(".")[2] not in text  # not even its signature


def fleet_sql(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FLEET, "sql", *args, "--format", "json"],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_fleet_sql_passes_a_token(settings: Settings, tokens: TokenAuthority, analyst: str) -> None:
    # --token (or FLEET_TOKEN): a token from elsewhere
    done = fleet_sql(settings, "SELECT 1 AS one", "--token", analyst)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [{"one": 1}]
    # --as: a short token signed here, for a principal that must hold the grant
    analyst_id = str(tokens.verify(analyst))
    assert fleet_sql(settings, "SELECT 2 AS two", "--as", analyst_id).returncode == 0
    refused = fleet_sql(settings, "SELECT 1", "--as", f"user:nobody-{uuid.uuid4().hex[:6]}")
    assert refused.returncode == 1
    assert "telemetry.read" in refused.stderr
    # no option: the platform's own secret, for the operator on this machine
    assert fleet_sql(settings, "SELECT 3 AS three").returncode == 0
    denied = fleet_sql(settings, f"SELECT * FROM filesystem('{settings.pki_dir}')")
    assert denied.returncode == 1
    assert "filesystem()" in denied.stderr
    assert "PRIVATE KEY" not in denied.stdout + denied.stderr


# --- what a query may reach -----------------------------------------------------------------


def test_filesystem_of_the_pki_folder_is_refused_and_no_key_leaks(
    settings: Settings, analyst: str
) -> None:
    for sql in (
        f"SELECT name, content FROM filesystem('{settings.pki_dir}')",
        f"select content from FileSystem('{settings.pki_dir}') /* comment */",
        f"SELECT * FROM (SELECT content FROM `filesystem`('{settings.pki_dir}'))",
        f"SELECT 1 WHERE 'x' IN (SELECT content FROM filesystem('{settings.pki_dir}'))",
        f"SELECT file('{settings.pki_dir}/ca.key')",
    ):
        answer = ask(settings, sql, analyst)
        assert answer.status == 403, (sql, answer.status)
        assert answer.code == "497", answer.body  # ACCESS_DENIED
        assert "PRIVATE KEY" not in answer.text
        assert "refused" in answer.error


@pytest.mark.parametrize(
    "template",
    [
        "SELECT * FROM url('http://127.0.0.1:{port}/x', CSV, 'a String')",
        "SELECT * FROM oss('http://127.0.0.1:{port}/bucket/x.csv', CSV, 'a String')",
        "SELECT * FROM cosn('http://127.0.0.1:{port}/bucket/x.csv', CSV, 'a String')",
        "SELECT * FROM s3('http://127.0.0.1:{port}/bucket/x.csv', CSV, 'a String')",
        "SELECT * FROM remote('127.0.0.1:{port}', system.one)",
        "SELECT * FROM numbers(1) JOIN url('http://127.0.0.1:{port}/', CSV, 'a String') ON 1",
    ],
)
def test_table_functions_that_reach_out_are_refused(
    settings: Settings, analyst: str, listener: tuple[int, list[bytes]], template: str
) -> None:
    port, seen = listener
    ask_refused(settings, template.format(port=port), analyst)
    assert seen == [], "the query server connected out"


def test_settings_that_lift_limits_are_refused(settings: Settings, analyst: str) -> None:
    for sql in (
        "SELECT 1 SETTINGS max_execution_time = 100000",
        "SELECT 1 SETTINGS max_memory_usage = 0",
        "SELECT * FROM (SELECT 1 SETTINGS max_result_rows = 0)",
        "SELECT 1 SETTINGS readonly = 0",
    ):
        assert "SETTINGS" in ask_refused(settings, sql, analyst).error


def test_system_tables_and_writes_are_refused(settings: Settings, analyst: str) -> None:
    for sql in (
        "SELECT * FROM system.users",
        "SELECT name FROM system.tables",
        "INSERT INTO telemetry (device_id, seq) VALUES ('x', 1)",
        "ALTER TABLE telemetry DELETE WHERE 1",
        "SELECT 1; DROP TABLE telemetry",
        "SYSTEM SHUTDOWN",
    ):
        ask_refused(settings, sql, analyst)
    assert ask(settings, "SELECT count() FROM telemetry", analyst).status == 200


# --- concurrency and limits -----------------------------------------------------------------

# About 2 s of sleeping in one block (ClickHouse caps a block's sleep at 3 s), well under the
# test stack's time limit: a slow query that still finishes.
SLOW_SQL = "SELECT count() FROM numbers(20) WHERE NOT ignore(sleepEachRow(0.1))"


def test_a_slow_query_does_not_block_a_fast_one(settings: Settings, analyst: str) -> None:
    slow: list[Answer] = []
    started = time.monotonic()
    thread = threading.Thread(target=lambda: slow.append(ask(settings, SLOW_SQL, analyst)))
    thread.start()
    fast: list[tuple[float, Answer]] = []  # (sent at, answer), while the slow one runs
    while thread.is_alive() and time.monotonic() - started < 30:
        sent = time.monotonic() - started
        fast.append((sent, ask(settings, "SELECT count() FROM telemetry", analyst)))
    thread.join(timeout=60)
    finished = slow[0].seconds
    assert slow[0].status == 200, slow[0]
    assert [[int(n) for n in row] for row in slow[0].rows] == [[20]]  # UInt64 comes quoted
    assert finished >= 1.9
    # A fast query sent well after the slow one started answered before it finished, quickly.
    during = [
        (sent, answer) for sent, answer in fast if sent >= 0.5 and sent + answer.seconds < finished
    ]
    assert during, [(round(s, 2), round(a.seconds, 2)) for s, a in fast]
    assert all(answer.status == 200 and answer.seconds < 1.0 for _, answer in during)


# CPU-bound with no end of its own: it runs on the port's threads until its time limit stops it.
HEAVY_SQL = "SELECT count() FROM numbers(100000000000) WHERE NOT ignore(sipHash64(number))"
STORED_SQL = "SELECT count() FROM telemetry WHERE startsWith(device_id, {p:String})"


@dataclass
class HeavyLoad:
    """Heavy queries one after another from a thread, until stopped; which one is running."""

    settings: Settings
    token: str
    answers: list[Answer] = field(default_factory=list)
    running: int | None = None  # index of the query in flight, if any
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            self.running = len(self.answers)
            answer = ask(self.settings, HEAVY_SQL, self.token, timeout=120)
            self.running = None
            self.answers.append(answer)


def stored(settings: Settings, prefix: str) -> int:
    return int(faults_query(settings, STORED_SQL, {"p": prefix})[0][0])


def test_heavy_queries_stop_at_their_limits_and_the_cold_path_keeps_storing(
    settings: Settings, analyst: str, ca: CertificateAuthority, tmp_path: Path
) -> None:
    """Issue 14, item 4: a query over its limits answers an error, ingestion continues; one
    heavy query running does not stall loading (stored rows rise while it runs)."""
    prefix = f"qp{uuid.uuid4().hex[:6]}"
    creds = load_or_provision(ca, [f"{prefix}-{i}" for i in range(3)], tmp_path, "ec")
    # Over the result-row cap: an error at once, the port and the loader unaffected.
    capped = ask(settings, "SELECT number FROM numbers(5000000)", analyst)
    assert capped.status == 400, capped
    assert "TOO_MANY_ROWS" in capped.error or "Limit for result" in capped.error, capped.error
    heavy = HeavyLoad(settings, analyst)
    thread = threading.Thread(target=heavy.run, name="heavy-queries")
    thread.start()
    fleet = start_fleet(settings, creds, rate=5, duration=60, max_messages=100)
    try:
        rises: list[tuple[int, int, int]] = []  # (heavy query, count before, count after)

        def rose_during_one_heavy_query() -> bool:
            before_query, before = heavy.running, stored(settings, prefix)
            after = stored(settings, prefix)
            while heavy.running == before_query and after == before and not fleet_done(fleet):
                after = stored(settings, prefix)
            if before_query is not None and heavy.running == before_query and after > before:
                rises.append((before_query, before, after))
            return bool(rises)

        assert wait_until(rose_during_one_heavy_query, 120), (
            "the stored count did not rise while a heavy query ran",
            [(a.status, round(a.seconds, 1)) for a in heavy.answers],
        )
    finally:
        heavy.stop.set()
        thread.join(timeout=settings.query_timeout_s + 60)
    assert not thread.is_alive()
    assert heavy.answers
    print(f"stored rose during heavy query #{rises[0][0]}: {rises[0][1]} -> {rises[0][2]}")
    for answer in heavy.answers:  # every one stopped at its time limit, with the engine's error
        assert answer.status == 400, answer
        assert "TIMEOUT_EXCEEDED" in answer.error or "Timeout" in answer.error, answer.error
        assert answer.code == "159", answer.body
    # Ingestion continues: everything the fleet published is stored, once.
    published = telemetry_sent(fleet.wait()[1])
    assert len(published) == 3 * 100
    assert wait_until(lambda: stored(settings, prefix) == len(published), 120), (
        stored(settings, prefix),
        len(published),
    )
    for _ in range(3):  # every pooled connection still answers
        after = ask(settings, "SELECT count() FROM telemetry", analyst)
        assert after.status == 200, after


def fleet_done(fleet: BackgroundFleet) -> bool:
    return not fleet.thread.is_alive()


# --- the ClickHouse HTTP protocol (issue 14, item 2) ----------------------------------------


def test_clickhouse_connect_reads_with_a_platform_token(
    settings: Settings, tokens: TokenAuthority, analyst: str
) -> None:
    who = tokens.verify(analyst).id
    client = clickhouse_connect.get_client(
        host=settings.host, port=settings.query_port, username=who, password=analyst
    )
    try:
        assert client.query("SELECT count() FROM telemetry").result_rows[0][0] >= 0
        bound = client.query("SELECT {s:String} AS s, {n:UInt32} + 1 AS n", {"s": "a\tb'c", "n": 1})
        assert bound.result_rows == [("a\tb'c", 2)]
        assert client.query_arrow("SELECT number FROM numbers(5)").num_rows == 5
        with pytest.raises(DatabaseError, match=r"filesystem\(\)"):
            client.query(f"SELECT content FROM filesystem('{settings.pki_dir}')")
        with pytest.raises(DatabaseError, match="SETTINGS"):
            client.query("SELECT 1 SETTINGS max_execution_time = 100000")
    finally:
        client.close()
    with pytest.raises(DatabaseError, match=r"AUTHENTICATION_FAILED|516"):
        clickhouse_connect.get_client(
            host=settings.host, port=settings.query_port, username=who, password="not-a-token"
        )


FORMATS_SQL = "SELECT number AS n, toString(number) AS s FROM numbers(3)"


def test_clickhouse_connect_reads_every_format_through_the_port(
    settings: Settings, tokens: TokenAuthority, analyst: str
) -> None:
    """Issue 14, item 2: the formats clients use (clickhouse-connect's query is Native,
    query_arrow Arrow, query_df pandas) and the text/binary ones asked by name."""
    client = clickhouse_connect.get_client(
        host=settings.host,
        port=settings.query_port,
        username=tokens.verify(analyst).id,
        password=analyst,
    )
    try:
        assert client.query(FORMATS_SQL).result_rows == [(0, "0"), (1, "1"), (2, "2")]
        table = client.query_arrow(FORMATS_SQL)
        assert table.column_names == ["n", "s"]
        assert table.column("n").to_pylist() == [0, 1, 2]
        frame = client.query_df(FORMATS_SQL)
        assert list(frame.columns) == ["n", "s"]
        assert frame["s"].tolist() == ["0", "1", "2"]
        raw = {
            fmt: client.raw_query(FORMATS_SQL, fmt=fmt)
            for fmt in (
                "TSVWithNames",
                "CSVWithNames",
                "JSONEachRow",
                "RowBinaryWithNamesAndTypes",
                "Native",
                "Arrow",
            )
        }
    finally:
        client.close()
    assert raw["TSVWithNames"].decode().splitlines() == ["n\ts", "0\t0", "1\t1", "2\t2"]
    assert raw["CSVWithNames"].decode().splitlines() == ['"n","s"', '0,"0"', '1,"1"', '2,"2"']
    rows = [json.loads(line) for line in raw["JSONEachRow"].decode().splitlines()]
    assert [row["s"] for row in rows] == ["0", "1", "2"]
    # two columns, then their names and types, then 3 rows of (UInt64, String)
    binary = raw["RowBinaryWithNamesAndTypes"]
    assert binary.startswith(b"\x02\x01n\x01s\x06UInt64\x06String")
    assert len(binary) == len(b"\x02\x01n\x01s\x06UInt64\x06String") + 3 * (8 + 2)
    assert b"UInt64" in raw["Native"]
    arrow = pa.ipc.open_file(raw["Arrow"]).read_all().column("s").to_pylist()
    assert [v.decode() if isinstance(v, bytes) else v for v in arrow] == ["0", "1", "2"]


def test_the_clickhouse_protocol_refuses_settings_and_other_databases(
    settings: Settings, analyst: str
) -> None:
    base = f"http://{settings.host}:{settings.query_port}/"
    for query, expected in (
        ("query=SELECT+1&max_execution_time=100000", "max_execution_time"),
        ("query=SELECT+1&readonly=0", "readonly"),
        ("query=SELECT+1&database=system", "database system"),
    ):
        request = urllib.request.Request(f"{base}?{query}")
        request.add_header("Authorization", f"Bearer {analyst}")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 403
        assert expected in refused.value.read().decode()
    request = urllib.request.Request(f"{base}?query=SELECT+41%2B1+FORMAT+JSONEachRow")
    request.add_header("Authorization", f"Bearer {analyst}")
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert json.loads(answer.read()) == {"plus(41, 1)": 42}
    with pytest.raises(urllib.error.HTTPError) as unauthenticated:
        urllib.request.urlopen(f"{base}?query=SELECT+1", timeout=30)
    assert unauthenticated.value.code == 401
