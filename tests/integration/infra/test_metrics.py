"""Prometheus metrics on the session stack: every process serves its series and they move
with traffic; the stack's Prometheus scrapes every process and fires an alert when one stops.

The test stack shortens Prometheus' scrape and evaluation intervals and the alerts' `for:` to
seconds (tests/conftest.py), so the alert test takes seconds, not minutes."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

from infra.services.base import wait_until
from infra.settings import Settings
from infra.stack import Stack
from tests.conftest import DeviceIdentity
from tests.support.mqtt import publish_telemetry
from tests.support.processes import METRICS_PROCESSES

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(settings: Settings, port: int) -> Samples:
    url = f"http://{settings.host}:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    return sum(
        value
        for (n, have), value in samples.items()
        if n == name and set(labels.items()) <= set(have)
    )


def metrics_ports(stack: Stack) -> dict[str, int]:
    services = stack.status().to_dict()["services"]
    assert isinstance(services, list)
    return {s["name"]: s["metrics_port"] for s in services if s["metrics_port"]}


def test_every_process_serves_its_series_and_they_move_with_traffic(
    stack: Stack, settings: Settings, make_device: Callable[..., DeviceIdentity]
) -> None:
    ports = metrics_ports(stack)  # as `fleet status --json` lists them
    assert set(ports) == METRICS_PROCESSES
    series = {
        "bridge-0": "fleetstream_bridge_puback_seconds_count",
        "enforcer": "fleetstream_enforcer_records_total",
        "hot-worker": "fleetstream_job_commit_seconds_count",
        "cold-worker": "fleetstream_loader_batch_records_count",
        "ota-controller": "fleetstream_ota_rollouts",
        "api": "fleetstream_api_request_seconds_count",
        "supervisor": "fleetstream_supervisor_restarts_total",
        "job-fleet-health": "fleetstream_faust_events_total",
        "job-alert-webhooks": "fleetstream_faust_events_total",
    }
    before = {name: scrape(settings, port) for name, port in ports.items() if name in series}
    for name, metric in series.items():
        assert any(n == metric for n, _ in before[name]), f"{name} does not expose {metric}"

    device = make_device("metrics")
    now = int(time.time() * 1000)
    readings = [
        json.dumps({"seq": seq, "ts": now, "temperature": 21.5}).encode() for seq in range(1, 6)
    ]
    publish_telemetry(settings, device, [*readings, b"{not json"])
    with urllib.request.urlopen(
        f"http://{settings.host}:{settings.api_port}/healthz", timeout=5
    ) as response:
        assert response.status == 200

    def grew(process: str, metric: str, by: float, **labels: str) -> Callable[[], bool]:
        start = total(before[process], metric, **labels)
        return lambda: total(scrape(settings, ports[process]), metric, **labels) >= start + by

    checks = {
        "bridge accepted": grew("bridge-0", "fleetstream_bridge_accepted_total", 5),
        "bridge dead letters": grew(
            "bridge-0", "fleetstream_bridge_dead_lettered_total", 1, reason="not_json"
        ),
        "PUBACK latency": grew("bridge-0", "fleetstream_bridge_puback_seconds_count", 6),
        "Kafka delivery": grew("bridge-0", "fleetstream_bridge_kafka_delivery_seconds_count", 6),
        "hot records": grew("hot-worker", "fleetstream_job_records_total", 5),
        "hot telemetry": grew("hot-worker", "fleetstream_hot_telemetry_total", 5),
        "rows loaded": grew("cold-worker", "fleetstream_loader_rows_total", 5, table="telemetry"),
        # The five readings reach fleet_health as the hot path's digests (one per batch).
        "faust consumed": grew(
            "job-fleet-health",
            "fleetstream_faust_messages_received_total",
            1,
            topic="telemetry.digests",
        ),
        "api requests": grew(
            "api", "fleetstream_api_requests_total", 1, route="healthz", status="200"
        ),
    }
    pending = dict(checks)
    deadline = time.monotonic() + 60
    while pending and time.monotonic() < deadline:
        pending = {what: check for what, check in pending.items() if not check()}
        if pending:
            time.sleep(0.5)
    assert not pending, f"did not move with the traffic: {sorted(pending)}"
    lag = scrape(settings, ports["api"])
    groups = {dict(labels).get("group") for n, labels in lag if n == "fleetstream_consumer_lag"}
    assert {"fleetstream-cold", "fleetstream-hot", "fleet_health"} <= groups


def test_prometheus_scrapes_every_process_and_alerts_when_one_stops(
    stack: Stack, settings: Settings
) -> None:
    prometheus = stack.prometheus
    assert prometheus is not None
    expected = {t.process for t in stack.scrape_targets()}
    assert expected == METRICS_PROCESSES
    health: dict[str, str] = {}

    def all_up() -> bool:
        health.update(prometheus.targets_health())
        return set(health) == expected and set(health.values()) == {"up"}

    assert wait_until(all_up, 60, 0.5), f"targets: {health}"

    stopped = stack.ota
    assert stopped.stop()
    try:

        def firing() -> list[dict[str, object]]:
            return [
                a
                for a in stack.status().alerts
                if a["name"] == "FleetProcessDown"
                and a["state"] == "firing"
                and isinstance(a["labels"], dict)
                and a["labels"].get("process") == stopped.name
            ]

        assert wait_until(lambda: bool(firing()), 60, 0.5), stack.status().alerts
        [alert] = firing()
        assert alert["severity"] == "critical"
        assert alert["summary"] == f"{stopped.name} does not answer its metrics scrape"
    finally:
        stopped.start(settings.startup_timeout_s)
    # Back up: the alert resolves (nothing else of the stack is reported down).
    assert wait_until(
        lambda: not [a for a in stack.status().alerts if a["name"] == "FleetProcessDown"],
        60,
        0.5,
    ), stack.status().alerts
