"""Metrics without services: the collectors' series, the ports each process gets, and the
Prometheus config and rules the stack generates (checked and unit-tested by Debian's promtool,
which `make system-deps` installs with the prometheus package)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from infra.api.metrics import UNMATCHED, ApiMetrics
from infra.metrics import process_registry, scrape_targets
from infra.prometheus import alerting_rules, duration, write_files
from infra.settings import Settings
from infra.stack import Stack
from ingest.bridge import BridgeCounters
from ingest.enforcement import EnforcerCounters
from schemas.identity import MAX_BRIDGE_REPLICAS
from streams.hot.metrics import hot_metrics
from streams.hot.processor import HotCounters
from streams.ota.job import OtaCounters
from streams.ota.metrics import by_state
from streams.ota.model import Progress, RolloutState
from streams.registry.agent import RegistryCounters
from streams.runtime.loader import LoaderCounters
from streams.runtime.metrics import (
    Buckets,
    Collect,
    MetricsSource,
    counted,
    counted_by,
    counter_families,
)
from tests.support.processes import METRICS_PROCESSES


def samples(*sources: MetricsSource) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Each exposed sample, as Prometheus would read it: (name, labels) -> value."""
    registry = CollectorRegistry()
    for source in sources:
        registry.register(Collect(source))
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# ------------------------------------------------------------------------ collectors


def test_buckets_expose_a_cumulative_histogram() -> None:
    buckets = Buckets((0.01, 0.1, 1.0))
    for value in (0.005, 0.05, 0.05, 0.5, 3.0):
        buckets.observe(value)
    got = samples(lambda: [buckets.family("fleetstream_test_seconds", "a test")])
    assert got[("fleetstream_test_seconds_bucket", (("le", "0.01"),))] == 1
    assert got[("fleetstream_test_seconds_bucket", (("le", "0.1"),))] == 3
    assert got[("fleetstream_test_seconds_bucket", (("le", "1.0"),))] == 4
    assert got[("fleetstream_test_seconds_bucket", (("le", "+Inf"),))] == 5
    assert got[("fleetstream_test_seconds_count", ())] == 5
    assert got[("fleetstream_test_seconds_sum", ())] == pytest.approx(3.605)


def test_a_value_on_a_bound_falls_in_that_bucket() -> None:
    buckets = Buckets((0.1, 1.0))
    buckets.observe(0.1)  # Prometheus' buckets are "less than or equal"
    assert buckets.counts == [1, 0, 0]


def test_the_hot_jobs_counters_are_exposed_as_totals() -> None:
    from streams.hot.job import HotState

    state = HotState()
    state.counters.alerts_raised = 3
    state.counters.alerts_resolved = 1
    got = samples(lambda: hot_metrics(state))
    assert got[("fleetstream_hot_alerts_raised_total", ())] == 3
    assert got[("fleetstream_hot_alerts_resolved_total", ())] == 1
    assert got[("fleetstream_hot_twins_converged", ())] == 0


@dataclass
class _Counters:
    seen: int = counted("Things seen")
    kept: int = counted("Things kept", metric="stored")
    total: int = 0  # a plain field: left out
    by_kind: dict[str, int] = counted_by("kind", "Things by kind")


def test_counted_fields_are_the_counters_their_declarations_say() -> None:
    c = _Counters(seen=3, kept=2, total=9, by_kind={"a": 1, "b": 4})
    got = samples(lambda: counter_families("fleetstream_test", c))
    assert got == {
        ("fleetstream_test_seen_total", ()): 3,
        ("fleetstream_test_stored_total", ()): 2,
        ("fleetstream_test_by_kind_total", (("kind", "a"),)): 1,
        ("fleetstream_test_by_kind_total", (("kind", "b"),)): 4,
    }


def test_the_processes_counters_keep_their_metric_names() -> None:
    """Rules, dashboards and scrapes name these: deriving the families from the counters'
    declarations renamed none."""
    names = {
        "fleetstream_bridge": (BridgeCounters(), {"accepted", "dead_lettered", "redelivered",
            "kafka_retries", "unproducible", "resubscribes_when_deaf"}),
        "fleetstream_loader": (LoaderCounters(), {"rows", "dead_lettered", "batches",
            "tombstones", "retries"}),
        "fleetstream_ota": (OtaCounters(), {"requests", "reports", "commands", "joins",
            "dead_lettered"}),
        "fleetstream_registry": (RegistryCounters(), {"commands", "decisions", "malformed"}),
        "fleetstream_enforcer": (EnforcerCounters(), {"records", "undecodable", "revoked",
            "held", "released", "reloads", "sessions_ended", "errors", "crl_refreshes"}),
        "fleetstream_hot": (HotCounters(), {"telemetry", "alerts_raised", "alerts_resolved",
            "twin_changes", "twin_conflicts", "stale_ignored", "dead_lettered"}),
    }  # fmt: skip
    for prefix, (counters, before) in names.items():
        exposed = {
            family.name.removeprefix(prefix + "_") for family in counter_families(prefix, counters)
        }
        assert before <= exposed, prefix


