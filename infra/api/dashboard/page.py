"""The dashboard's HTML: the live page the API serves (``GET /dashboard``) and the demo's
self-contained report (``fleet demo --report FILE.html``), both drawn by the same script
(``static/dashboard.js``) with the vendored Apache ECharts (``static/echarts.min.js``, see
``static/ECHARTS-LICENSE.txt``; ``make vendor-echarts`` refreshes it from npm)."""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from importlib.resources import files
from typing import Any

__all__ = ["ECHARTS_PATH", "asset", "live_page", "report_page"]

ECHARTS_PATH = "/dashboard/echarts.min.js"
DATA_PATH = "/dashboard/data"
REFRESH_MS = 3000

_CARDS = (
    ("stat-online", "devices online (60 s)"),
    ("stat-registered", "devices registered"),
    ("stat-accepted", "messages in (bridges)"),
    ("stat-stored", "messages stored"),
    ("stat-dead", "dead letters"),
    ("stat-alerts", "alerts raised (10 min)"),
    ("stat-twins", "twins converged"),
)


def asset(name: str) -> str:
    """A file of ``static/`` (text)."""
    return files("infra.api.dashboard").joinpath("static", name).read_text(encoding="utf-8")


def _script(code: str) -> str:
    """An inline ``<script>``: nothing in ``code`` can close the element early."""
    return "<script>" + code.replace("</script", "<\\/script") + "</script>"


def _body() -> str:
    cards = "".join(
        f'<div class="card"><div class="label">{label}</div>'
        f'<div class="value" id="{ident}" data-value="">-</div></div>'
        for ident, label in _CARDS
    )
    panels = [
        (
            "wide",
            "messages per second: in and stored",
            '<div class="chart" id="chart-throughput"></div>',
        ),
        (
            "",
            "alerts raised per minute, by severity",
            '<div class="chart" id="chart-alerts"></div>',
        ),
        ("", "consumer lag per job (records)", '<div class="chart" id="chart-lag"></div>'),
        ("third", "dead letters by topic", '<div class="chart" id="chart-dead"></div>'),
        ("third", "twins converged", '<div class="chart" id="chart-twins"></div>'),
        (
            "third",
            'OTA cohorts<span id="cohorts-of"></span>',
            '<div class="chart" id="chart-cohorts"></div>',
        ),
        (
            "wide",
            "OTA rollouts",
            '<table id="rollouts"><thead><tr><th>rollout</th><th>state</th><th>version</th>'
            "<th>target</th><th>cohort</th><th>updated</th><th>failed</th><th>rolled back</th>"
            "</tr></thead><tbody></tbody></table>",
        ),
    ]
    sections = "".join(
        f'<section class="panel {cls}"><h2>{title}</h2>{inner}</section>'
        for cls, title, inner in panels
    )
    return f'<div class="cards">{cards}</div><div id="errors" hidden></div>{sections}'


def _head(title: str) -> str:
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{asset('dashboard.css')}</style></head>"
    )


def live_page() -> str:
    """The live dashboard: signs in with a platform token, then refreshes every few seconds."""
    header = (
        "<header><h1>fleetstream · fleet dashboard</h1>"
        '<span class="meta">updated <span id="updated">-</span> · <span id="status">…</span></span>'
        '<span class="spacer"></span>'
        '<form id="signin" hidden autocomplete="off">'
        '<input name="token" type="password" placeholder="platform token (fleet token)" '
        'aria-label="platform token"><button type="submit">sign in</button></form>'
        '<button id="signout" type="button">sign out</button></header>'
    )
    return (
        _head("fleetstream · fleet dashboard")
        + f"<body>{header}<main>{_body()}</main>"
        + f'<script src="{ECHARTS_PATH}"></script>'
        + _script(asset("dashboard.js"))
        + _script(f"FleetDashboard.live({json.dumps(DATA_PATH)}, {REFRESH_MS});")
        + "</body></html>"
    )


def _summary_rows(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    latency = summary.get("e2e_latency_ms") or {}
    rows = [
        ("devices", summary.get("devices")),
        ("published", summary.get("published")),
        ("stored", summary.get("stored")),
        ("duplicates", summary.get("duplicates")),
        ("dead-lettered", summary.get("dead_lettered")),
        ("quarantined (quality gate)", summary.get("quarantined")),
        ("alerts raised", summary.get("alerts")),
        ("twins converged", summary.get("twins")),
        ("publishing (s)", summary.get("duration_s")),
        ("end-to-end latency p50 (ms)", latency.get("p50")),
        ("end-to-end latency p99 (ms)", latency.get("p99")),
    ]
    ota = summary.get("ota")
    if isinstance(ota, Mapping):
        rows += [(f"OTA {key}", value) for key, value in ota.items()]
    return [(label, str(value)) for label, value in rows if value is not None]


def report_page(summary: Mapping[str, Any], document: Mapping[str, Any]) -> str:
    """The demo's report: its summary (``fleet demo --json``'s object) and the dashboard's
    document at the end of the run, with the chart library and the data inlined: one file
    that opens anywhere, with no request of its own."""
    rows = "".join(
        f'<tr><th>{html.escape(label)}</th><td data-key="{html.escape(label)}">'
        f"{html.escape(value)}</td></tr>"
        for label, value in _summary_rows(summary)
    )
    latency = summary.get("e2e_latency_ms") or {}
    published, duration = summary.get("published"), summary.get("duration_s")
    throughput = (
        f"{float(published) / float(duration):,.1f} msgs/s published"
        if published and duration
        else ""
    )
    header = (
        "<header><h1>fleetstream · demo report</h1>"
        f'<span class="meta">run ended <span id="updated">-</span> · {html.escape(throughput)}'
        "</span></header>"
    )
    summary_panel = (
        '<section class="panel"><h2>this run</h2>'
        f'<table id="summary">{rows}</table></section>'
        '<section class="panel"><h2>end-to-end latency (device time -> stored), ms</h2>'
        '<div class="chart" id="chart-latency"></div></section>'
    )
    latency_chart = {
        "grid": {"left": 60, "right": 24, "top": 16, "bottom": 28},
        "tooltip": {},
        "xAxis": {"type": "category", "data": ["p50", "p99"]},
        "yAxis": {"type": "value"},
        "series": [
            {
                "type": "bar",
                "label": {"show": True, "position": "top"},
                "data": [latency.get("p50"), latency.get("p99")],
            }
        ],
    }
    data = json.dumps(document, separators=(",", ":"))
    return (
        _head("fleetstream · demo report")
        + f"<body>{header}<main>{summary_panel}{_body()}</main>"
        + _script(asset("echarts.min.js"))
        + _script(asset("dashboard.js"))
        + _script(
            f"FleetDashboard.render({data});"
            "echarts.init(document.getElementById('chart-latency'))"
            f".setOption({json.dumps(latency_chart)});"
            "document.getElementById('chart-latency').dataset.rendered='1';"
        )
        + "</body></html>"
    )
