"""What the platform runs, as tests on either side of the stack expect it."""

from __future__ import annotations

# Every platform process that serves /metrics (brokers, registry and Mosquitto serve none):
# the stack's scrape targets, one metrics port each.
METRICS_PROCESSES = frozenset(
    {
        "bridge-0",
        "enforcer",
        "hot-worker",
        "cold-worker",
        "ota-controller",
        "api",
        "supervisor",
        "job-fleet-health",
        "job-alert-webhooks",
        "prometheus",
    }
)