def test_ota_devices_by_progress_keep_every_state() -> None:
    device = SimpleNamespace(status=Progress.succeeded)
    rollouts: dict[str, Any] = {
        "r1": SimpleNamespace(state=RolloutState.running, devices={"d1": device, "d2": device}),
        "r2": SimpleNamespace(state=RolloutState.completed, devices={}),
    }
    states, progress = by_state(rollouts)
    assert (states["running"], states["completed"], states["aborted"]) == (1, 1, 0)
    assert (progress["succeeded"], progress["failed"]) == (2, 0)
    assert set(progress) == {p.value for p in Progress}


def test_api_requests_are_counted_by_route_method_and_status() -> None:
    metrics = ApiMetrics()
    matched = SimpleNamespace(match_info=SimpleNamespace(route=SimpleNamespace(name="get_twin")))
    unmatched = SimpleNamespace(match_info=SimpleNamespace(route=None))
    for request, status in ((matched, 200), (matched, 200), (matched, 403), (unmatched, 404)):
        metrics.observe(SimpleNamespace(**vars(request), method="GET"), status, 0.002)  # type: ignore[arg-type]
    got = samples(metrics.metrics)
    key = "fleetstream_api_requests_total"
    assert got[(key, (("method", "GET"), ("route", "get_twin"), ("status", "200")))] == 2
    assert got[(key, (("method", "GET"), ("route", "get_twin"), ("status", "403")))] == 1
    assert got[(key, (("method", "GET"), ("route", UNMATCHED), ("status", "404")))] == 1
    assert got[("fleetstream_api_request_seconds_count", ())] == 4


def test_a_process_registry_adds_the_process_metrics() -> None:
    text = generate_latest(process_registry(lambda: [])).decode()
    assert "process_cpu_seconds_total" in text
    assert "python_gc_objects_collected_total" in text


# ------------------------------------------------------------------------ ports, targets


def test_every_platform_process_gets_its_own_metrics_port(tmp_path: Path) -> None:
    stack = Stack(Settings(state_dir=tmp_path, metrics_port=20400))
    targets = {t.process: t.address for t in stack.scrape_targets()}
    assert set(targets) == METRICS_PROCESSES  # brokers, registry, Mosquitto serve no /metrics
    assert len(set(targets.values())) == len(targets)
    assert targets["bridge-0"] == "127.0.0.1:20400"
    assert targets["enforcer"] == f"127.0.0.1:{20400 + MAX_BRIDGE_REPLICAS}"
    statuses = {s.name: s.metrics_port for s in (svc.status() for svc in stack.services)}
    assert statuses["hot-worker"] == int(targets["hot-worker"].rsplit(":", 1)[1])
    assert statuses["kafka-0"] is None


def test_more_bridge_replicas_move_no_other_process(tmp_path: Path) -> None:
    one = Stack(Settings(state_dir=tmp_path))
    three = Stack(Settings(state_dir=tmp_path, bridge_replicas=3))
    ports_one = {t.process: t.address for t in one.scrape_targets()}
    ports_three = {t.process: t.address for t in three.scrape_targets()}
    assert {p: a for p, a in ports_three.items() if p in ports_one} == ports_one
    assert {"bridge-1", "bridge-2"} <= set(ports_three)


def test_metrics_and_prometheus_can_be_turned_off(tmp_path: Path) -> None:
    stack = Stack(Settings(state_dir=tmp_path, metrics_port=0, prometheus=False))
    assert stack.prometheus is None
    assert stack.scrape_targets() == []
    assert "prometheus" not in {s.name for s in stack.supervised}
    assert scrape_targets("127.0.0.1", stack.services) == []


# ------------------------------------------------------------------------ config and rules


def promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool missing: `make system-deps` installs Debian's prometheus package"
    return found


@pytest.fixture
def generated(tmp_path: Path) -> Path:
    settings = Settings(state_dir=tmp_path / "state", prometheus_alert_for_s=60)
    return write_files(settings, Stack(settings).scrape_targets(), tmp_path / "prometheus")


