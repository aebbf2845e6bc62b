"""The inline data-quality gate: one telemetry batch (the ``telemetry`` table's Arrow columns)
split into the rows that load and the rows that go to quarantine, each with its rule and reason.

Vectorised: every rule is a pyarrow compute expression over whole columns; Python runs per
rule and per metric, never per row (the duplicate rule looks at rows one by one only when a
batch holds the same (device_id, seq) twice, a rare case, and then only at those rows). It
costs a few per cent of the cold path (``make bench``: "cold path rows/s with the quality
gate"). Pure: no I/O, the same batch and registry give the same verdict (the time rules compare
``ts`` with ``received_at``, not the wall clock), so a batch re-read after a crash is judged as
before and its quarantine insert is deduplicated like any other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sinks.quality.rules import METRICS, RULE_ORDER, MetricBounds, QualityRules

__all__ = ["QUARANTINE_FIELDS", "Verdict", "check_batch"]

# Columns a quarantined row carries besides telemetry's (the batch id is the caller's).
QUARANTINE_FIELDS: Final = (pa.field("rule", pa.string()), pa.field("reason", pa.string()))
# What the duplicate rule compares: a copy with the same values is a re-send, not bad input.
_CONTENT: Final = ("ts", *METRICS, "extra")


@dataclass(frozen=True)
class Verdict:
    """The gate's answer for one batch."""

    good: pa.Table  # the rows to load, in input order
    bad: pa.Table  # the rows to quarantine: the input's columns + rule, reason
    bad_rows: pa.Array  # their positions in the input (int64), in input order
    failed: Mapping[str, int] = field(default_factory=dict)  # rule -> rows


def _false(n: int) -> pa.Array:
    return pa.array(np.zeros(n, dtype=bool))


def _bound_column(
    rules: QualityRules, metric: str, groups: pa.Array | None, n: int, which: str
) -> pa.Array | pa.Scalar | None:
    """The lower or upper bound of ``metric`` per row (a scalar when no group overrides it)."""
    default = getattr(rules.metrics.get(metric, MetricBounds()), which)
    overrides = {g: getattr(b[metric], which) for g, b in rules.groups.items() if metric in b}
    if groups is None or not overrides:
        return None if default is None else pa.scalar(default, pa.float64())
    column = pa.nulls(n, pa.float64()) if default is None else pa.repeat(pa.scalar(default), n)
    for group, bound in overrides.items():
        value = pa.scalar(bound, pa.float64())
        column = pc.if_else(pc.fill_null(pc.equal(groups, group), False), value, column)
    return column


# A rule over whole columns: the mask of rows that fail it and, when asked (``text``), the
# reason per row. The gate asks for reasons only on the failing rows (few), never on the batch.
Judged = tuple[pa.Array, pa.Array | None]


def _range_rule(
    batch: pa.Table, rules: QualityRules, groups: pa.Array | None, text: bool
) -> Judged:
    """Rows with a metric outside its bounds (the reason names the first such metric)."""
    n = len(batch)
    mask, reason = _false(n), pa.nulls(n, pa.string()) if text else None
    for metric in reversed(METRICS):  # reversed: the first metric's reason wins
        values = batch.column(metric)
        low = _bound_column(rules, metric, groups, n, "min")
        high = _bound_column(rules, metric, groups, n, "max")
        out = _false(n)
        if low is not None:
            out = pc.or_(out, pc.fill_null(pc.less(values, low), False))
        if high is not None:
            out = pc.or_(out, pc.fill_null(pc.greater(values, high), False))
        mask = pc.or_(mask, out)
        if reason is not None and pc.any(out).as_py():
            why = pc.binary_join_element_wise(
                f"{metric}=",
                pc.cast(values, pa.string()),
                " outside [",
                pc.cast(low, pa.string()) if low is not None else "-inf",
                ", ",
                pc.cast(high, pa.string()) if high is not None else "inf",
                "]",
                "",
            )
            reason = pc.if_else(out, why, reason)
    return mask, reason


def _metric_rule(batch: pa.Table, rules: QualityRules, rule: str, text: bool) -> Judged:
    """The null (a required metric missing) and nan (NaN or infinite) rules."""
    n = len(batch)
    mask, reason = _false(n), pa.nulls(n, pa.string()) if text else None
    for metric in reversed(METRICS):
        values = batch.column(metric)
        if rule == "null":
            if not rules.metrics.get(metric, MetricBounds()).required:
                continue
            out = pc.is_null(values)
            why = f"{metric} is missing (required)"
        else:
            out = pc.fill_null(pc.or_(pc.is_nan(values), pc.is_inf(values)), False)
            why = f"{metric} is not a finite number"
        mask = pc.or_(mask, out)
        if reason is not None:
            reason = pc.if_else(out, pa.scalar(why), reason)
    return mask, reason


def _time_rule(batch: pa.Table, rules: QualityRules, rule: str, text: bool) -> Judged:
    """future: ts after received_at + the skew; stale: ts before received_at - the max age."""
    ts = pc.cast(batch.column("ts"), pa.int64())
    ahead = pc.subtract(ts, pc.cast(batch.column("received_at"), pa.int64()))
    if rule == "future":
        mask = pc.fill_null(pc.greater(ahead, rules.future_skew_ms), False)
        seconds, words = (
            ahead,
            f" s after received_at (skew allowed: {rules.future_skew_ms // 1000} s)",
        )
    else:
        mask = pc.fill_null(pc.less(ahead, -rules.max_age_ms), False)
        seconds = pc.negate(ahead)
        words = f" s before received_at (oldest allowed: {rules.max_age_ms // 1000} s)"
    if not text:
        return mask, None
    seconds_text = pc.cast(pc.divide(pc.cast(seconds, pa.float64()), 1000.0), pa.string())
    return mask, pc.binary_join_element_wise("ts is ", seconds_text, words, "")


