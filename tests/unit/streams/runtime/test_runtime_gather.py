"""`gather`: an idle consumer waits once for a first record; a busy one batches after it."""

from __future__ import annotations

from dataclasses import dataclass, field

from streams.runtime.source import gather


@dataclass
class FakeConsumer:
    """Records what was asked of it; `queued` is what a poll or consume hands over."""

    queued: list[str] = field(default_factory=list)
    calls: list[tuple[str, int, float]] = field(default_factory=list)

    def poll(self, timeout: float) -> str | None:
        self.calls.append(("poll", 1, timeout))
        return self.queued.pop(0) if self.queued else None

    def consume(self, num_messages: int, timeout: float) -> list[str]:
        self.calls.append(("consume", num_messages, timeout))
        taken, self.queued = self.queued[:num_messages], self.queued[num_messages:]
        return taken


def test_idle_consumer_waits_once_for_the_first_record() -> None:
    consumer = FakeConsumer()
    assert gather(consumer, 5000, idle_s=0.8, linger_s=0.02) == []  # type: ignore[arg-type]
    # One wait of the whole idle time, no batch wait after it.
    assert consumer.calls == [("poll", 1, 0.8)]


def test_busy_consumer_batches_what_follows_the_first_record() -> None:
    consumer = FakeConsumer(queued=[f"r{i}" for i in range(10)])
    got = gather(consumer, 4, idle_s=1.0, linger_s=0.02)  # type: ignore[arg-type]
    assert got == ["r0", "r1", "r2", "r3"]
    assert consumer.calls == [("poll", 1, 1.0), ("consume", 3, 0.02)]
    assert consumer.queued == [f"r{i}" for i in range(4, 10)]


def test_a_negative_idle_time_does_not_wait() -> None:
    consumer = FakeConsumer(queued=["r0"])
    assert gather(consumer, 1, idle_s=-0.5, linger_s=0.02) == ["r0"]  # type: ignore[arg-type]
    assert consumer.calls == [("poll", 1, 0.0)]
