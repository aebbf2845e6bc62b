"""``fleet demo --report FILE.html``: the run's summary and the dashboard's document at its end,
written as one self-contained HTML file (:func:`infra.api.dashboard.page.report_page`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from infra.api.client import HotPathClient
from infra.api.dashboard.collect import client_tables, collect
from infra.api.dashboard.page import report_page
from infra.settings import Settings

__all__ = ["write_report"]


def write_report(settings: Settings, summary: Mapping[str, Any], path: Path) -> Path:
    """Gather the dashboard's document from the running stack (the warehouse, Kafka, the
    compacted tables) and write the report to ``path`` (its folder made if need be)."""
    client = HotPathClient(settings)
    try:
        document = collect(settings, client_tables(client), client.alerts)
    finally:
        client.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(report_page(summary, document), encoding="utf-8")
    tmp.replace(path)
    return path
