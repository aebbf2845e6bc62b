"""The fleet dashboard (infra/api/dashboard/): the data document's shaping, the routes on the API
(public page, authenticated and authorized data, denials audited) and the demo's report file
(self-contained: no external src or href)."""

from __future__ import annotations

import asyncio
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from infra.api.app import create_app
from infra.api.dashboard.page import ECHARTS_PATH, live_page, report_page
from infra.api.dashboard.routes import DATA_PATH, PAGE_PATH, add_dashboard, may_view
from infra.api.dashboard.shape import (
    alerts_per_minute,
    devices_view,
    rollout_view,
    rollouts_view,
    throughput_series,
    twins_view,
)
from streams.hot.alerts import AlertEvent, AlertStatus, Severity
from streams.hot.twin import Twin
from streams.ota.model import Progress, Rollout, RolloutDevice
from streams.registry.devices import AuditDecision
from streams.registry.rbac import GrantSet, Principal, Resource, Role
from streams.registry.tokens import TokenAuthority
from tests.support.records import running_rollout
from tests.unit.infra import test_api_routes as api_tests
from tests.unit.infra.test_api_routes import ADMIN, VIEWER, FakeBackend, bearer
from tests.unit.streams.ota.test_ota import ARTIFACT

# The API tests' fixtures: a fake backend seeded with devices and grants, a CA, a token authority.
backend, ca, tokens = api_tests.backend, api_tests.ca, api_tests.tokens
NOW = 1_700_000_005_500  # 5.5 s into a 10-s bucket


# --------------------------------------------------------------------------- shaping


def test_throughput_is_messages_per_second_per_bucket_with_empty_buckets_zero() -> None:
    bucket = 10_000
    last = NOW - NOW % bucket
    received = [(last, 50), (last - 2 * bucket, 20), (last - 999 * bucket, 7)]  # last: outside
    stored = [(last - bucket, 30), (last - bucket + 1234, 10)]  # same bucket, summed
    series = throughput_series(received, stored, NOW, bucket_s=10, window_s=60)
    assert series["t"] == [last - i * bucket for i in range(5, -1, -1)]
    assert series["in"] == [0, 0, 0, 2.0, 0, 5.0]
    assert series["stored"] == [0, 0, 0, 0, 4.0, 0]


def _alert(ts: int, severity: Severity, status: AlertStatus = AlertStatus.raised) -> AlertEvent:
    return AlertEvent("a", "dev-1", "rule", status, "temperature", 40.0, 30.0, severity, 1, ts)


def test_alerts_are_raised_ones_per_minute_per_severity() -> None:
    minute = 60_000
    this = NOW - NOW % minute
    events = [
        _alert(this + 1, Severity.critical),
        _alert(this + 2, Severity.critical),
        _alert(this - minute, Severity.warning),
        _alert(this + 3, Severity.warning, AlertStatus.resolved),  # not a raise
        _alert(this - 60 * minute, Severity.info),  # before the window
    ]
    shaped = alerts_per_minute(events, NOW, window_min=3)
    assert shaped["t"] == [this - 2 * minute, this - minute, this]
    by_severity = shaped["by_severity"]
    assert isinstance(by_severity, dict)
    assert by_severity == {
        "info": [0, 0, 0],
        "warning": [0, 1, 0],
        "critical": [0, 0, 2],
    }


def test_twins_converged_have_an_empty_delta() -> None:
    twins = [
        Twin("d1", desired={"led": "green"}, reported={"led": "green"}),
        Twin("d2", desired={"led": "green"}, reported={"led": "red"}),
        Twin("d3"),
    ]
    assert twins_view(twins) == {"total": 3, "converged": 2}


def test_devices_by_status_and_online(backend: FakeBackend) -> None:
    view = devices_view(backend.devices(), online=1)
    assert view["registered"] == 2
    assert view["online"] == 1
    assert sum(view["by_status"].values()) == 2


def _rollout(rollout_id: str, updated_ms: int) -> Rollout:
    cohorts = (("d0",), ("d1", "d2", "d3"))
    statuses = {
        "d0": Progress.succeeded,
        "d1": Progress.succeeded,
        "d2": Progress.downloading,
        "d3": Progress.failed,
    }
    devices = {
        d: RolloutDevice(device_id=d, cohort=i, status=statuses[d])
        for i, members in enumerate(cohorts)
        for d in members
    }
    return running_rollout(
        ARTIFACT,
        rollout_id,
        target=Resource("acme", "pA", "g"),
        updated_ms=updated_ms,
        cohort_index=1,
        cohorts=cohorts,
        devices=devices,
    )


def test_a_rollout_shows_each_cohorts_devices_by_progress() -> None:
    view = rollout_view(_rollout("ro-1", 5))
    assert view["state"] == "running"
    assert view["cohort"] == 1
    assert (view["updated"], view["failed"]) == (2, 1)
    assert view["cohorts"] == [
        {"index": 0, "size": 1, "progress": {"succeeded": 1}},
        {"index": 1, "size": 3, "progress": {"downloading": 1, "failed": 1, "succeeded": 1}},
    ]
    newest = rollouts_view({"a": _rollout("old", 1), "b": _rollout("new", 9)}, limit=1)
    assert [r["rollout_id"] for r in newest] == ["new"]


