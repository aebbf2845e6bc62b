"""How a rollout proceeds: its :class:`RolloutPlan` (cohort shares, thresholds, health window,
timeouts) and how a target's devices are split into cohorts (:func:`plan_cohorts`)."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from streams.alerts import Severity
from streams.registry.devices import DeviceRecord, DeviceStatus
from streams.registry.rbac import Resource

ELIGIBLE_STATUSES = frozenset({DeviceStatus.provisioned, DeviceStatus.active})


def _check_fraction(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and 0 <= value <= 1):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def _check_seconds(name: str, value: float | None, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class RolloutPlan:
    """How a rollout proceeds; invalid plans raise ValueError at construction."""

    canary_size: int = 5
    percentages: tuple[float, ...] = (1.0, 10.0, 100.0)
    success_threshold: float = 0.95
    error_threshold: float = 0.05
    health_window_s: float = 300.0
    alert_severities: frozenset[Severity] = frozenset({Severity.critical})
    require_telemetry: bool = True
    cohort_timeout_s: float | None = None
    rollback_timeout_s: float = 900.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "percentages", tuple(float(p) for p in self.percentages))
        object.__setattr__(
            self, "alert_severities", frozenset(Severity(s) for s in self.alert_severities)
        )
        if isinstance(self.canary_size, bool) or not isinstance(self.canary_size, int):
            raise ValueError(f"canary_size must be an integer, got {self.canary_size!r}")
        if self.canary_size < 1:
            raise ValueError("canary_size must be at least 1: every rollout starts with a canary")
        shares = self.percentages
        if not shares or shares[-1] != 100.0:
            raise ValueError(f"percentages must end at 100, got {list(shares)}")
        if any(not (0 < p <= 100) for p in shares) or any(
            a >= b for a, b in itertools.pairwise(shares)
        ):
            raise ValueError(
                f"percentages must ascend strictly within (0, 100], got {list(shares)}"
            )
        _check_fraction("success_threshold", self.success_threshold)
        _check_fraction("error_threshold", self.error_threshold)
        _check_seconds("health_window_s", self.health_window_s)
        _check_seconds("cohort_timeout_s", self.cohort_timeout_s, optional=True)
        _check_seconds("rollback_timeout_s", self.rollback_timeout_s)

    def to_record(self) -> dict[str, Any]:
        return {
            "canary_size": self.canary_size,
            "percentages": list(self.percentages),
            "success_threshold": float(self.success_threshold),
            "error_threshold": float(self.error_threshold),
            "health_window_s": float(self.health_window_s),
            "alert_severities": sorted(str(s) for s in self.alert_severities),
            "require_telemetry": self.require_telemetry,
            "cohort_timeout_s": _float(self.cohort_timeout_s),
            "rollback_timeout_s": float(self.rollback_timeout_s),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> RolloutPlan:
        return cls(
            canary_size=int(record["canary_size"]),
            percentages=tuple(float(p) for p in record["percentages"]),
            success_threshold=float(record["success_threshold"]),
            error_threshold=float(record["error_threshold"]),
            health_window_s=float(record["health_window_s"]),
            alert_severities=frozenset(Severity(s) for s in record["alert_severities"]),
            require_telemetry=bool(record.get("require_telemetry", True)),
            cohort_timeout_s=_float(record.get("cohort_timeout_s")),
            rollback_timeout_s=float(record["rollback_timeout_s"]),
        )


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _rank(seed: str, device_id: str) -> bytes:
    return hashlib.sha256(json.dumps([seed, device_id]).encode("utf-8")).digest()


def plan_cohorts(device_ids: Iterable[str], plan: RolloutPlan, seed: str = "") -> list[list[str]]:
    """Split ``device_ids`` into cohorts: ordered by a hash of (``seed`` = the rollout id,
    device id), the first ``canary_size`` (at least one), then up to each cumulative
    percentage of the whole (rounded up). Every id lies in exactly one (non-empty) cohort."""
    ids = sorted(set(device_ids), key=lambda d: (_rank(seed, d), d))
    n = len(ids)
    if n == 0:
        return []
    done = min(n, plan.canary_size)
    cohorts = [ids[:done]]
    for share in plan.percentages:
        upto = min(n, math.ceil(round(n * share / 100, 9)))
        if upto > done:
            cohorts.append(ids[done:upto])
            done = upto
    if done < n:  # unreachable while the last share is 100; kept so no device is lost
        cohorts.append(ids[done:])
    return cohorts


def in_target(target: Resource, record: DeviceRecord) -> bool:
    """Whether the registry ``record`` is a device a rollout on ``target`` updates."""
    names = target.names
    place = (record.org, record.project, record.group)
    return record.status in ELIGIBLE_STATUSES and place[: len(names)] == names
