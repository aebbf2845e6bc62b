"""A rollout as operators read it (`fleet ota status`, `fleet demo --ota`)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from streams.ota.model import Progress, Rollout


def rollout_summary(rollout: Rollout) -> dict[str, Any]:
    """State, cohort, and device counts: `updated` (running the new version), `failed`,
    `rolled_back` (commanded back and confirmed), `refused` (verification failures)."""
    progress = Counter(d.status for d in rollout.devices.values())
    refused = sum(
        1
        for d in rollout.devices.values()
        if d.status is Progress.failed and d.reason in ("digest_mismatch", "bad_signature")
    )
    return {
        "rollout_id": rollout.rollout_id,
        "state": str(rollout.state),
        "version": rollout.artifact.version,
        "target": str(rollout.target),
        "cohort": rollout.cohort_index,
        "cohorts": [len(c) for c in rollout.cohorts],
        "updated": progress[Progress.succeeded],
        "failed": progress[Progress.failed] + progress[Progress.rollback_failed],
        "rolled_back": progress[Progress.rolled_back],
        "refused": refused,
        "progress": {str(k): v for k, v in sorted(progress.items())},
        "reason": rollout.reason,
    }
