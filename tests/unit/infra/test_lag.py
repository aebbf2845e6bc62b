"""The lag probe's arithmetic, on a stand-in admin client: committed offsets per group, every
partition's end in one request, starts only for what a group never committed."""

from __future__ import annotations

from concurrent.futures import Future
from types import SimpleNamespace
from typing import Any

from confluent_kafka import TopicPartition

from infra.lag import LagProbe


def _done(value: Any) -> Future[Any]:
    future: Future[Any] = Future()
    future.set_result(value)
    return future


class StandInAdmin:
    def __init__(self, committed: dict[str, dict[tuple[str, int], int]], ends: dict[str, int]):
        self.committed = committed
        self.ends = ends  # topic -> end offset of each of its partitions; starts are 10
        self.offset_requests = 0

    def list_consumer_group_offsets(self, request: list[Any]) -> dict[str, Future[Any]]:
        group = request[0].group_id
        tps = [TopicPartition(t, p, o) for (t, p), o in self.committed[group].items()]
        return {group: _done(SimpleNamespace(topic_partitions=tps))}

    def list_offsets(self, wanted: dict[TopicPartition, Any], **_: Any) -> dict[Any, Future[Any]]:
        self.offset_requests += 1
        latest = type(next(iter(wanted.values()))).__name__ == "LatestSpec"
        return {
            tp: _done(SimpleNamespace(offset=self.ends[tp.topic] if latest else 10))
            for tp in wanted
        }


class StandInConsumer:
    def list_topics(self, timeout: float) -> Any:
        partitions = {0: None, 1: None}
        return SimpleNamespace(
            topics={t: SimpleNamespace(partitions=partitions) for t in ("raw", "events")}
        )


def test_lag_is_end_minus_committed_or_start_with_one_request_per_offset_kind() -> None:
    admin = StandInAdmin(
        committed={
            "hot": {("raw", 0): 90, ("raw", 1): -1001},  # partition 1: never committed
            "cold": {("raw", 0): 100, ("raw", 1): 100, ("events", 0): 5, ("events", 1): 7},
        },
        ends={"raw": 100, "events": 7},
    )
    probe = LagProbe("unused:9092", [("hot", ["raw"]), ("cold", ["raw", "events"])])

    lag = probe.measure_once(admin, StandInConsumer())  # type: ignore[arg-type]

    assert lag == {("hot", "raw"): 10 + 90, ("cold", "raw"): 0, ("cold", "events"): 2}
    assert admin.offset_requests == 2  # the ends, then the one start needed
