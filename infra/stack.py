"""The platform stack on one machine: what `fleet up`, `down` and `status` act on."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from confluent_kafka import KafkaException

from infra.metrics import ScrapeTarget, assign_metrics_ports, scrape_targets
from infra.services.api import ApiService
from infra.services.base import Service, ServiceError, ServiceStatus
from infra.services.bridge import BridgeService
from infra.services.enforcer import EnforcerService
from infra.services.job import JobService, job_services
from infra.services.kafka import KafkaBroker
from infra.services.mosquitto import Mosquitto
from infra.services.prometheus import PrometheusService
from infra.services.registry import SchemaRegistry
from infra.settings import Settings
from infra.supervisor import SupervisorService
from infra.topics import consumer_lag, ensure_topics, list_topics
from schemas.identity import MAX_BRIDGE_REPLICAS
from streams.job_registry import JOBS, JobKind

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StackStatus:
    services: list[ServiceStatus]
    topics: dict[str, int] = field(default_factory=dict)
    consumer_lag: dict[str, int] = field(default_factory=dict)
    # Platform alerts pending or firing in Prometheus (none if it is off or not answering).
    alerts: list[dict[str, object]] = field(default_factory=list)

    @property
    def all_up(self) -> bool:
        return all(s.state == "up" for s in self.services)

    def to_dict(self) -> dict[str, object]:
        return {
            "services": [s.to_dict() for s in self.services],
            "topics": [{"name": n, "partitions": p} for n, p in self.topics.items()],
            "consumer_lag": self.consumer_lag,
            "alerts": self.alerts,
        }


# Consumer groups whose lag `fleet status` shows: every stream job's (its group and inputs, from
# the job registry: the kit's jobs, then the shipped Faust jobs) and the bridge's downlink.
LAG_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    *((job.group, job.inputs) for job in JOBS if job.kind is not JobKind.FAUST),
    ("bridge-downlink", ("mqtt.downlink",)),
    *((job.group, job.inputs) for job in JOBS if job.kind is JobKind.FAUST),
)


def formatted_brokers(state_dir: Path) -> int:
    """How many brokers the state folder's Kafka cluster was formatted for (0: none yet)."""
    return sum(1 for p in (state_dir / "kafka").glob("kafka-*") if (p / "data").exists())


def honour_state_brokers(settings: Settings) -> Settings:
    """The state folder's broker count, unless the broker count was given (FLEET_BROKERS or
    `--brokers`): `fleet down` and `fleet status` act on the cluster that is there."""
    formatted = formatted_brokers(settings.state_dir)
    if formatted and "brokers" not in settings.model_fields_set and formatted != settings.brokers:
        return settings.model_copy(update={"brokers": formatted})
    return settings


