"""`fleet ota`: governed OTA rollouts (artifacts, approval, cohorts, rollback)."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import typer

from infra.cli.common import (
    audit_answer,
    cli_settings,
    fail,
    hot_client,
    print_records,
)
from infra.keys import key_passphrase

app = typer.Typer(help="Governed OTA rollouts: artifacts, approval, cohorts, rollback.")
artifact_app = typer.Typer(help="Signed, content-addressed artifacts.")
app.add_typer(artifact_app, name="artifact")


@artifact_app.command("add")
def ota_artifact_add(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="The artifact file."),
    kind: str = typer.Option(..., help="firmware, config or model."),
    version: str = typer.Option(..., help="The version it installs."),
) -> None:
    """Store FILE content-addressed, sign it with the release key, publish its record."""
    from infra.release_key import open_artifact_store
    from streams.ota.artifacts import ArtifactError

    settings = cli_settings()
    try:
        store = open_artifact_store(
            settings.state_dir / "artifacts", settings.pki_dir, passphrase=key_passphrase(settings)
        )
        artifact = store.add(file, kind, version)
    except (ArtifactError, ValueError) as exc:
        raise fail(exc) from exc
    hot_client().put_artifact(artifact)
    record = artifact.to_record()
    record["signature"] = artifact.signature.hex()
    sys.stdout.write(json.dumps(record) + "\n")


@app.command("create")
def ota_create(
    artifact: str = typer.Option(..., help="Artifact id (its sha256)."),
    target: str = typer.Option(..., help="org/<o>/project/<p>, optionally followed by /group/<g>."),
    rollout_id: str = typer.Option(None, "--id", help="Rollout id (default: generated)."),
    canary: int = typer.Option(5, min=1, help="Canary cohort size."),
    percentages: str = typer.Option("1,10,100", help="Cumulative cohort shares, in %."),
    success: float = typer.Option(0.95, help="Success threshold of a cohort (0-1)."),
    error: float = typer.Option(0.05, help="Error threshold: past it, roll back (0-1)."),
    window: float = typer.Option(300.0, help="Health window per cohort, seconds."),
    principal: str = typer.Option("orchestrator", "--as", help="Who creates it."),
) -> None:
    """Create a rollout (pending approval: nothing is sent before an ota-approver approves)."""
    from infra.api.client import HotPathError
    from streams.ota.events import OtaRequest
    from streams.ota.plan import RolloutPlan
    from streams.registry.rbac import Principal

    try:
        plan = RolloutPlan(
            canary_size=canary,
            percentages=tuple(float(p) for p in percentages.split(",")),
            success_threshold=success,
            error_threshold=error,
            health_window_s=window,
        )
        who = Principal.parse(principal)
        rid = rollout_id or f"rollout-{uuid.uuid4().hex[:10]}"
        request = OtaRequest(
            rollout_id=rid,
            kind="create",
            artifact_id=artifact,
            target=target,
            plan=plan.to_record(),
        )
        audit = hot_client().ota_request(request, who)
    except (ValueError, HotPathError) as exc:
        raise fail(exc) from exc
    audit_answer(audit.decision, {"rollout_id": rid, **audit.to_record()})


def _ota_control(rollout_id: str, kind: str, principal: str, comment: str | None) -> None:
    from infra.api.client import HotPathError
    from streams.ota.events import OtaRequest
    from streams.registry.rbac import Principal

    try:
        request = OtaRequest(rollout_id=rollout_id, kind=kind, comment=comment)
        audit = hot_client().ota_request(request, Principal.parse(principal))
    except (ValueError, HotPathError) as exc:
        raise fail(exc) from exc
    audit_answer(audit.decision, {"rollout_id": rollout_id, **audit.to_record()})


@app.command("approve")
def ota_approve(
    rollout_id: str = typer.Argument(...),
    principal: str = typer.Option(..., "--as", help="An ota-approver of the target's project."),
    comment: str = typer.Option(None, help="Why."),
) -> None:
    """Approve a rollout: needs ota.approve (role ota-approver) on its target."""
    _ota_control(rollout_id, "approve", principal, comment)


@app.command("reject")
def ota_reject(
    rollout_id: str = typer.Argument(...),
    principal: str = typer.Option(..., "--as"),
    comment: str = typer.Option(None, help="Why."),
) -> None:
    """Reject a rollout (ota.approve)."""
    _ota_control(rollout_id, "reject", principal, comment)


@app.command("pause")
def ota_pause(
    rollout_id: str = typer.Argument(...), principal: str = typer.Option("orchestrator", "--as")
) -> None:
    """Stop sending commands (ota.control)."""
    _ota_control(rollout_id, "pause", principal, None)


@app.command("resume")
def ota_resume(
    rollout_id: str = typer.Argument(...), principal: str = typer.Option("orchestrator", "--as")
) -> None:
    """Resume a paused rollout (ota.control)."""
    _ota_control(rollout_id, "resume", principal, None)


@app.command("abort")
def ota_abort(
    rollout_id: str = typer.Argument(...),
    principal: str = typer.Option("orchestrator", "--as"),
    reason: str = typer.Option(None, help="Why."),
) -> None:
    """End a rollout; nothing more is sent (ota.control)."""
    _ota_control(rollout_id, "abort", principal, reason)


@app.command("status")
def ota_status(
    rollout_id: str = typer.Argument(None, help="One rollout (default: all)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Rollouts: state, cohort, updated / failed / rolled back devices."""
    from streams.ota.summary import rollout_summary

    rollouts = hot_client().rollouts()
    chosen = [rollouts[rollout_id]] if rollout_id in rollouts else list(rollouts.values())
    if rollout_id is not None and rollout_id not in rollouts:
        raise fail(ValueError(f"no rollout {rollout_id!r}"))
    summaries = [rollout_summary(r) for r in chosen]
    columns = ("rollout_id", "state", "version", "target", "cohort", "updated", "failed")
    print_records("rollouts", (*columns, "rolled_back"), summaries, as_json)
