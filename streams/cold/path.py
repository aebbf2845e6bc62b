"""The cold path: Kafka -> decode -> batch -> warehouse, offsets committed after the write.

The worker commits a batch's offsets (streams/runtime/source.py) only after `store_batch`
returned. So `store_batch` must never return before the batch is durably in the warehouse: it
retries with back-off while the warehouse is away (the stream pauses, nothing is skipped).
Records that cannot be decoded go to `dlq.cold` with their original bytes and where they came
from, before the batch is committed."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from schemas.codec import AvroCodec, Decoded
from streams.runtime.records import DeadLetter, SourceRecord
from streams.runtime.transactions import Backoff

log = logging.getLogger("fleetstream.cold")

DLQ_TOPIC = "dlq.cold"


@dataclass(frozen=True)
class DecodedBatch:
    records: list[dict[str, Any]]
    dead: list[DeadLetter]
    tombstones: int = 0


def decode_batch(
    batch: Sequence[SourceRecord], codec: AvroCodec, *, compacted: bool = False
) -> DecodedBatch:
    """Pure: the ok/error split of a batch. On a compacted topic a record without a value is a
    deletion (counted, nothing to load); anywhere else it is bad input."""
    records: list[dict[str, Any]] = []
    dead: list[DeadLetter] = []
    tombstones = 0
    for rec in batch:
        if rec.value is None:
            if compacted:
                tombstones += 1
            else:
                dead.append(DeadLetter(rec, "no_value", "a record without a value (tombstone)"))
            continue
        result = codec.decode(rec.value)
        if isinstance(result, Decoded):
            records.append(result.record)
        else:
            dead.append(DeadLetter(rec, str(result.reason), result.detail))
    return DecodedBatch(records, dead, tombstones)


@dataclass
class ColdCounters:
    batches: int = 0
    stored_rows: int = 0
    dead_lettered: int = 0
    tombstones: int = 0
    retries: int = 0
    last_batch_at: float = 0.0
    by_table: dict[str, int] = field(default_factory=dict)


# The cold path waits longer between tries than a transactional job: a warehouse away is
# usually away for a while.
COLD_BACKOFF = Backoff(first=0.2, longest=10.0)


async def until_done(
    attempt: Callable[[], Awaitable[None]],
    retryable: tuple[type[BaseException], ...],
    counters: ColdCounters,
    what: str,
    backoff: Backoff = COLD_BACKOFF,
) -> None:
    """Run `attempt` until it succeeds; retryable failures wait and try again."""
    for delay in backoff.delays():
        try:
            await attempt()
            return
        except retryable as exc:
            counters.retries += 1
            log.warning("%s failed (%s); retrying in %.1fs", what, exc, delay)
            await asyncio.sleep(delay)


@dataclass
class ColdPath:
    """What one cold agent does with a batch; I/O is injected so it tests without services."""

    table: str
    codec: AvroCodec
    write: Callable[[list[dict[str, Any]]], Awaitable[None]]
    dead_letter: Callable[[list[DeadLetter]], Awaitable[None]]
    retryable: tuple[type[BaseException], ...]
    counters: ColdCounters
    # Failures that retrying cannot cure (the warehouse refuses the rows): the batch goes to the
    # dead-letter topic instead, so the stream neither stalls forever nor skips silently.
    rejected: tuple[type[BaseException], ...] = ()
    backoff: Backoff = COLD_BACKOFF
    compacted: bool = False  # the source is a compacted state topic (tombstones are deletions)

    async def store_batch(self, batch: Sequence[SourceRecord]) -> None:
        decoded = decode_batch(batch, self.codec, compacted=self.compacted)
        self.counters.tombstones += decoded.tombstones
        try:
            await self._store(decoded)
        except self.rejected as exc:
            log.error("%s refused a batch of %d: %s", self.table, len(batch), exc)
            refused = [DeadLetter(rec, "sink_rejected", str(exc)) for rec in batch]
            decoded = DecodedBatch([], refused)
            await self._store(decoded)
        self.counters.batches += 1
        self.counters.last_batch_at = time.time()

    async def _store(self, decoded: DecodedBatch) -> None:
        if decoded.dead:
            dead = decoded.dead
            await until_done(
                lambda: self.dead_letter(dead),
                self.retryable,
                self.counters,
                f"dead-lettering {len(dead)} from {self.table}",
            )
            self.counters.dead_lettered += len(dead)
        if decoded.records:
            records = decoded.records
            await until_done(
                lambda: self.write(records),
                self.retryable,
                self.counters,
                f"writing {len(records)} rows to {self.table}",
            )
            self.counters.stored_rows += len(records)
            self.counters.by_table[self.table] = self.counters.by_table.get(self.table, 0) + len(
                records
            )
