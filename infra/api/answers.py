"""Answers to requests, read by one long-lived consumer per answers topic.

A request (a desired-state change, a registry command, an OTA request) is a record on a topic;
its answer comes back on another (`twin.responses`, `audit.log`) carrying the request's id. A
client used to open a consumer per request, positioned at the end of the answers topic before
sending: about 70 ms of metadata and offset lookups on every call, and more for the API, which
sends many. An AnswerListener is positioned once, at the end of the topic when it is created,
and reads from there on a thread of its own; a caller registers the ids it waits for *before*
sending them (so no answer can slip by) and is woken when the last one arrived. Answers nobody
waits for are dropped.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, Message, TopicPartition

from infra.settings import Settings
from streams.runtime.source import gather

log = logging.getLogger("fleetstream.answers")

Decode = Callable[[Message], dict[str, Any] | None]


@dataclass
class Waiter:
    """What one caller waits for: its ids, the answers so far, a wake-up when complete."""

    ids: frozenset[str]
    answers: dict[str, dict[str, Any]] = field(default_factory=dict)
    done: threading.Event = field(default_factory=threading.Event)


class AnswerListener:
    def __init__(
        self, settings: Settings, topic: str, id_field: str, decode: Decode, timeout: float
    ) -> None:
        self.topic = topic
        self._id_field = id_field
        self._decode = decode
        self._consumer = Consumer(
            {
                "bootstrap.servers": settings.bootstrap_servers,
                "group.id": f"fleet-answers-{uuid.uuid4().hex[:8]}",  # never commits
                "enable.auto.commit": False,
                "isolation.level": "read_committed",  # an aborted answer never answers
                # The broker answers a waiting fetch as soon as an answer is committed; the
                # wait only bounds empty fetches (10 ms was 100 requests a second, idle).
                "fetch.wait.max.ms": 200,
            }
        )
        meta = self._consumer.list_topics(topic, timeout=timeout).topics[topic]
        ends = []
        for partition in sorted(meta.partitions):
            _, high = self._consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=timeout
            )
            ends.append(TopicPartition(topic, partition, high))
        self._consumer.assign(ends)  # from here on every answer is seen
        self._lock = threading.Lock()
        self._waiting: dict[str, Waiter] = {}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"answers-{topic}", daemon=True)
        self._thread.start()

    def expect(self, ids: Iterable[str]) -> Waiter:
        """Register the ids of requests about to be sent."""
        waiter = Waiter(frozenset(ids))
        with self._lock:
            for request_id in waiter.ids:
                self._waiting[request_id] = waiter
        return waiter

    def wait(self, waiter: Waiter, timeout: float) -> dict[str, dict[str, Any]]:
        """The answers that arrived within ``timeout`` (all of them, or fewer); then forget."""
        deadline = time.monotonic() + timeout
        while not waiter.done.wait(min(0.5, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline or not self._thread.is_alive():
                break
        self.forget(waiter)
        with self._lock:
            return dict(waiter.answers)

    def forget(self, waiter: Waiter) -> None:
        """Stop waiting for ``waiter``'s ids (answers that come later are dropped)."""
        with self._lock:
            for request_id in waiter.ids:
                self._waiting.pop(request_id, None)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                # Returns the moment an answer is here; idle, one wake-up every half second.
                messages = gather(self._consumer, 1000, idle_s=0.5, linger_s=0.0)
            except Exception:
                if self._stopping.is_set():
                    return
                log.exception("reading %s failed; retrying", self.topic)
                self._stopping.wait(0.5)
                continue
            for msg in messages:
                if msg.error() is not None:
                    continue
                record = self._decode(msg)
                request_id = None if record is None else record.get(self._id_field)
                if record is not None and request_id is not None:
                    self._deliver(str(request_id), record)

    def _deliver(self, request_id: str, record: dict[str, Any]) -> None:
        with self._lock:
            waiter = self._waiting.get(request_id)
            if waiter is None:
                return
            waiter.answers[request_id] = record
            if len(waiter.answers) == len(waiter.ids):
                waiter.done.set()

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        self._consumer.close()
