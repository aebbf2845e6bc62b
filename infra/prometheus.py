"""The Prometheus server's files, generated: its scrape config and the platform's rules.

Pure functions of the settings and the stack's scrape targets (infra/metrics.py), written by
the Prometheus service (infra/services/prometheus.py) before each start; `promtool check
config` accepts them (tests/unit/infra/test_metrics.py).

Recording rules turn the counters into per-second rates (``fleetstream:<what>:rate1m``), which
the alerts and the dashboard read. Alerting rules watch the platform itself:

| alert | fires when |
|---|---|
| FleetProcessDown | a platform process does not answer its scrape (``up == 0``) |
| FleetConsumerLagGrowing | a consumer group is behind and its lag grew over 5 minutes |
| FleetDeadLettersHigh | more than 1 dead letter a second (bridge, jobs, loader) for the window |
| FleetBridgeWithholdingAcks | a bridge holds un-acked messages and Kafka took none for 60 s |
| FleetOtaRolloutStalled | a rollout runs and no device of it finished in 15 minutes |

Each alert fires once its condition held for ``prometheus_alert_for_s`` (FLEET_PROMETHEUS_
ALERT_FOR_S; the integration tests shorten it).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from infra.metrics import ScrapeTarget
from infra.settings import Settings

RULES_FILE = "rules.yml"
SCRAPE_JOB = "fleetstream"

# Dead letters per second, across the platform, above which FleetDeadLettersHigh fires.
DEAD_LETTER_RATE = 1.0
# A bridge with un-acked messages whose last Kafka delivery is older than this (seconds).
WITHHELD_ACKS_S = 60
# A running rollout with no device finishing for this long is stalled.
ROLLOUT_STALL = "15m"


def duration(seconds: float) -> str:
    """Prometheus' duration syntax: whole milliseconds (``1500ms``, ``5s``, ``2m``)."""
    ms = max(round(seconds * 1000), 0)
    if ms % 60_000 == 0 and ms:
        return f"{ms // 60_000}m"
    if ms % 1000 == 0:
        return f"{ms // 1000}s"
    return f"{ms}ms"


def scrape_config(
    settings: Settings, targets: Sequence[ScrapeTarget], rules: Path
) -> dict[str, Any]:
    """prometheus.yml: every target in one job, labelled with its process name."""
    interval = duration(settings.prometheus_scrape_interval_s)
    return {
        "global": {
            "scrape_interval": interval,
            "scrape_timeout": duration(min(settings.prometheus_scrape_interval_s, 10.0)),
            "evaluation_interval": duration(settings.prometheus_evaluation_interval_s),
        },
        "rule_files": [str(rules)],
        "scrape_configs": [
            {
                "job_name": SCRAPE_JOB,
                "static_configs": [
                    {"targets": [t.address], "labels": {"process": t.process}} for t in targets
                ],
            }
        ],
    }


def recording_rules() -> list[dict[str, str]]:
    rates = {
        "fleetstream:bridge_accepted:rate1m": "sum(rate(fleetstream_bridge_accepted_total[1m]))",
        "fleetstream:bridge_dead_lettered:rate1m": (
            "sum by (reason) (rate(fleetstream_bridge_dead_lettered_total[1m]))"
        ),
        "fleetstream:dead_lettered:rate1m": (
            "sum(rate(fleetstream_bridge_dead_lettered_total[1m]) or vector(0))"
            " + sum(rate(fleetstream_loader_dead_lettered_total[1m]) or vector(0))"
            " + sum(rate(fleetstream_job_table_dead_lettered_total[1m]) or vector(0))"
            " + sum(rate(fleetstream_hot_dead_lettered_total[1m]) or vector(0))"
            " + sum(rate(fleetstream_ota_dead_lettered_total[1m]) or vector(0))"
        ),
        "fleetstream:loader_rows:rate1m": (
            "sum by (table) (rate(fleetstream_loader_rows_total[1m]))"
        ),
        "fleetstream:job_records:rate1m": (
            "sum by (process) (rate(fleetstream_job_records_total[1m]))"
        ),
        "fleetstream:alerts_raised:rate1m": "sum(rate(fleetstream_hot_alerts_raised_total[1m]))",
        "fleetstream:api_requests:rate1m": (
            "sum by (route, status) (rate(fleetstream_api_requests_total[1m]))"
        ),
        "fleetstream:bridge_kafka_delivery_seconds:p99_1m": (
            "histogram_quantile(0.99, sum by (le) "
            "(rate(fleetstream_bridge_kafka_delivery_seconds_bucket[1m])))"
        ),
        "fleetstream:ota_devices_finished": (
            'sum(fleetstream_ota_devices{progress=~"succeeded|failed|rolled_back|'
            'rollback_failed|skipped"}) or vector(0)'
        ),
    }
    return [{"record": name, "expr": expr} for name, expr in rates.items()]


def alerting_rules(settings: Settings) -> list[dict[str, Any]]:
    hold = duration(settings.prometheus_alert_for_s)

    def alert(name: str, expr: str, severity: str, summary: str) -> dict[str, Any]:
        return {
            "alert": name,
            "expr": expr,
            "for": hold,
            "labels": {"severity": severity},
            "annotations": {"summary": summary},
        }

    return [
        alert(
            "FleetProcessDown",
            f'up{{job="{SCRAPE_JOB}"}} == 0',
            "critical",
            "{{ $labels.process }} does not answer its metrics scrape",
        ),
        alert(
            "FleetConsumerLagGrowing",
            "fleetstream_consumer_lag > 1000 and delta(fleetstream_consumer_lag[5m]) > 0",
            "warning",
            "consumer group {{ $labels.group }} is {{ $value }} records behind and falling back",
        ),
        alert(
            "FleetDeadLettersHigh",
            f"fleetstream:dead_lettered:rate1m > {DEAD_LETTER_RATE}",
            "warning",
            "{{ $value }} dead letters a second across the platform",
        ),
        alert(
            "FleetBridgeWithholdingAcks",
            "fleetstream_bridge_inflight > 0 and "
            f"(time() - fleetstream_bridge_last_delivery_timestamp_seconds) > {WITHHELD_ACKS_S}",
            "critical",
            "{{ $labels.process }} holds un-acked messages and Kafka took none for a minute",
        ),
        alert(
            "FleetOtaRolloutStalled",
            'sum(fleetstream_ota_rollouts{state="running"}) > 0 and on() '
            f"changes(fleetstream:ota_devices_finished[{ROLLOUT_STALL}]) == 0",
            "warning",
            f"an OTA rollout is running and no device of it finished in {ROLLOUT_STALL}",
        ),
    ]


def rules(settings: Settings) -> dict[str, Any]:
    return {
        "groups": [
            {"name": "fleetstream-rates", "rules": recording_rules()},
            {"name": "fleetstream-platform", "rules": alerting_rules(settings)},
        ]
    }


def write_files(settings: Settings, targets: Sequence[ScrapeTarget], folder: Path) -> Path:
    """Write prometheus.yml and the rules into `folder`; the config's path."""
    folder.mkdir(parents=True, exist_ok=True)
    rules_path = folder / RULES_FILE
    rules_path.write_text(yaml.safe_dump(rules(settings), sort_keys=False))
    config = folder / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config(settings, targets, rules_path), sort_keys=False))
    return config
