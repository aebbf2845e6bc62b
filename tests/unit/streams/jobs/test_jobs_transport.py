"""The jobs' Faust transport: commits on a topic written in transactions reach its end."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

import pytest
from faust.transport.drivers.aiokafka import Consumer as FaustConsumer
from faust.types import TP
from intervaltree import IntervalTree  # type: ignore[import-untyped]

from streams.jobs.transport import _Consumer

TOPIC = TP("telemetry.digests", 0)


def commit_after_reading(consumer_class: type[Any], offsets: list[int]) -> int | None:
    """The offset a commit takes after `offsets` were read and acked, as Faust's fetch loop
    (`Consumer._drain_messages`) and `ack` book them."""
    consumer = object.__new__(consumer_class)
    consumer._gap = defaultdict(IntervalTree)
    consumer._acked = defaultdict(list)
    consumer._acked_index = defaultdict(set)
    consumer._committed_offset = defaultdict(lambda: None)
    read = None
    for offset in offsets:
        if read and offset - read > 1:  # Faust's condition: what lies between was skipped
            asyncio.run(consumer._add_gap(TOPIC, read + 1, offset))
        read = offset
        consumer._acked[TOPIC].append(offset)
        consumer._acked_index[TOPIC].add(offset)
    new_offset: int | None = consumer._new_offset(TOPIC)
    return new_offset


# One record per transaction, each followed by its commit marker: records at odd offsets.
RECORDS = list(range(1, 40, 2))


def test_one_commit_takes_every_record_read_past_the_commit_markers() -> None:
    assert commit_after_reading(_Consumer, RECORDS) == RECORDS[-1] + 1


def test_faust_alone_commits_no_further_than_the_first_marker() -> None:
    # Why _Consumer exists: the crawl it fixes (one transaction per commit interval).
    assert commit_after_reading(FaustConsumer, RECORDS) == 4


@pytest.mark.parametrize("offsets", [list(range(1, 30)), [1, 2, 5, 6, 9]])
def test_without_markers_or_with_longer_gaps_the_commit_is_the_same(offsets: list[int]) -> None:
    assert commit_after_reading(_Consumer, offsets) == offsets[-1] + 1
