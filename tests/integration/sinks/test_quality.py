"""The data-quality gate through the real cold path (the session stack: Kafka, registry, the
cold worker on chDB): bad rows land in `quarantine` and on `dlq.quality`, good rows in
`telemetry`, `fleet quality release` moves rows back (idempotently), and `fleet quality report`
writes great-expectations' Data Docs."""

from __future__ import annotations

import json
import math
import time
import uuid
from pathlib import Path
from typing import Any

from confluent_kafka import Producer
from confluent_kafka.schema_registry import SchemaRegistryClient

from infra.quality import quarantined, request_release
from infra.services.base import wait_until
from infra.settings import Settings
from infra.stack import Stack
from infra.warehouse import fetch, warehouse_counts
from schemas.codec import CodecRegistry, load_schema
from sinks.quality.rules import load_rules
from tests.support.browser import PNG_MAGIC, chromium, keep_for_docs, visible_text
from tests.support.cli import fleet_cli
from tests.support.kafka import collect
from tests.support.records import telemetry_record


def produce_readings(settings: Settings, records: list[dict[str, Any]]) -> None:
    codec = CodecRegistry(SchemaRegistryClient({"url": settings.registry_url})).codec(
        "telemetry.raw", load_schema("Telemetry")
    )
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers, "acks": "all"})
    for record in records:
        producer.produce(
            "telemetry.raw", key=record["device_id"].encode(), value=codec.encode(record)
        )
    assert producer.flush(30) == 0


HEALTHY = {"temperature": 21.0, "humidity": 45.0, "battery": 80.0, "vibration_rms": 0.7}


def reading(device: str, seq: int, now: int, **values: Any) -> dict[str, Any]:
    """A reading the quality rules pass, but for ``values``."""
    return telemetry_record(device, seq, now, **{**HEALTHY, **values})


def test_bad_rows_are_quarantined_dead_lettered_and_released(
    stack: Stack, settings: Settings
) -> None:
    prefix = f"qual{uuid.uuid4().hex[:6]}-"
    now = int(time.time() * 1000)
    good = [reading(f"{prefix}a", seq, now + seq) for seq in range(1, 21)]
    bad = [
        reading(f"{prefix}a", 21, now, humidity=180.0),
        reading(f"{prefix}a", 22, now, temperature=math.nan),
        reading(f"{prefix}b", 1, now, ts=now + 3_600_000),  # an hour ahead of received_at
        reading(f"{prefix}b", 2, now, humidity=-3.0),
    ]
    produce_readings(settings, good + bad)

    assert wait_until(
        lambda: (
            warehouse_counts(settings, device_prefix=prefix).stored >= len(good)
            and quarantined(settings, prefix) >= len(bad)
        ),
        timeout=90,
    )
    assert warehouse_counts(settings, device_prefix=prefix).stored == len(good)
    rows = fetch(
        settings,
        "SELECT device_id, seq, rule, reason, batch_id FROM quarantine FINAL "
        "WHERE startsWith(device_id, {p:String}) ORDER BY device_id, seq",
        {"p": prefix},
    ).rows
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (f"{prefix}a", 21, "range"),
        (f"{prefix}a", 22, "nan"),
        (f"{prefix}b", 1, "future"),
        (f"{prefix}b", 2, "range"),
    ]
    assert rows[0][3] == "humidity=180 outside [0, 100]"
    assert all(r[4].startswith("telemetry.raw/") for r in rows)

    letters = collect(
        settings,
        "dlq.quality",
        keep=lambda m: (m.key() or b"").decode().startswith(prefix),
        done=lambda kept: len(kept) >= len(bad),
    )
    assert sorted(dict(m.headers() or [])["error"].decode() for m in letters) == [
        "future",
        "nan",
        "range",
        "range",
    ]
    assert all(dict(m.headers() or [])["source"] == b"quality" for m in letters)
    by_rule = stack.cold_worker.counters()["quality"]["by_rule"]
    assert by_rule["range"] >= 2
    assert by_rule["nan"] >= 1
    assert by_rule["future"] >= 1

    # Release one device's rows, then the same again: moved once.
    released = fleet_cli(settings, "quality", "release", "--device", f"{prefix}b", timeout=300)
    assert released.returncode == 0, released.stderr[-2000:]
    assert json.loads(released.stdout.strip().splitlines()[-1])["released"] == 2
    again = request_release(settings, rule=None, device=f"{prefix}b", wait_s=60)
    assert again.moved == 0
    counts = warehouse_counts(settings, device_prefix=prefix)
    assert (counts.stored, counts.duplicates) == (len(good) + 2, 0)
    assert quarantined(settings, prefix) == 2


def test_quality_report_writes_data_docs_that_show_in_headless_chromium(
    stack: Stack, settings: Settings, tmp_path: Path
) -> None:
    prefix = f"qrep{uuid.uuid4().hex[:6]}-"
    now = int(time.time() * 1000)
    produce_readings(settings, [reading(f"{prefix}a", seq, now + seq) for seq in range(1, 11)])
    assert wait_until(
        lambda: warehouse_counts(settings, device_prefix=prefix).stored >= 10, timeout=90
    )
    result = fleet_cli(settings, "quality", "report", "--minutes", "30", "--json", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    report = Path(summary["report"])
    assert report.is_file()
    assert report.name == "index.html"
    assert report.is_relative_to(settings.state_dir / "quality")
    assert summary["rows"] >= 10
    assert summary["evaluated"] == len(summary["expectations"]) > 0
    rules = {item["rule"] for item in summary["expectations"]}
    assert rules >= {"range", "future/stale", "duplicate"}
    # Telemetry read FINAL holds one row per message. (Other rules may show exceptions: rows
    # released from quarantine by hand are in the window too.)
    [unique] = [e for e in summary["expectations"] if e["rule"] == "duplicate"]
    assert unique["success"] is True
    assert "telemetry_quality" in report.read_text()

    # The newest validation's page, as a person would open it from the index, in a browser.
    pages = sorted((report.parent / "validations").rglob("*.html"), key=lambda p: p.stat().st_mtime)
    assert pages, "the Data Docs hold no validation page"
    page = pages[-1].as_uri()
    text = visible_text(chromium(page, tmp_path / "profile", "--dump-dom").stdout)
    assert "Expectation Suite: telemetry_quality" in text
    assert f"Evaluated Expectations {summary['evaluated']}" in text
    assert "must be unique together: device_id , seq" in text
    bounds = load_rules().metrics["temperature"]
    assert f"greater than or equal to {bounds.min} and less than or equal to {bounds.max}" in text
    shot = tmp_path / "data-docs.png"
    taken = chromium(page, tmp_path / "profile", f"--screenshot={shot}", size="1400,1800")
    assert shot.exists(), taken.stderr[-2000:]
    assert shot.read_bytes()[:8] == PNG_MAGIC
    keep_for_docs(shot, "data-docs.png")
