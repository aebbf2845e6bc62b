"""Where the dashboard's numbers come from, read from what the platform already has (not from
Prometheus, which may be off): the warehouse through its query port (messages in and stored,
devices online), Kafka (consumer lag per job as `fleet status` computes it, the dead-letter
topics, the ``alerts`` topic), the bridges' status files, and the compacted tables (registry,
twins, rollouts) — the API's in-memory copies, or :class:`HotPathClient`'s reads for the CLI.

:class:`DashboardSource` gathers one document (:mod:`infra.api.dashboard.shape`) and keeps it
for ``max_age_s``, so any number of open pages cost one gathering per interval.
"""

from __future__ import annotations

import http.client
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaException, TopicPartition

from infra.api.client import HotPathClient, HotPathError
from infra.api.dashboard.shape import (
    alerts_per_minute,
    devices_view,
    rollouts_view,
    throughput_series,
    twins_view,
)
from infra.settings import Settings
from infra.stack import LAG_GROUPS
from infra.topics import consumer_lag
from infra.warehouse import fetch
from queries.runner import QueryError
from streams.hot.alerts import AlertEvent
from streams.hot.twin import Twin
from streams.ota.model import Rollout
from streams.registry.devices import DeviceRecord
from streams.runtime.status import read_status

__all__ = ["DashboardSource", "Tables", "client_tables", "collect"]

WINDOW_S = 600  # the charts' time span
BUCKET_S = 10  # the throughput chart's step
ONLINE_S = 60  # a device that sent telemetry this recently counts as online
DEAD_LETTER_PREFIX = "dlq."
_KAFKA_TIMEOUT_S = 5.0

_SERIES_SQL = """
SELECT toUnixTimestamp64Milli(toDateTime64(toStartOfInterval({column:Identifier},
       INTERVAL {bucket:UInt32} SECOND), 3)) AS t, count() AS n
FROM telemetry
WHERE {column:Identifier} >= now64(3) - INTERVAL {window:UInt32} SECOND
GROUP BY t ORDER BY t
"""
_TOTALS_SQL = """
SELECT uniqExact(device_id, seq) AS stored,
       uniqExactIf(device_id, received_at >= now64(3) - INTERVAL {online:UInt32} SECOND) AS online
FROM telemetry
"""


class Tables(Protocol):
    """The compacted tables the dashboard reads."""

    def devices(self) -> Sequence[DeviceRecord]: ...

    def twins(self) -> Iterable[Twin]: ...

    def rollouts(self) -> Mapping[str, Rollout]: ...


class _ClientTables:
    """The tables read from Kafka by a :class:`HotPathClient` (the CLI: `fleet demo`)."""

    def __init__(self, client: HotPathClient) -> None:
        self.client = client

    def devices(self) -> Sequence[DeviceRecord]:
        return list(self.client.devices().values())

    def twins(self) -> Iterable[Twin]:
        return self.client.twins().values()

    def rollouts(self) -> Mapping[str, Rollout]:
        return self.client.rollouts()


def client_tables(client: HotPathClient) -> Tables:
    return _ClientTables(client)


def _query_server_answers(settings: Settings) -> bool:
    """The warehouse's owner serves its query port: read through it, never by opening the
    embedded warehouse in this process."""
    base = f"http://{settings.host}:{settings.query_port}"
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=3.0) as response:  # noqa: S310
            return bool(response.status == 200)
    except (urllib.error.URLError, http.client.HTTPException, OSError):
        return False


def _warehouse(settings: Settings, now_ms: int, errors: dict[str, str]) -> dict[str, Any]:
    if not _query_server_answers(settings):
        errors["warehouse"] = f"no query server on {settings.host}:{settings.query_port}"
        return {}
    try:
        series = {
            column: [
                (int(t), int(n))
                for t, n in fetch(
                    settings,
                    _SERIES_SQL,
                    {"column": column, "bucket": str(BUCKET_S), "window": str(WINDOW_S)},
                    timeout_s=20.0,
                ).rows
            ]
            for column in ("received_at", "stored_at")
        }
        stored, online = fetch(settings, _TOTALS_SQL, {"online": str(ONLINE_S)}).rows[0]
    except QueryError as exc:
        errors["warehouse"] = str(exc)
        return {}
    return {
        "throughput": throughput_series(
            series["received_at"], series["stored_at"], now_ms, BUCKET_S, WINDOW_S
        ),
        "stored": int(stored),
        "online": int(online),
    }


