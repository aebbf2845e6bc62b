"""What a stream job reads and what it refuses: one Kafka record, and a dead letter (the record's
original key and bytes, with why and where from in its headers).

Every dead-letter topic of the platform (`dlq.ingest`, `dlq.hot`, `dlq.cold`) has this shape:
key and value as they were read, headers `error` (the reason), `detail`, `source` (the stage
that refused it), `topic`, `partition`, `offset`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SourceRecord:
    """One Kafka record as a stream worker sees it: where it came from, key and value."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None  # None: a tombstone
    timestamp_ms: int = 0  # the record's Kafka timestamp


@dataclass(frozen=True)
class DeadLetter:
    source: SourceRecord
    reason: str
    detail: str
    stage: str = "cold"  # which part of the platform refused it (header `source`)

    def headers(self) -> list[tuple[str, str | bytes | None]]:
        return [
            ("error", self.reason.encode()),
            ("detail", self.detail.encode("utf-8", "replace")),
            ("source", self.stage.encode()),
            ("topic", self.source.topic.encode()),
            ("partition", str(self.source.partition).encode()),
            ("offset", str(self.source.offset).encode()),
        ]