# --------------------------------------------------------------------------- routes


class FakeSource:
    def __init__(self) -> None:
        self.calls = 0
        self.closed = False

    def snapshot(self) -> dict[str, Any]:
        self.calls += 1
        return {"totals": {"stored": 42}}

    def close(self) -> None:
        self.closed = True


def _serve(backend: FakeBackend, tokens: TokenAuthority, scenario: Any) -> FakeSource:
    source = FakeSource()

    async def main() -> None:
        app = create_app(backend, tokens)
        add_dashboard(app, backend, source)
        async with TestClient(TestServer(app)) as client:
            await scenario(client)

    asyncio.run(main())
    return source


def test_the_page_is_public_and_the_data_needs_a_token(
    backend: FakeBackend, tokens: TokenAuthority
) -> None:
    async def scenario(client: TestClient[Any, Any]) -> None:
        page = await client.get(PAGE_PATH)
        assert page.status == 200
        assert page.content_type == "text/html"
        text = await page.text()
        assert f'src="{ECHARTS_PATH}"' in text
        assert 'id="chart-throughput"' in text
        assert "default-src 'none'" in page.headers["Content-Security-Policy"]
        library = await client.get(ECHARTS_PATH)
        assert library.status == 200
        assert "echarts" in (await library.text())[:2000].lower()
        anonymous = await client.get(DATA_PATH)
        assert anonymous.status == 401
        assert (await anonymous.json())["error"] == "unauthorized"
        data = await client.get(DATA_PATH, headers=bearer(tokens, ADMIN))
        assert data.status == 200
        assert await data.json() == {"totals": {"stored": 42}}

    source = _serve(backend, tokens, scenario)
    assert source.calls == 1
    assert source.closed


def test_the_fleet_wide_view_needs_telemetry_read_on_every_organization(
    backend: FakeBackend, tokens: TokenAuthority
) -> None:
    stranger = Principal.user("stranger")
    backend.grant_sets[stranger.key] = GrantSet.of(stranger, (Role.admin, Resource("other")))

    async def scenario(client: TestClient[Any, Any]) -> None:
        for principal in (ADMIN, VIEWER):  # both read telemetry of acme, the one org
            answer = await client.get(DATA_PATH, headers=bearer(tokens, principal))
            assert answer.status == 200, principal
        denied = await client.get(DATA_PATH, headers=bearer(tokens, stranger))
        assert denied.status == 403
        assert "telemetry.read" in (await denied.json())["reason"]

    source = _serve(backend, tokens, scenario)
    assert source.calls == 2
    assert [(a.principal, a.decision) for a in backend.audits] == [
        (str(stranger), AuditDecision.denied)
    ]


def test_with_no_devices_a_caller_needs_some_grant_to_read_telemetry(
    backend: FakeBackend,
) -> None:
    grants = backend.grants()
    assert may_view(Principal.orchestrator(), [], grants)[0]
    assert may_view(VIEWER, [], grants)[0]
    assert not may_view(Principal.user("nobody"), [], grants)[0]


# --------------------------------------------------------------------------- the report


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.external: list[tuple[str, str, str]] = []
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.scripts += tag == "script"
        for name, value in attrs:
            if name in ("src", "href", "action", "srcset", "data") and value:
                self.external.append((tag, name, value))


SUMMARY = {
    "devices": 3,
    "published": 90,
    "stored": 90,
    "duplicates": 0,
    "dead_lettered": 1,
    "alerts": 4,
    "twins": 3,
    "e2e_latency_ms": {"p50": 120, "p99": 480},
    "duration_s": 30,
    "ota": {"state": "completed", "updated": 3, "failed": 0, "rolled_back": 0},
}


def test_the_report_is_one_self_contained_file_with_the_runs_numbers(tmp_path: Path) -> None:
    document = {"totals": {"stored": 90}, "rollouts": [], "marker": "</script><b>x</b>"}
    page = report_page(SUMMARY, document)
    (tmp_path / "report.html").write_text(page)
    links = _Links()
    links.feed(page)
    assert links.external == []  # nothing fetched: the library and the data are inlined
    assert links.scripts >= 3
    assert "echarts" in page
    assert "FleetDashboard.render(" in page
    rendered = re.search(r"FleetDashboard\.render\((.*?)\);echarts", page, re.S)
    assert rendered is not None
    assert json.loads(rendered.group(1).replace("<\\/script", "</script")) == document
    for label, value in (("published", "90"), ("end-to-end latency p99 (ms)", "480")):
        assert f'<td data-key="{label}">{value}</td>' in page
    assert '<td data-key="OTA state">completed</td>' in page
    assert "quarantined" not in page  # no quality gate in this run: no row for it


def test_the_live_page_fetches_only_its_own_origin() -> None:
    links = _Links()
    links.feed(live_page())
    assert links.external == [("script", "src", ECHARTS_PATH)]
