"""The cold path's batch handling: ok/error split, retry while the warehouse is away, and
batches the warehouse refuses going to the dead-letter topic."""

from __future__ import annotations

import asyncio
from typing import Any

from schemas.codec import AvroCodec, load_schema
from streams.runtime.loader import LoaderCounters, LoadPath, decode_batch
from streams.runtime.records import DeadLetter, SourceRecord
from streams.runtime.transactions import Backoff

CODEC = AvroCodec(load_schema("Telemetry"), schema_id=9)


def _record(seq: int) -> SourceRecord:
    value = CODEC.encode({"device_id": "d-1", "seq": seq, "ts": 1, "received_at": 2})
    return SourceRecord("telemetry.raw", 0, seq, b"d-1", value)


class Unavailable(Exception):
    pass


class Refused(Exception):
    pass


def _path(write: Any, dead: list[DeadLetter]) -> LoadPath:
    async def dead_letter(items: list[DeadLetter]) -> None:
        dead.extend(items)

    return LoadPath(
        "telemetry",
        CODEC,
        write,
        dead_letter,
        (Unavailable,),
        LoaderCounters(),
        rejected=(Refused,),
        backoff=Backoff(first=0.001, longest=0.001),
    )


def test_decode_batch_splits_ok_from_garbage_keeping_where_it_came_from() -> None:
    garbage = SourceRecord("telemetry.raw", 2, 41, b"d-9", b"\x00\x00\x00\x00\x09\xff")
    out = decode_batch([_record(1), garbage, _record(2)], CODEC)
    assert [r["seq"] for r in out.records] == [1, 2]
    assert [d.source for d in out.dead] == [garbage]
    headers = dict(out.dead[0].headers())
    assert (headers["partition"], headers["offset"], headers["source"]) == (b"2", b"41", b"cold")


def test_a_batch_is_retried_until_the_warehouse_takes_it() -> None:
    attempts: list[int] = []

    async def write(records: list[dict[str, Any]]) -> None:
        attempts.append(len(records))
        if len(attempts) < 3:
            raise Unavailable("warehouse down")

    path = _path(write, [])
    asyncio.run(path.store_batch([_record(1), _record(2)]))
    assert attempts == [2, 2, 2]
    assert (path.counters.stored_rows, path.counters.retries) == (2, 2)


def test_a_refused_batch_goes_whole_to_the_dead_letters() -> None:
    async def write(records: list[dict[str, Any]]) -> None:
        raise Refused("type mismatch")

    dead: list[DeadLetter] = []
    path = _path(write, dead)
    asyncio.run(path.store_batch([_record(1), _record(2)]))
    assert [d.source.offset for d in dead] == [1, 2]
    assert {d.reason for d in dead} == {"sink_rejected"}
    assert path.counters.dead_lettered == 2
    assert path.counters.dead_letter_reasons == {"sink_rejected": 2}  # the metric's labels
    assert path.counters.stored_rows == 0


def test_commit_offsets_are_one_past_each_partitions_last_record() -> None:
    from streams.runtime.source import next_offsets

    batch = [SourceRecord("telemetry.raw", p, o, None, b"") for p, o in [(0, 5), (1, 9), (0, 7)]]
    batch.append(SourceRecord("device.events", 0, 2, None, b""))
    got = {(tp.topic, tp.partition, tp.offset) for tp in next_offsets(batch)}
    assert got == {("telemetry.raw", 0, 8), ("telemetry.raw", 1, 10), ("device.events", 0, 3)}


def test_a_tombstone_is_a_deletion_on_a_compacted_topic_and_bad_input_elsewhere() -> None:
    tombstone = SourceRecord("telemetry.raw", 0, 7, b"d-1", None)
    state = decode_batch([_record(1), tombstone], CODEC, compacted=True)
    assert (len(state.records), state.dead, state.tombstones) == (1, [], 1)
    stream = decode_batch([_record(1), tombstone], CODEC)
    assert len(stream.records) == 1
    assert [(d.reason, d.source.offset) for d in stream.dead] == [("no_value", 7)]
    assert stream.tombstones == 0
