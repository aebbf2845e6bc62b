"""The Faust side of the bench's forward comparison (bench/faust_forward.py): a data engineer's
job file, run by `python -m infra.jobs` as `fleet jobs run` runs it (the platform's Faust app,
its Avro codec and typed records, at-least-once).

It reads Telemetry records from FLEET_BENCH_FORWARD_IN and writes each one, Avro-encoded again
and keyed by its device, to FLEET_BENCH_FORWARD_OUT: the same work as the kit's transactional
forward job it is measured beside.
"""

from __future__ import annotations

import os
from typing import Any

from streams.jobs import app

source = app.avro_topic(os.environ["FLEET_BENCH_FORWARD_IN"], "Telemetry")
sink = app.avro_topic(os.environ["FLEET_BENCH_FORWARD_OUT"], "Telemetry")


@app.agent(source)
async def forward(stream: Any) -> None:
    async for key, reading in stream.items():
        await sink.send(key=key, value=reading)
