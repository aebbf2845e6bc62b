"""The whole pipeline on real services: simulator -> Mosquitto -> bridge -> Kafka -> cold
path -> chDB, counted with SQL."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

from infra.keys import key_passphrase
from infra.pki import CertificateAuthority
from infra.provision import load_or_provision
from infra.services.base import wait_until
from infra.settings import PROJECT_ROOT, Settings
from infra.stack import Stack
from infra.warehouse import fetch, warehouse_counts
from tests.conftest import settings_env
from tests.support.fleet import start_fleet, telemetry_sent

FLEET = str(PROJECT_ROOT / ".venv" / "bin" / "fleet")
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
    result = subprocess.run(
        [FLEET, "demo", "--devices", "200", "--duration", "10", "--rate", "2", "--json"],
        env=settings_env(settings),
        capture_output=True,
        text=True,
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
    ca = CertificateAuthority.load_or_create(settings.pki_dir, passphrase=key_passphrase(settings))
    prefix = f"crash{uuid.uuid4().hex[:4]}-"
    creds = load_or_provision(ca, [f"{prefix}{i:03d}" for i in range(50)], tmp_path, "ec")
    stored_before = int(stack.cold_worker.counters().get("stored_rows", 0))
    fleet = start_fleet(settings, creds, rate=10, duration=60, max_messages=150)
    assert wait_until(
        lambda: int(stack.cold_worker.counters().get("stored_rows", 0)) > stored_before + 1000,
        timeout=90,
    )
    stack.cold_worker.kill()
    stack.cold_worker.start(settings.startup_timeout_s)
    stats, devices = fleet.wait()
    published = stats.published
    assert published == 50 * 150

    def drained() -> bool:
        return warehouse_counts(settings, device_prefix=prefix).stored >= published

    assert wait_until(drained, timeout=120, interval=1.0)
    counts = warehouse_counts(settings, device_prefix=prefix)
    assert (counts.stored, counts.duplicates) == (published, 0)
    # Every (device, seq) the fleet sent is there: not just the right number of rows.
    rows = fetch(
        settings,
        "SELECT device_id, seq FROM telemetry FINAL WHERE startsWith(device_id, {p:String})",
        {"p": prefix},
    ).rows
    assert {(r[0], int(r[1])) for r in rows} == telemetry_sent(devices)


def test_fleet_sql_prints_json_rows_while_the_pipeline_runs(
    stack: Stack, settings: Settings
) -> None:
    result = subprocess.run(
        [FLEET, "sql", "SELECT 1 AS one, 'x' AS letter", "--format", "json"],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [{"one": 1, "letter": "x"}]
    listed = subprocess.run(
        [FLEET, "sql", "queries/latest_reading.sql", "--format", "json"],
        env=settings_env(settings),
        capture_output=True,
        text=True,
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
    ca = CertificateAuthority.load_or_create(settings.pki_dir, passphrase=key_passphrase(settings))
    prefix = f"down{uuid.uuid4().hex[:4]}-"
    creds = load_or_provision(ca, [f"{prefix}{i:03d}" for i in range(40)], tmp_path, "ec")
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

    def drained() -> bool:
        return warehouse_counts(settings, device_prefix=prefix).stored >= stats.published

    assert wait_until(drained, timeout=120, interval=1.0)
    counts = warehouse_counts(settings, device_prefix=prefix)
    assert (counts.stored, counts.duplicates) == (stats.published, 0)
    rows = fetch(
        settings,
        "SELECT device_id, seq FROM telemetry FINAL WHERE startsWith(device_id, {p:String})",
        {"p": prefix},
    ).rows
    assert {(r[0], int(r[1])) for r in rows} == telemetry_sent(devices)