def test_promtool_accepts_the_generated_config_and_rules(generated: Path) -> None:
    done = subprocess.run(
        [promtool(), "check", "config", str(generated)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 rule files found" in done.stdout
    config = yaml.safe_load(generated.read_text())
    [job] = config["scrape_configs"]
    processes = {c["labels"]["process"] for c in job["static_configs"]}
    assert {"hot-worker", "cold-worker", "bridge-0", "api", "supervisor"} <= processes


def test_durations_use_prometheus_syntax() -> None:
    assert [duration(s) for s in (0.5, 2.0, 60.0, 90.0, 120.0)] == [
        "500ms",
        "2s",
        "1m",
        "90s",
        "2m",
    ]


def test_every_alert_holds_for_the_configured_time() -> None:
    rules = alerting_rules(Settings(prometheus_alert_for_s=2.0))
    assert {r["alert"] for r in rules} == {
        "FleetProcessDown",
        "FleetConsumerLagGrowing",
        "FleetDeadLettersHigh",
        "FleetBridgeWithholdingAcks",
        "FleetOtaRolloutStalled",
    }
    assert {r["for"] for r in rules} == {"2s"}


ALERT_TESTS = """
rule_files: [rules.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'up{job="fleetstream", process="hot-worker"}'
        values: '1 1 0 0 0'
      - series: 'up{job="fleetstream", process="api"}'
        values: '1 1 1 1 1'
    alert_rule_test:
      - eval_time: 2m
        alertname: FleetProcessDown
        exp_alerts: []
      - eval_time: 4m
        alertname: FleetProcessDown
        exp_alerts:
          - exp_labels: {severity: critical, job: fleetstream, process: hot-worker}
            exp_annotations: {summary: "hot-worker does not answer its metrics scrape"}
  - interval: 1m
    input_series:
      - series: 'fleetstream_consumer_lag{group="fleetstream-cold", topic="telemetry.raw"}'
        values: '0 2000 4000 6000 8000 10000 12000 14000 16000'
      - series: 'fleetstream_consumer_lag{group="fleetstream-hot", topic="telemetry.raw"}'
        values: '5000 5000 5000 5000 5000 5000 5000 5000 5000'
    alert_rule_test:
      - eval_time: 8m
        alertname: FleetConsumerLagGrowing
        exp_alerts:
          - exp_labels:
              severity: warning
              group: fleetstream-cold
              topic: telemetry.raw
            exp_annotations:
              summary: "consumer group fleetstream-cold is 16000 records behind and falling back"
  - interval: 1m
    input_series:
      - series: 'fleetstream_bridge_dead_lettered_total{process="bridge-0", reason="bad_json"}'
        values: '0+300x10'
    alert_rule_test:
      - eval_time: 8m
        alertname: FleetDeadLettersHigh
        exp_alerts:
          - exp_labels: {severity: warning}
            exp_annotations: {summary: "5 dead letters a second across the platform"}
  - interval: 1m
    input_series:
      - series: 'fleetstream_bridge_inflight{process="bridge-0"}'
        values: '5 5 5 5 5 5'
      - series: 'fleetstream_bridge_last_delivery_timestamp_seconds{process="bridge-0"}'
        values: '0 0 0 0 0 0'
      - series: 'fleetstream_bridge_inflight{process="bridge-1"}'
        values: '0 0 0 0 0 0'
      - series: 'fleetstream_bridge_last_delivery_timestamp_seconds{process="bridge-1"}'
        values: '0 0 0 0 0 0'
    alert_rule_test:
      - eval_time: 5m
        alertname: FleetBridgeWithholdingAcks
        exp_alerts:
          - exp_labels: {severity: critical, process: bridge-0}
            exp_annotations:
              summary: "bridge-0 holds un-acked messages and Kafka took none for a minute"
  - interval: 1m
    input_series:
      - series: 'fleetstream_ota_rollouts{state="running"}'
        values: '1x40'
      - series: 'fleetstream_ota_devices{progress="succeeded"}'
        values: '0 1 2 3 3x36'
    alert_rule_test:
      - eval_time: 10m
        alertname: FleetOtaRolloutStalled
        exp_alerts: []
      - eval_time: 30m
        alertname: FleetOtaRolloutStalled
        exp_alerts:
          - exp_labels: {severity: warning}
            exp_annotations:
              summary: "an OTA rollout is running and no device of it finished in 15m"
"""


def test_the_alerting_rules_fire_on_what_they_watch(generated: Path) -> None:
    """promtool's rule unit tests: each alert fires on its condition (held long enough), and
    not on the healthy series beside it."""
    tests = generated.parent / "alerts_test.yml"
    tests.write_text(ALERT_TESTS)
    done = subprocess.run([promtool(), "test", "rules", str(tests)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
