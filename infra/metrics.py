"""Prometheus metrics of the platform's processes: one registry per process, one port each.

Every process `fleet up` starts serves ``http://<host>:<port>/metrics``: the counters its loop
keeps (streams/runtime/metrics.py), plus the process's CPU, memory and Python GC. Ports are
``metrics_port + slot``, a slot per process of the stack in a fixed order (the bridge replicas
first, all MAX_BRIDGE_REPLICAS of them, so the others do not move when the replica count does);
`fleet up` hands each process its port (``FLEET_PROCESS_METRICS_PORT``), and `fleet status
--json` lists it (``metrics_port``). Prometheus' scrape targets come from the same list
(:func:`scrape_targets`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

from infra.settings import Settings
from streams.runtime.metrics import Closeable, Collect, MetricsSource, serve_metrics


def process_registry(*sources: MetricsSource) -> CollectorRegistry:
    """A process's registry: its own metrics and the standard process ones."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    for source in sources:
        registry.register(Collect(source))
    return registry


def serve_process_metrics(settings: Settings, *sources: MetricsSource) -> Closeable | None:
    """Serve this process's metrics on the port `fleet up` gave it (none if it gave none)."""
    return serve_metrics(process_registry(*sources), settings.host, settings.process_metrics_port)


class HasMetricsPort(Protocol):
    """What the port assignment needs of a service: its name and a settable metrics port."""

    name: str
    metrics_port: int


def assign_metrics_ports(settings: Settings, processes: Iterable[HasMetricsPort]) -> None:
    """Give each process its metrics port, in the order given (the stack's fixed order)."""
    for slot, process in enumerate(processes):
        process.metrics_port = settings.metrics_port + slot if settings.metrics_port else 0


@dataclass(frozen=True)
class ScrapeTarget:
    process: str  # the service's name: label `process` of its series
    address: str  # host:port


def scrape_targets(host: str, processes: Sequence[HasMetricsPort]) -> list[ScrapeTarget]:
    """What Prometheus scrapes: every process of the list that serves metrics."""
    return [ScrapeTarget(p.name, f"{host}:{p.metrics_port}") for p in processes if p.metrics_port]
