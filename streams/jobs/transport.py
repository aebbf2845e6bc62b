"""Faust's aiokafka transport, reading only committed records.

The platform's own jobs write their outputs in Kafka transactions (alerts, twin.state, ...);
a reader that is not read_committed also sees the records of aborted transactions, which
the platform never meant to publish. Faust sets read_committed only in its exactly-once mode
(which the platform does not use), so the worker's consumer is made read_committed here.

A table recovers from its changelog until it has read the record just below the partition's
end offset. On a topic written in transactions (``registry.devices``, the device registry's
GlobalTable) the last offset is a commit marker, never delivered: Faust would wait forever.
So the "end" a recovery waits for is the offset after the last *record* of each partition.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import aiokafka  # type: ignore[import-untyped]
from faust.transport.drivers import aiokafka as driver

# How far back from a partition's end the search for its last record starts (then doubles).
_LOOKBACK = 32
_PROBE_TIMEOUT_S = 30.0


class _ReadCommittedThread(driver.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # Read when the consumer starts (its fetcher is made then): set before that.
        consumer._isolation_level = "read_committed"
        return consumer

    async def _highwaters(self, partitions: Any) -> Mapping[Any, int]:
        ends = dict(await super()._highwaters(partitions))
        if not ends:
            return ends
        transport: Any = self.transport
        probe = aiokafka.AIOKafkaConsumer(
            bootstrap_servers=driver.server_list(transport.url, transport.default_port),
            isolation_level="read_committed",
            enable_auto_commit=False,
            group_id=None,
        )
        await probe.start()
        try:
            starts = await probe.beginning_offsets(list(ends))
            # Read committed, the end is the last stable offset (below an open transaction).
            stable = await probe.end_offsets(list(ends))
            return {
                tp: await _record_end(probe, tp, starts[tp], min(end, stable[tp]))
                for tp, end in ends.items()
            }
        finally:
            await probe.stop()


async def _record_end(probe: aiokafka.AIOKafkaConsumer, tp: Any, start: int, end: int) -> int:
    """The offset after the last committed record of ``tp`` in [start, end); start if none."""
    if end <= start:
        return end
    lookback = _LOOKBACK
    deadline = time.monotonic() + _PROBE_TIMEOUT_S
    while True:
        origin = max(start, end - lookback)
        probe.assign([tp])
        probe.seek(tp, origin)
        last = -1
        while await probe.position(tp) < end:
            if time.monotonic() > deadline:
                return end  # Faust's own answer: waits for the end offset
            batch = await probe.getmany(tp, timeout_ms=500)
            for record in batch.get(tp, []):
                if record.offset < end:
                    last = max(last, record.offset)
        if last >= 0:
            return last + 1
        if origin == start:
            return start
        lookback *= 2


class _Consumer(driver.Consumer):
    def _new_consumer_thread(self) -> driver.AIOKafkaConsumerThread:
        return _ReadCommittedThread(self, loop=self.loop, beacon=self.beacon)

    async def _add_gap(self, tp: Any, offset_from: int, offset_to: int) -> None:
        # Faust is told "offsets offset_from .. offset_to, the record just read, skipped" and
        # records the record's own offset as skipped too: acked then holds it twice, the run of
        # consecutive offsets a commit takes breaks there, and on a topic written in
        # transactions (a commit marker after each) commits crawl one transaction per commit
        # interval. The gap is what lies before the record.
        await super()._add_gap(tp, offset_from, offset_to - 1)


class ReadCommittedTransport(driver.Transport):
    Consumer = _Consumer
