"""``fleet quality``: the quarantine's numbers, releasing rows from it, and the
great-expectations report.

A release is a request on ``quality.release`` (Kafka): the cold worker, which owns the
warehouse and writes it from one thread, applies it between two batches and records the rows
it moved in its status file (``quality.releases``), where the command reads the answer.

The report runs here, in the command's own process, never in the cold path: it reads a window
of recent ``telemetry`` rows through the query port (as ``fleet sql`` does), validates them with
the rules' expectation suite (sinks/quality/expectations.py) and writes the Data Docs under
``<state_dir>/quality``.
"""

from __future__ import annotations

import getpass
import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from confluent_kafka import KafkaException, Producer
from confluent_kafka.schema_registry import SchemaRegistryClient

from infra.settings import Settings
from infra.warehouse import fetch
from schemas.codec import CodecRegistry, load_schema
from sinks.quality.expectations import ReportSummary, validate
from sinks.quality.rules import QualityRules, load_rules
from streams.cold.loader import COLD_JOB
from streams.cold.quality import RELEASE_TOPIC

__all__ = [
    "ReleaseOutcome",
    "pending_by_rule",
    "quality_report",
    "quarantined",
    "request_release",
]

# Read through `fetch`, which picks queries/doris/<name>.sql on a Doris warehouse.
QUARANTINED_QUERY: Final = "queries/quarantined.sql"
BY_RULE_QUERY: Final = "queries/quarantine_by_rule.sql"
WINDOW_QUERY: Final = "queries/quality_window.sql"


def quarantined(settings: Settings, device_prefix: str = "") -> int:
    """Messages held in quarantine (not released, not in telemetry), counted with SQL."""
    result = fetch(settings, QUARANTINED_QUERY, {"device_prefix": device_prefix})
    return int(result.rows[0][0])


def pending_by_rule(settings: Settings, device_prefix: str = "") -> dict[str, int]:
    result = fetch(settings, BY_RULE_QUERY, {"device_prefix": device_prefix})
    return {str(rule): int(rows) for rule, rows in result.rows}


@dataclass(frozen=True)
class ReleaseOutcome:
    request_id: str
    moved: int | None  # None: not applied within the wait (the cold worker is not running)


def _cold_status(settings: Settings) -> Mapping[str, Any]:
    try:
        return dict(json.loads((settings.run_dir / f"{COLD_JOB.name}.json").read_text()))
    except (OSError, ValueError):
        return {}


def request_release(
    settings: Settings,
    rule: str | None,
    device: str | None,
    principal: str | None = None,
    wait_s: float = 60.0,
) -> ReleaseOutcome:
    """Ask the cold worker to move quarantined rows (of ``rule`` and/or ``device``, or all)
    into telemetry; wait up to ``wait_s`` for its answer."""
    codec = CodecRegistry(SchemaRegistryClient({"url": settings.registry_url})).codec(
        RELEASE_TOPIC, load_schema("QualityRelease")
    )
    request_id = uuid.uuid4().hex
    record = {
        "request_id": request_id,
        "rule": rule,
        "device_id": device,
        "principal": principal or f"user:{getpass.getuser()}",
        "ts": int(time.time() * 1000),
    }
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers, "acks": "all"})
    failures: list[str] = []
    producer.produce(
        RELEASE_TOPIC,
        key=request_id.encode(),
        value=codec.encode(record),
        on_delivery=lambda err, _msg: failures.append(str(err)) if err else None,
    )
    if producer.flush(30) or failures:
        raise KafkaException(f"the release request was not delivered: {failures[:1]}")
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        releases = _cold_status(settings).get("quality", {}).get("releases", {})
        if request_id in releases:
            return ReleaseOutcome(request_id, int(releases[request_id]))
        time.sleep(0.5)
    return ReleaseOutcome(request_id, None)


def quality_report(
    settings: Settings,
    minutes: int = 60,
    rows: int = 100_000,
    rules: QualityRules | None = None,
) -> ReportSummary:
    """Validate the last ``minutes`` of telemetry (at most ``rows``) with great-expectations;
    the Data Docs go under ``<state_dir>/quality``."""
    import pandas as pd

    window = fetch(settings, WINDOW_QUERY, {"minutes": str(minutes), "rows": str(rows)})
    frame = pd.DataFrame(list(window.rows), columns=list(window.columns))
    project = Path(settings.state_dir) / "quality"
    project.mkdir(parents=True, exist_ok=True)
    return validate(frame, rules or load_rules(), project)
