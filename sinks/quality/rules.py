"""The data-quality rules as data: ``sinks/quality/rules.toml`` (versioned), parsed and checked.

The same rules drive the inline gate (:mod:`sinks.quality.gate`, pyarrow compute on every
telemetry batch) and the asynchronous validation (:mod:`sinks.quality.expectations`, a
great-expectations suite over a window of the warehouse).
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

__all__ = [
    "DEFAULT_RULES_PATH",
    "METRICS",
    "RULE_ORDER",
    "MetricBounds",
    "QualityRules",
    "RulesError",
    "load_rules",
    "parse_rules",
]

DEFAULT_RULES_PATH: Final = Path(__file__).with_name("rules.toml")
# The telemetry metrics a rule may name (the `telemetry` table's Float64 columns).
METRICS: Final = ("temperature", "humidity", "battery", "vibration_rms")
# The order a row is judged in: it is quarantined under the first rule it fails.
RULE_ORDER: Final = ("unknown_device", "null", "nan", "range", "future", "stale", "duplicate")


class RulesError(ValueError):
    """The rules file is not what this module reads (the message says where)."""


@dataclass(frozen=True, slots=True)
class MetricBounds:
    """A metric's accepted range (inclusive; None: unbounded) and whether it may be missing."""

    min: float | None = None
    max: float | None = None
    required: bool = False


@dataclass(frozen=True)
class QualityRules:
    version: int
    future_skew_ms: int
    max_age_ms: int
    metrics: Mapping[str, MetricBounds]
    # Per device group (the registry's path), bounds that replace the defaults of a metric.
    groups: Mapping[str, Mapping[str, MetricBounds]] = field(default_factory=dict)
    # The unknown-device rule: rows of devices the registry does not hold are quarantined.
    require_registered: bool = False

    def bounds(self, metric: str, group: str | None = None) -> MetricBounds:
        """The bounds that apply to ``metric`` on a device of ``group``."""
        if group is not None and metric in self.groups.get(group, {}):
            return self.groups[group][metric]
        return self.metrics.get(metric, MetricBounds())


def _number(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise RulesError(f"{where}: a number expected, not {value!r}")
    return float(value)


def _bounds(doc: Any, where: str) -> MetricBounds:
    if not isinstance(doc, Mapping):
        raise RulesError(f"{where}: a table expected")
    unknown = set(doc) - {"min", "max", "required"}
    if unknown:
        raise RulesError(f"{where}: unknown key(s) {sorted(unknown)}")
    low, high = _number(doc.get("min"), f"{where}.min"), _number(doc.get("max"), f"{where}.max")
    if low is not None and high is not None and low > high:
        raise RulesError(f"{where}: min {low} > max {high}")
    required = doc.get("required", False)
    if not isinstance(required, bool):
        raise RulesError(f"{where}.required: true or false expected")
    return MetricBounds(low, high, required)


def _metrics(doc: Any, where: str) -> dict[str, MetricBounds]:
    if not isinstance(doc, Mapping):
        raise RulesError(f"{where}: a table expected")
    unknown = set(doc) - set(METRICS)
    if unknown:
        raise RulesError(f"{where}: unknown metric(s) {sorted(unknown)}; known: {METRICS}")
    return {name: _bounds(value, f"{where}.{name}") for name, value in doc.items()}


def _positive_int(doc: Mapping[str, Any], key: str) -> int:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise RulesError(f"timestamps.{key}: a positive integer (seconds) expected")
    return value


def parse_rules(doc: Mapping[str, Any]) -> QualityRules:
    """The rules of a parsed TOML document; :class:`RulesError` names what is wrong."""
    version = doc.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise RulesError("version: a positive integer expected")
    times = doc.get("timestamps", {})
    if not isinstance(times, Mapping):
        raise RulesError("timestamps: a table expected")
    groups_doc = doc.get("groups", {})
    if not isinstance(groups_doc, Mapping):
        raise RulesError("groups: a table expected")
    devices = doc.get("devices", {})
    if not isinstance(devices, Mapping) or set(devices) - {"require_registered"}:
        raise RulesError("devices: a table with `require_registered` expected")
    require_registered = devices.get("require_registered", False)
    if not isinstance(require_registered, bool):
        raise RulesError("devices.require_registered: true or false expected")
    groups: dict[str, dict[str, MetricBounds]] = {}
    for name, group in groups_doc.items():
        if not isinstance(group, Mapping) or set(group) - {"metrics"}:
            raise RulesError(f"groups.{name}: a table with `metrics` expected")
        groups[str(name)] = _metrics(group.get("metrics", {}), f"groups.{name}.metrics")
    return QualityRules(
        version=version,
        future_skew_ms=_positive_int(times, "future_skew_s") * 1000,
        max_age_ms=_positive_int(times, "max_age_s") * 1000,
        metrics=_metrics(doc.get("metrics", {}), "metrics"),
        groups=groups,
        require_registered=require_registered,
    )


def load_rules(path: Path = DEFAULT_RULES_PATH) -> QualityRules:
    """The rules in ``path`` (default: the versioned ``rules.toml`` beside this module)."""
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise RulesError(f"{path}: {exc}") from exc
    try:
        return parse_rules(doc)
    except RulesError as exc:
        raise RulesError(f"{path}: {exc}") from exc
