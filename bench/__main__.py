"""`make bench`: every figure beside a baseline measured in the same run, as a ratio.

Runs on a stack of its own (ports 3xxxx, state in .state/bench), prints a table and writes
bench/results.json as a list of {"stage", "value", "unit", "baseline", "ratio"}.
`python -m bench [stage ...]` runs the named stages only (`--help` lists them).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench import cold, faust_probe, hot, ingest, ledger, quality
from infra.settings import PROJECT_ROOT
from infra.stack import Stack

RESULTS = Path(__file__).resolve().parent / "results.json"


STAGES = {
    "ledger": "CPU per message by process at a fixed load (load generator apart), idle CPU, "
    "publish->alert latency by stage",
    "ingest": "bridge msgs/s (1 and 2 replicas) beside a bare MQTT subscriber; Avro vs JSON",
    "cold": "Kafka -> warehouse rows/s beside a bare consume + decode + Arrow insert loop",
    "quality": "cold path with the quality gate beside the same path without it (rows/CPU-s)",
    "pipeline": "devices -> SQL row: msgs/s sustained, publish-to-queryable p50/p99",
    "hot": "publish -> alert p50/p99 under load; desired-set -> device",
    "faust": "a Faust job's records/s beside the kit's transactional loop doing the same work;"
    " Faust's ceiling and exactly-once under kill -9, each beside a confluent-kafka baseline",
}


def main(argv: list[str] | None = None) -> None:
    """`python -m bench [stage ...]`: every stage by default."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmarks, each figure beside a baseline measured in the same run; "
        "writes bench/results.json.",
        epilog="stages:\n" + "\n".join(f"  {name}: {what}" for name, what in STAGES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("stages", nargs="*", metavar="stage", help="default: every stage")
    chosen = parser.parse_args(argv).stages or list(STAGES)
    unknown = sorted(set(chosen) - set(STAGES))
    if unknown:
        parser.error(f"unknown stages {unknown}; choose from {list(STAGES)}")
    root = PROJECT_ROOT / ".state" / "bench"
    settings = ingest.bench_settings(root)
    # From the pipeline stage on the stack runs two bridge replicas (one bridge, a single Python
    # thread, drains about 5,500 msgs/s here: below the loads these stages offer). A stage run
    # with fewer replicas would retire the spare one first (`up` drains its session). Stopping
    # goes through the scaled stack, so every replica is stopped.
    scaled = settings.model_copy(update={"bridge_replicas": 2})
    Stack(scaled).down()
    # A fresh stack each run: persistent MQTT sessions of an earlier run would queue for it.
    shutil.rmtree(root, ignore_errors=True)
    try:
        results = []
        if "ledger" in chosen:  # first: a fresh stack, one bridge, nothing queued
            results += ledger.run_ledger(settings)
        if "ingest" in chosen:
            results += ingest.run(settings)
        if "cold" in chosen:
            results += cold.run_cold(settings)
        if "quality" in chosen:  # in-process, on a chDB folder of its own
            results += quality.run_quality()
        if "pipeline" in chosen:
            results += cold.run_pipeline(scaled)
        if "hot" in chosen:
            results += hot.run_hot(scaled)
        if "ingest" in chosen:
            results += ingest.run(scaled)
        if "faust" in chosen:
            results += faust_probe.run(settings)
    finally:
        Stack(scaled).down()
    table = Table(title="fleetstream benchmarks")
    for column in ("stage", "value", "unit", "baseline", "ratio"):
        table.add_column(column)
    for r in results:
        row = r.to_dict()
        table.add_row(*(str(row[c]) for c in ("stage", "value", "unit", "baseline", "ratio")))
    Console().print(table)
    RESULTS.write_text(json.dumps([r.to_dict() for r in results], indent=2) + "\n")


if __name__ == "__main__":
    main()
