"""`make bench`: every figure beside a baseline measured in the same run, as a ratio.

Runs on a stack of its own (ports 3xxxx, state in .state/bench), prints a table and writes
bench/results.json as a list of {"stage", "value", "unit", "baseline", "ratio"}.
Extra stages run only when named: `python -m bench faust` (`make bench-faust`) measures why the
platform's workers are not Faust agents (bench/faust_probe.py; needs the faust-probe extra).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench import cold, faust_probe, hot, ingest, ledger
from infra.settings import PROJECT_ROOT
from infra.stack import Stack

RESULTS = Path(__file__).resolve().parent / "results.json"


STAGES = ("ledger", "ingest", "cold", "pipeline", "hot")
EXTRA_STAGES = ("faust",)  # not in the default run: only when named


def main() -> None:
    """`python -m bench [stage ...]`: all STAGES by default; EXTRA_STAGES only when named."""
    chosen = sys.argv[1:] or list(STAGES)
    unknown = set(chosen) - set(STAGES) - set(EXTRA_STAGES)
    if unknown:
        raise SystemExit(f"unknown stages {sorted(unknown)}; choose from {STAGES + EXTRA_STAGES}")
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
    # Extra stages alone keep results.json (the default run's figures) and write their own file.
    out = RESULTS if set(chosen) & set(STAGES) else RESULTS.with_name("results.faust.json")
    out.write_text(json.dumps([r.to_dict() for r in results], indent=2) + "\n")


if __name__ == "__main__":
    main()
