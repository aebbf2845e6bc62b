"""GlobalTables.poll: what arrived is applied at once; with nothing there, a wait ends at the first
record a (stub) reader hands over, and without a wait it never blocks."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from streams.runtime import tables
from streams.runtime.clients import KafkaConfig
from streams.runtime.tables import GlobalTables

TOPIC = "registry.devices"


@dataclass(frozen=True)
class StubMessage:
    key: str

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return TOPIC


@dataclass
class StubReader:
    """`queued` is in the local queue already; `later` comes only to a poll that waits."""

    queued: list[StubMessage]
    later: list[StubMessage]
    waits: list[float] = field(default_factory=list)

    def consume(self, num_messages: int, timeout: float) -> list[StubMessage]:
        taken, self.queued = self.queued[:num_messages], self.queued[num_messages:]
        return taken

    def poll(self, timeout: float) -> StubMessage | None:
        self.waits.append(timeout)
        if not self.later:
            return None
        first, *rest = self.later
        self.queued, self.later = rest, []
        return first


def follow(monkeypatch: pytest.MonkeyPatch, reader: StubReader) -> tuple[GlobalTables, list[str]]:
    monkeypatch.setattr(tables, "_reader", lambda kafka, name: reader)
    applied: list[str] = []
    table = GlobalTables(
        KafkaConfig("127.0.0.1:1", "http://127.0.0.1:1"), {TOPIC: lambda m: applied.append(m.key)}
    )
    return table, applied


def test_what_is_there_is_applied_without_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    reader = StubReader(queued=[StubMessage("a"), StubMessage("b")], later=[StubMessage("c")])
    table, applied = follow(monkeypatch, reader)
    assert table.poll(0.5) == 2
    assert applied == ["a", "b"]
    assert reader.waits == []


def test_with_nothing_there_a_wait_ends_at_the_first_record_and_takes_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reader = StubReader(queued=[], later=[StubMessage("c"), StubMessage("d")])
    table, applied = follow(monkeypatch, reader)
    assert table.poll(0.5) == 2
    assert applied == ["c", "d"]
    assert reader.waits == [0.5]


def test_without_a_wait_poll_never_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    reader = StubReader(queued=[], later=[StubMessage("c")])
    table, applied = follow(monkeypatch, reader)
    assert table.poll() == 0
    assert applied == []
    assert reader.waits == []
