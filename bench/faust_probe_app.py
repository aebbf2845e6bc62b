"""The Faust side of `python -m bench faust` (bench/faust_probe.py): a worker in its own process.

Faust owns its event loop, so the driver runs this module as
`python -m bench.faust_probe_app worker -l error` with the set-up in environment variables:

- FAUST_PROBE_MODE: `take` (throughput: an agent that takes batches of 2000 within 0.5 s and
  does nothing with them) or `eos` (exactly-once: an agent that forwards every record);
- FAUST_PROBE_APP, FAUST_PROBE_BOOTSTRAP (host:port[,host:port]), FAUST_PROBE_IN,
  FAUST_PROBE_OUT (eos), FAUST_PROBE_PARTITIONS, FAUST_PROBE_REPLICATION, FAUST_PROBE_DATADIR;
- take mode only: FAUST_PROBE_RECORDS (records to read) and FAUST_PROBE_RESULT (a file that
  receives {"records", "seconds", "cpu_seconds"} counted from the first batch on; the process
  then exits at once).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import faust  # type: ignore[import-not-found, unused-ignore]
from faust.types import ProcessingGuarantee  # type: ignore[import-not-found, unused-ignore]

ENV = os.environ
MODE = ENV["FAUST_PROBE_MODE"]

app = faust.App(
    ENV["FAUST_PROBE_APP"],
    broker=";".join(f"kafka://{b}" for b in ENV["FAUST_PROBE_BOOTSTRAP"].split(",")),
    store="memory://",
    datadir=ENV["FAUST_PROBE_DATADIR"],
    web_enabled=False,
    topic_partitions=int(ENV["FAUST_PROBE_PARTITIONS"]),
    topic_replication_factor=int(ENV["FAUST_PROBE_REPLICATION"]),
    consumer_auto_offset_reset="earliest",
    processing_guarantee=(
        ProcessingGuarantee.EXACTLY_ONCE if MODE == "eos" else ProcessingGuarantee.AT_LEAST_ONCE
    ),
    broker_commit_every=100 if MODE == "eos" else 10_000,
)


def _raw_topic(name: str) -> faust.TopicT:
    return app.topic(
        name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )


source = _raw_topic(ENV["FAUST_PROBE_IN"])


class _Clock:
    """Counts records from the first batch on; writes the result and exits at the last."""

    def __init__(self, records: int, result: Path) -> None:
        self.records, self.result = records, result
        self.seen = 0
        self.first = 0
        self.t0 = self.cpu0 = 0.0

    def tick(self, count: int) -> None:
        if self.seen == 0:
            self.first, self.t0, self.cpu0 = count, time.perf_counter(), time.process_time()
        self.seen += count
        if self.seen >= self.records:
            counted = self.seen - self.first
            self.result.write_text(
                json.dumps(
                    {
                        "records": counted,
                        "seconds": time.perf_counter() - self.t0,
                        "cpu_seconds": time.process_time() - self.cpu0,
                    }
                )
            )
            os._exit(0)  # no orderly shutdown: the figure is taken


if MODE == "take":
    clock = _Clock(int(ENV["FAUST_PROBE_RECORDS"]), Path(ENV["FAUST_PROBE_RESULT"]))

    @app.agent(source)
    async def drain(stream: faust.StreamT[bytes]) -> None:
        async for batch in stream.take(2000, within=0.5):
            clock.tick(len(batch))

elif MODE == "eos":
    sink = _raw_topic(ENV["FAUST_PROBE_OUT"])

    @app.agent(source)
    async def forward(stream: faust.StreamT[bytes]) -> None:
        async for key, value in stream.items():
            await sink.send(key=key, value=value)

else:
    raise SystemExit(f"FAUST_PROBE_MODE must be take or eos, got {MODE!r}")


if __name__ == "__main__":
    app.main()