def _unknown_rule(
    batch: pa.Table, known: pa.Array | None, unknown: pa.Array | None, text: bool
) -> Judged:
    devices = batch.column("device_id")
    mask = unknown if unknown is not None else pc.invert(pc.is_in(devices, value_set=known))
    if not text:
        return mask, None
    return mask, pc.binary_join_element_wise("device ", devices, " is not in the registry", "")


def _duplicate_mask(batch: pa.Table) -> tuple[pa.Array, pa.Array]:
    """Rows whose (device_id, seq) an earlier row of the batch has, with other content."""
    n = len(batch)
    keys = batch.select(["device_id", "seq"])
    if len(keys.group_by(["device_id", "seq"], use_threads=False).aggregate([])) == n:
        return _false(n), pa.nulls(n, pa.string())  # no key twice: the common case
    # Rare: only the rows whose key repeats are looked at one by one.
    counted = keys.group_by(["device_id", "seq"], use_threads=False).aggregate([("seq", "count")])
    repeated = counted.filter(pc.greater(counted.column("seq_count"), 1))
    joined = pc.binary_join_element_wise(
        keys.column("device_id"), pc.cast(keys.column("seq"), pa.string()), "\x00"
    )
    wanted = pc.binary_join_element_wise(
        repeated.column("device_id"), pc.cast(repeated.column("seq"), pa.string()), "\x00"
    )
    rows = pc.indices_nonzero(pc.is_in(joined, value_set=wanted)).to_pylist()
    content = batch.select(list(_CONTENT)).take(rows).to_pylist()
    first: dict[str, dict[str, object]] = {}
    flagged = [False] * n
    for row, values in zip(rows, content, strict=True):
        key = joined[row].as_py()
        if key not in first:
            first[key] = values
        elif values != first[key]:
            flagged[row] = True
    mask = pa.array(flagged, pa.bool_())
    text = pa.scalar("(device_id, seq) already in this batch with other values")
    return mask, pc.if_else(mask, text, pa.nulls(n, pa.string()))


def check_batch(
    batch: pa.Table,
    rules: QualityRules,
    known_devices: pa.Array | None = None,
    groups: pa.Array | None = None,
    unknown_rows: pa.Array | None = None,
) -> Verdict:
    """Judge ``batch`` (the ``telemetry`` table's columns) by ``rules``.

    The unknown-device rule runs when given the registry's device ids (``known_devices``) or,
    from a registry lookup done by the caller, which rows' devices it lacks (``unknown_rows``,
    a boolean per row); else it is off. ``groups``: each row's device group, for the per-group
    bounds (None: the defaults apply to every row).
    """

    def judge(
        table: pa.Table, where: pa.Array | None, unknown: pa.Array | None, text: bool
    ) -> dict[str, Judged]:
        """Every rule but duplicate (which needs the whole batch) on ``table``."""
        judged: dict[str, Judged] = {}
        if known_devices is not None or unknown is not None:
            judged["unknown_device"] = _unknown_rule(table, known_devices, unknown, text)
        judged["null"] = _metric_rule(table, rules, "null", text)
        judged["nan"] = _metric_rule(table, rules, "nan", text)
        judged["range"] = _range_rule(table, rules, where, text)
        judged["future"] = _time_rule(table, rules, "future", text)
        judged["stale"] = _time_rule(table, rules, "stale", text)
        return judged

    masks = judge(batch, groups, unknown_rows, text=False)
    duplicate, duplicate_text = _duplicate_mask(batch)
    any_bad = duplicate
    for mask, _ in masks.values():
        any_bad = pc.or_(any_bad, mask)
    if not pc.any(any_bad).as_py():
        empty = batch.schema.append(QUARANTINE_FIELDS[0]).append(QUARANTINE_FIELDS[1])
        return Verdict(batch, empty.empty_table(), pa.array([], pa.int64()))
    bad_rows = pc.indices_nonzero(any_bad).cast(pa.int64())
    bad = batch.take(bad_rows)
    # The reasons, on the failing rows only: every rule but duplicate is a per-row function.
    judged = judge(
        bad,
        None if groups is None else pc.take(groups, bad_rows),
        None if unknown_rows is None else pc.take(unknown_rows, bad_rows),
        text=True,
    )
    judged["duplicate"] = (pc.take(duplicate, bad_rows), pc.take(duplicate_text, bad_rows))
    rule, reason = pa.nulls(len(bad), pa.string()), pa.nulls(len(bad), pa.string())
    for name in reversed(RULE_ORDER):  # reversed: the first rule a row fails names it
        if name not in judged:
            continue
        mask, text = judged[name]
        rule = pc.if_else(mask, pa.scalar(name), rule)
        reason = pc.if_else(mask, text, reason)
    failed = {
        str(item["values"]): int(item["counts"]) for item in pc.value_counts(rule).to_pylist()
    }
    bad = bad.append_column(QUARANTINE_FIELDS[0], rule)
    bad = bad.append_column(QUARANTINE_FIELDS[1], reason)
    return Verdict(batch.filter(pc.invert(any_bad)), bad, bad_rows, failed)
