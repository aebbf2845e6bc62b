"""The whole pipeline on real services: simulator -> Mosquitto -> bridge -> Kafka -> cold
path -> chDB, counted with SQL."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from infra.services.base import wait_until
from infra.settings import PROJECT_ROOT, Settings
from infra.stack import Stack
from tests.support.cli import fleet_cli
from tests.support.fleet import start_fleet
from tests.support.warehouse import assert_stored_exactly_once, provision_fleet, stored_rows

SUMMARY_KEYS = {
    "devices",
    "published",
    "stored",
    "duplicates",
    "dead_lettered",
    "alerts",
    "twins",
    "e2e_latency_ms",
    "quarantined",
}


def test_demo_with_200_devices_stores_exactly_what_was_published(
    stack: Stack, settings: Settings
) -> None:
    result = fleet_cli(
        settings,
        *("demo", "--devices", "200", "--duration", "10", "--rate", "2", "--json"),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(summary) >= SUMMARY_KEYS
    assert summary["devices"] == 200
    assert summary["published"] >= 200 * 10  # 2 msgs/s for 10 s, less start-up jitter
    # About 1% of the readings are made bad on purpose: the quality gate holds them.
    assert summary["quarantined"] > 0
    assert summary["stored"] + summary["quarantined"] == summary["published"]
    assert summary["duplicates"] == 0
    assert summary["dead_lettered"] == 0
    assert 0 < summary["e2e_latency_ms"]["p50"] <= summary["e2e_latency_ms"]["p99"]
    # Every device got the demo's desired change and reported it back: no delta left.
    assert summary["twins"] == 200
    assert isinstance(summary["alerts"], int)
    assert summary["alerts"] >= 0


def test_kill_9_of_the_worker_mid_stream_keeps_the_warehouse_exact(
    stack: Stack, settings: Settings, tmp_path: Path
) -> None:
    prefix, creds = provision_fleet(settings, "crash", 50, tmp_path)
    stored_before = stored_rows(stack)
    fleet = start_fleet(settings, creds, rate=10, duration=60, max_messages=150)
    assert wait_until(lambda: stored_rows(stack) > stored_before + 1000, timeout=90)
    stack.cold_worker.kill()
    stack.cold_worker.start(settings.startup_timeout_s)
    stats, devices = fleet.wait()
    assert stats.published == 50 * 150
    assert_stored_exactly_once(settings, prefix, devices, stats.published, timeout=120)


def test_fleet_sql_prints_json_rows_while_the_pipeline_runs(
    stack: Stack, settings: Settings
) -> None:
    result = fleet_cli(
        settings, "sql", "SELECT 1 AS one, 'x' AS letter", "--format", "json", timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [{"one": 1, "letter": "x"}]
    listed = fleet_cli(
        settings,
        *("sql", "queries/latest_reading.sql", "--format", "json"),
        timeout=60,
        cwd=PROJECT_ROOT,
    )
    assert listed.returncode == 0, listed.stderr
    assert isinstance(json.loads(listed.stdout), list)


HOLD_WAREHOUSE = """
import signal, sys
import clickhouse_connect
client = clickhouse_connect.get_client(dsn=sys.argv[1])
client.query("SELECT 1")
print("holding", flush=True)
signal.pause()
"""


def test_warehouse_unavailable_for_a_while_loses_nothing(
    stack: Stack, settings: Settings, tmp_path: Path
) -> None:
    """The embedded warehouse is owned by another process (one owner per chDB folder) while
    telemetry keeps arriving: the cold worker waits with back-off, then loads it all, once."""
    prefix, creds = provision_fleet(settings, "down", 40, tmp_path)
    stack.cold_worker.stop()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_WAREHOUSE, settings.warehouse_dsn],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "holding"
        stack.cold_worker.launch()
        fleet = start_fleet(settings, creds, rate=5, duration=60, max_messages=40)

        def waiting() -> bool:
            return "waiting_for" in stack.cold_worker.counters()

        assert wait_until(waiting, timeout=60)
        stats, devices = fleet.wait()
        assert stats.published == 40 * 40
        assert not stack.cold_worker.counters().get("ready")
    finally:
        holder.terminate()
        holder.wait(timeout=30)
    stack.cold_worker.wait_ready(settings.startup_timeout_s)
    assert_stored_exactly_once(settings, prefix, devices, stats.published, timeout=120)
