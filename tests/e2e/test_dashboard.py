"""The fleet dashboard in a real browser: a small `fleet demo --report` on the session stack,
then the API's /dashboard loaded in headless Chromium (Debian's package) until its charts have
drawn the data, with the numbers on the page checked against the warehouse and the registry.
A screenshot is saved in the test's temp folder (and copied to docs/dashboard.png when
FLEET_UPDATE_SCREENSHOTS=1, for the README)."""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from html.parser import HTMLParser
from pathlib import Path

from infra.api.client import HotPathClient
from infra.api.dashboard.page import REFRESH_MS
from infra.keys import token_authority
from infra.settings import PROJECT_ROOT, Settings
from infra.stack import Stack
from infra.warehouse import warehouse_counts
from streams.registry.rbac import GrantSet, Principal, Resource, Role
from tests.conftest import settings_env
from tests.support.browser import PNG_MAGIC, chromium, keep_for_docs

FLEET = str(PROJECT_ROOT / ".venv" / "bin" / "fleet")
CHARTS = ("throughput", "alerts", "lag", "dead", "twins", "cohorts")


def _chromium(url: str, profile: Path, *mode: str) -> subprocess.CompletedProcess[str]:
    """The page's scripts and its first data request, shorter than the page's refresh period
    so the data is fetched once."""
    return chromium(url, profile, *mode, wait_ms=REFRESH_MS - 500)


def _stat(dom: str, ident: str) -> int | None:
    found = re.search(rf'id="{ident}" data-value="(\d+)"', dom)
    return int(found.group(1)) if found else None


class _NoExternal(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.external += [f"{tag} {k}={v}" for k, v in attrs if k in ("src", "href") and v]


def test_the_dashboard_shows_the_demos_numbers_in_headless_chromium(
    stack: Stack, settings: Settings, tmp_path: Path
) -> None:
    report = tmp_path / "report.html"
    demo = subprocess.run(
        [FLEET, "demo", "--devices", "10", "--duration", "5", "--rate", "2", "--json",
         "--report", str(report)],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert demo.returncode == 0, demo.stderr[-2000:]
    summary = json.loads(demo.stdout.strip().splitlines()[-1])  # the contract: JSON line last
    # The demo makes 1% of readings bad on purpose; the quality gate holds those.
    assert summary["stored"] + summary["quarantined"] == summary["published"] > 0

    # The report: one file, nothing fetched, the run's numbers in it.
    page = report.read_text()
    links = _NoExternal()
    links.feed(page)
    assert links.external == []
    assert f'<td data-key="published">{summary["published"]}</td>' in page
    assert "echarts" in page

    # The live page, signed in through the URL's fragment (the server never sees it).
    client = HotPathClient(settings)
    try:
        orgs = sorted({d.org for d in client.devices().values()})
        viewer = Principal.user(f"dash-{uuid.uuid4().hex[:8]}")
        client.put_grants(GrantSet.of(viewer, *((Role.viewer, Resource(org)) for org in orgs)))
        registered = len(client.devices())
    finally:
        client.close()
    token = token_authority(settings).issue(viewer, ttl_s=600)
    url = f"http://{settings.host}:{settings.api_port}/dashboard#token={token}"
    stored = warehouse_counts(settings).stored  # every run's rows: the page shows the fleet's
    assert stored >= summary["stored"]

    deadline = time.monotonic() + 120
    dom, attempts = "", 0
    while time.monotonic() < deadline:
        attempts += 1
        dom = _chromium(url, tmp_path / "profile", "--dump-dom").stdout
        drawn = all(re.search(rf'id="chart-{name}"[^>]*data-rendered="1"', dom) for name in CHARTS)
        if 'data-state="ready"' in dom and drawn and _stat(dom, "stat-stored") == stored:
            break
    assert 'data-state="ready"' in dom, f"the page never rendered data ({attempts} loads)"
    for name in CHARTS:
        assert re.search(rf'id="chart-{name}"[^>]*data-rendered="1"', dom), name
    assert dom.count("<canvas") >= len(CHARTS)  # ECharts drew each chart
    assert _stat(dom, "stat-stored") == stored
    assert _stat(dom, "stat-registered") == registered
    twins = _stat(dom, "stat-twins")
    assert twins is not None
    assert twins >= summary["twins"]
    assert (_stat(dom, "stat-accepted") or 0) > 0
    assert 'id="errors" hidden' in dom or '<div id="errors" hidden=""' in dom

    shot = tmp_path / "dashboard.png"
    taken = _chromium(url, tmp_path / "profile", f"--screenshot={shot}")
    assert shot.exists(), taken.stderr[-2000:]
    assert shot.read_bytes()[:8] == PNG_MAGIC
    keep_for_docs(shot, "dashboard.png")
