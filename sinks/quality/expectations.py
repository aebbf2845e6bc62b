"""The quality rules as a great-expectations suite, validated over a window of warehouse rows.

The inline gate (:mod:`sinks.quality.gate`) decides per batch with pyarrow; this is the declared
contract analysts read, run asynchronously in its own process (``fleet quality report``) on a
window of recent rows: great-expectations costs well over 100 ms per validation call here, so
it never runs per batch. It writes its HTML report (Data Docs) under the project folder it is
given (the stack's state folder).

The window is a table of ``telemetry``'s columns plus ``ahead_ms`` (ts - received_at, in
milliseconds): the time rules are bounds on it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from sinks.quality.rules import METRICS, QualityRules

__all__ = ["SUITE_NAME", "ExpectationSpec", "ReportSummary", "expectation_specs", "validate"]

SUITE_NAME: Final = "telemetry_quality"
DATA_SOURCE: Final = "warehouse"
ASSET: Final = "telemetry_window"


@dataclass(frozen=True, slots=True)
class ExpectationSpec:
    """One expectation: its great-expectations class name and keyword arguments; ``rule`` is
    the gate's rule it states."""

    rule: str
    kind: str
    kwargs: Mapping[str, Any]


def expectation_specs(
    rules: QualityRules, known_devices: Sequence[str] | None = None
) -> list[ExpectationSpec]:
    """The rules file as expectations (pure: the suite's content, testable without GE).

    Per-group bounds are not stated (a window row carries no group): the defaults are, and a
    group's rows outside them show as exceptions to read in the report, not as gate failures.
    """
    specs: list[ExpectationSpec] = []
    for metric in METRICS:
        bounds = rules.bounds(metric)
        if bounds.required:
            specs.append(
                ExpectationSpec("null", "ExpectColumnValuesToNotBeNull", {"column": metric})
            )
        if bounds.min is not None or bounds.max is not None:
            specs.append(
                ExpectationSpec(
                    "range",
                    "ExpectColumnValuesToBeBetween",
                    {"column": metric, "min_value": bounds.min, "max_value": bounds.max},
                )
            )
    specs.append(
        ExpectationSpec(
            "future/stale",
            "ExpectColumnValuesToBeBetween",
            {
                "column": "ahead_ms",
                "min_value": -rules.max_age_ms,
                "max_value": rules.future_skew_ms,
            },
        )
    )
    specs.append(
        ExpectationSpec(
            "duplicate", "ExpectCompoundColumnsToBeUnique", {"column_list": ["device_id", "seq"]}
        )
    )
    if known_devices is not None:
        specs.append(
            ExpectationSpec(
                "unknown_device",
                "ExpectColumnValuesToBeInSet",
                {"column": "device_id", "value_set": sorted(known_devices)},
            )
        )
    return specs


@dataclass(frozen=True)
class ReportSummary:
    success: bool
    rows: int
    evaluated: int
    successful: int
    report: Path  # the Data Docs page (index.html)
    expectations: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "report": str(self.report)}


def validate(
    window: Any,
    rules: QualityRules,
    project_dir: Path,
    known_devices: Sequence[str] | None = None,
) -> ReportSummary:
    """Validate ``window`` (a pandas DataFrame, see the module doc) against the rules' suite
    with great-expectations, in a file context under ``project_dir``; build its Data Docs."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # no usage statistics sent
    import great_expectations as gx  # slow to import (seconds): only where it runs
    import great_expectations.expectations as gxe
    from great_expectations.checkpoint.actions import UpdateDataDocsAction

    context = gx.get_context(mode="file", project_root_dir=str(project_dir))
    source = context.data_sources.add_or_update_pandas(DATA_SOURCE)
    asset = next((a for a in source.assets if a.name == ASSET), None)
    if asset is None:
        asset = source.add_dataframe_asset(ASSET)
    batch = next((b for b in asset.batch_definitions if b.name == "window"), None)
    if batch is None:
        batch = asset.add_batch_definition_whole_dataframe("window")
    specs = expectation_specs(rules, known_devices)
    suite = gx.ExpectationSuite(
        name=SUITE_NAME, meta={"rules_version": rules.version, "from": "sinks/quality/rules.toml"}
    )
    for spec in specs:
        suite.add_expectation(getattr(gxe, spec.kind)(**spec.kwargs, meta={"rule": spec.rule}))
    suite = context.suites.add_or_update(suite)
    definition = context.validation_definitions.add_or_update(
        gx.ValidationDefinition(data=batch, suite=suite, name=ASSET)
    )
    checkpoint = context.checkpoints.add_or_update(
        gx.Checkpoint(
            name=SUITE_NAME,
            validation_definitions=[definition],
            actions=[UpdateDataDocsAction(name="data_docs")],
            result_format="SUMMARY",
        )
    )
    result = checkpoint.run(batch_parameters={"dataframe": window})
    [run] = list(result.run_results.values())
    stats = run.statistics
    expectations = []
    for item in run.results:
        config = item.expectation_config
        if config is None:
            continue
        expectations.append(
            {
                "expectation": config.type,
                "column": config.kwargs.get("column") or config.kwargs.get("column_list"),
                "rule": (config.meta or {}).get("rule"),
                "success": bool(item.success),
                "unexpected": int(item.result.get("unexpected_count") or 0),
            }
        )
    site = context.get_docs_sites_urls()[0]["site_url"] or ""
    return ReportSummary(
        success=bool(result.success),
        rows=len(window),
        evaluated=int(stats["evaluated_expectations"]),
        successful=int(stats["successful_expectations"]),
        report=Path(site.removeprefix("file://")),
        expectations=expectations,
    )