class Stack:
    """Kafka broker(s), the schema registry and Mosquitto, started in dependency order."""

    def __init__(self, settings: Settings) -> None:
        settings = honour_state_brokers(settings)
        self.settings = settings
        self.brokers = [KafkaBroker(settings, i) for i in range(settings.brokers)]
        # Brokers the folder holds beyond an explicit, smaller count: `down` stops them too.
        self.stray_brokers = [
            KafkaBroker(settings, i)
            for i in range(settings.brokers, formatted_brokers(settings.state_dir))
        ]
        self.registry = SchemaRegistry(settings)
        self.mosquitto = Mosquitto(settings)
        self.enforcer = EnforcerService(settings)
        self.bridges = [BridgeService(settings, i) for i in range(settings.bridge_replicas)]
        # Replicas beyond FLEET_BRIDGE_REPLICAS: retired by `up` if they ever ran here.
        self.spare_bridges = [
            BridgeService(settings, i) for i in range(settings.bridge_replicas, MAX_BRIDGE_REPLICAS)
        ]
        self.bridge = self.bridges[0]
        # The stream jobs, one service each, from the job registry (streams/job_registry.py).
        self.job_services = job_services(settings)
        self.cold_worker = self.job_services["cold-worker"]
        self.hot_worker = self.job_services["hot-worker"]
        self.ota = self.job_services["ota-controller"]
        services = list(self.job_services.values())
        self.kit_jobs = [s for s in services if s.job.kind is not JobKind.FAUST]
        # The shipped Faust jobs (`fleet jobs list` lists them too).
        self.jobs: list[JobService] = [s for s in services if s.job.kind is JobKind.FAUST]
        self.api = ApiService(settings)
        self.supervisor = SupervisorService(settings)
        # A metrics port per platform process, in this fixed order (infra/metrics.py).
        assign_metrics_ports(
            settings,
            [
                *self.bridges,
                *self.spare_bridges,
                self.enforcer,
                self.hot_worker,
                self.cold_worker,
                self.ota,
                self.api,
                self.supervisor,
                *self.jobs,
            ],
        )
        self.prometheus = (
            PrometheusService(settings, self.scrape_targets) if settings.prometheus else None
        )

    def scrape_targets(self) -> list[ScrapeTarget]:
        """What Prometheus scrapes: every process of the stack that serves metrics (one
        function, over the stack's process list, so another list is an easy switch)."""
        return scrape_targets(self.settings.host, self.services)

    @property
    def services(self) -> Sequence[Service]:
        return [*self.supervised, self.supervisor]

    @property
    def supervised(self) -> Sequence[Service]:
        """What the supervisor restarts when it dies: every service `up` starts."""
        return [
            *self.brokers,
            self.registry,
            self.mosquitto,
            self.enforcer,
            *self.bridges,
            *self.kit_jobs,
            self.api,
            *self.jobs,
            *([self.prometheus] if self.prometheus else []),
        ]

    def up(self) -> StackStatus:
        """Start what is not running and return once everything answers (idempotent)."""
        self._check_broker_count()
        timeout = self.settings.startup_timeout_s
        # Brokers of a multi-node quorum only answer together: spawn all, then wait.
        for broker in self.brokers:
            broker.launch()
        for broker in self.brokers:
            broker.wait_ready(timeout)
        ensure_topics(self.settings)
        self.registry.start(timeout)
        self.mosquitto.start(timeout)
        for spare in self.spare_bridges:
            if spare.has_run():
                spare.retire()  # fewer replicas than before: no share of messages left behind
        self.enforcer.launch()
        for bridge in self.bridges:
            bridge.launch()
        self.api.launch()
        for job in self.job_services.values():
            job.launch()
        for bridge in self.bridges:
            bridge.wait_ready(timeout)
        self.api.wait_ready(timeout)
        self.enforcer.wait_ready(timeout)
        for job in self.job_services.values():
            job.wait_ready(timeout)
        if self.prometheus:
            self.prometheus.start(timeout)
        # Last: from here on, whatever dies is started again (also a broker or Mosquitto).
        watching = set(self.supervisor.restarts()) if self.supervisor.report() else set()
        if watching and watching != {s.name for s in self.supervised}:
            self.supervisor.stop()  # started for another scale: watch this one's services
        self.supervisor.start(timeout)
        return self.status()

    def down(self) -> list[str]:
        """Stop, in reverse order, what `up` started; return the names stopped. The supervisor
        goes first, so nothing is started again behind this."""
        stopped = [self.supervisor.name] if self.supervisor.stop() else []
        platform = (
            # Also when turned off since it started: nothing of `up` outlives `down`.
            self.prometheus or PrometheusService(self.settings, self.scrape_targets),
            *self.jobs,
            self.api,
            *self.bridges,
            *self.spare_bridges,  # one still running from a larger scale
            *self.kit_jobs,
            self.enforcer,
            self.mosquitto,
            self.registry,
        )
        stopped += [s.name for s in platform if s.stop()]
        # Brokers of a quorum stop together: one by one, the last would wait on a lost quorum.
        brokers = [*self.brokers, *self.stray_brokers]
        for broker in brokers:
            broker.terminate()
        stopped += [b.name for b in reversed(brokers) if b.stop()]
        return stopped

    def status(self) -> StackStatus:
        services = self._with_restarts([s.status() for s in self.services])
        kafka_up = any(s.state == "up" for s in services if s.name.startswith("kafka"))
        topics: dict[str, int] = {}
        lag: dict[str, int] = {}
        if kafka_up:
            # A broker that answers its port may still be loading (after a restart): status
            # then shows no topics or lag rather than failing.
            try:
                topics = list_topics(self.settings)
                for group, sources in LAG_GROUPS:
                    lag[group] = consumer_lag(self.settings, group, sources)
            except KafkaException as exc:
                log.warning("Kafka's topics or lag not readable yet: %s", exc)
        alerts = [a.to_dict() for a in self.prometheus.alerts()] if self.prometheus else []
        return StackStatus(services=services, topics=topics, consumer_lag=lag, alerts=alerts)

    def _with_restarts(self, services: list[ServiceStatus]) -> list[ServiceStatus]:
        """Each service's restart count, and "backoff" for one the supervisor waits to start
        again, from the supervisor's last report."""
        watches = self.supervisor.restarts()
        merged = []
        for s in services:
            watch = watches.get(s.name)
            if not isinstance(watch, dict):
                merged.append(s)
                continue
            state = "backoff" if s.state == "down" and watch.get("state") == "backoff" else s.state
            merged.append(replace(s, state=state, restarts=int(watch.get("restarts", 0))))
        return merged

    def _check_broker_count(self) -> None:
        """A state folder formatted for N brokers cannot be started with another N."""
        kafka_dir = self.settings.state_dir / "kafka"
        formatted = sorted(p.name for p in kafka_dir.glob("kafka-*") if (p / "data").exists())
        if formatted and len(formatted) != self.settings.brokers:
            raise ServiceError(
                f"{kafka_dir} holds a {len(formatted)}-broker cluster; start it with "
                f"--brokers {len(formatted)}, or use another FLEET_STATE_DIR"
            )