def _dead_letters(settings: Settings) -> list[dict[str, Any]]:
    """Records on each dead-letter topic (``dlq.*``): its end offsets less its start ones."""
    consumer = Consumer(
        {"bootstrap.servers": settings.bootstrap_servers, "group.id": "fleetstream-dashboard"}
    )
    try:
        meta = consumer.list_topics(timeout=_KAFKA_TIMEOUT_S)
        out = []
        for name in sorted(t for t in meta.topics if t.startswith(DEAD_LETTER_PREFIX)):
            count = 0
            for partition in meta.topics[name].partitions:
                low, high = consumer.get_watermark_offsets(
                    TopicPartition(name, partition), timeout=_KAFKA_TIMEOUT_S
                )
                count += high - low
            out.append({"topic": name, "count": count})
        return out
    finally:
        consumer.close()


def _kafka(
    settings: Settings,
    alerts: Callable[[int], list[AlertEvent]],
    now_ms: int,
    errors: dict[str, str],
) -> dict[str, Any]:
    try:
        lag = [
            {"group": group, "lag": consumer_lag(settings, group, topics)}
            for group, topics in LAG_GROUPS
        ]
        dead = _dead_letters(settings)
        events = alerts(now_ms - WINDOW_S * 1000)
    except (KafkaException, HotPathError) as exc:
        errors["kafka"] = str(exc)
        return {}
    return {
        "lag": lag,
        "dead_letters": dead,
        "alerts": alerts_per_minute(events, now_ms, WINDOW_S // 60),
    }


def _bridges(settings: Settings) -> dict[str, int]:
    """The bridge replicas' counters, summed (their status files)."""
    totals = {"accepted": 0, "dead_lettered": 0}
    for path in sorted(settings.run_dir.glob("bridge-*.json")):
        report = read_status(path)
        for key in totals:
            totals[key] += int(report.get(key, 0) or 0)
    return totals


def collect(
    settings: Settings,
    tables: Tables,
    alerts: Callable[[int], list[AlertEvent]],
    now_ms: int | None = None,
) -> dict[str, Any]:
    """One dashboard document (blocking: the warehouse and Kafka are asked)."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    errors: dict[str, str] = {}
    warehouse = _warehouse(settings, now, errors)
    kafka = _kafka(settings, alerts, now, errors)
    bridges = _bridges(settings)
    dead = kafka.get("dead_letters", [])
    return {
        "generated_ms": now,
        "window_s": WINDOW_S,
        "bucket_s": BUCKET_S,
        "devices": devices_view(tables.devices(), warehouse.get("online", 0)),
        "totals": {
            "accepted": bridges["accepted"],
            "stored": warehouse.get("stored", 0),
            "dead_lettered": sum(int(d["count"]) for d in dead),
        },
        "throughput": warehouse.get("throughput", {"t": [], "in": [], "stored": []}),
        "lag": kafka.get("lag", []),
        "dead_letters": dead,
        "alerts": kafka.get("alerts", {"t": [], "by_severity": {}}),
        "twins": twins_view(tables.twins()),
        "rollouts": rollouts_view(tables.rollouts()),
        "errors": errors,
    }


class DashboardSource:
    """The API's dashboard data: :func:`collect` at most once per ``max_age_s``."""

    def __init__(self, settings: Settings, tables: Tables, max_age_s: float = 2.0) -> None:
        self.settings = settings
        self.tables = tables
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._client: HotPathClient | None = None
        self._document: dict[str, Any] | None = None
        self._at = 0.0

    def _alerts(self, since_ms: int) -> list[AlertEvent]:
        if self._client is None:
            self._client = HotPathClient(self.settings)
        return self._client.alerts(since_ms)

    def snapshot(self) -> dict[str, Any]:
        """The document, gathered again when older than ``max_age_s`` (blocking)."""
        with self._lock:
            if self._document is None or time.monotonic() - self._at > self.max_age_s:
                self._document = collect(self.settings, self.tables, self._alerts)
                self._at = time.monotonic()
            return self._document

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
