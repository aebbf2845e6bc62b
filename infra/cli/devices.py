"""`fleet provision` (device identities, recorded in the registry) and `fleet device`: a
device's lifecycle (suspend, revoke, activate), authorized and audited by the registry agent."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path

import typer

from infra.cli.common import audit_answer, cli_settings, console, fail, hot_client
from infra.keys import key_passphrase
from infra.pki import KeyKind


def provision(
    org: str = typer.Option(..., help="Organization."),
    project: str = typer.Option(..., help="Project."),
    group: str = typer.Option(..., help="Device group."),
    count: int = typer.Option(1, min=1, help="How many devices."),
    out: Path = typer.Option(..., help="Where each device's key, certificate and ca.crt go."),
    key: str = typer.Option("rsa", help="Key type made on the device side: rsa or ec."),
    principal: str = typer.Option(
        "orchestrator", "--as", help="Who provisions (user:<id>, service:<id>): authorized."
    ),
) -> None:
    """Make device identities (key pair and CSR on the device side, certificate from the CA)
    and record them in the registry through its agent (authorized, audited)."""
    import time

    from infra.api.client import HotPathClient, HotPathError
    from infra.pki import CertificateAuthority, PkiError
    from infra.provision import provision_device, register
    from streams.registry.rbac import Action, Principal, Resource, authorize

    settings = cli_settings()
    ca = CertificateAuthority.load_or_create(settings.pki_dir, passphrase=key_passphrase(settings))
    kind: KeyKind = "ec" if key == "ec" else "rsa"
    try:
        who = Principal.parse(principal)
        client = HotPathClient(settings)
        # Ask first: no certificate is issued to a principal the registry would refuse.
        decision = authorize(
            who, Action.device_provision, Resource(org, project, group), client.grant_sets()
        )
        if not decision.allowed:
            raise ValueError(f"denied: {decision.reason}")
        started = time.perf_counter()
        creds = [
            provision_device(ca, f"{group}-{uuid.uuid4().hex[:10]}", out, kind)
            for _ in range(count)
        ]
        signed_s = time.perf_counter() - started
        audits = register(client, creds, org, project, group, who)
        for c in creds:  # refused by the agent after all (grant revoked meanwhile...)
            if audits[c.device_id].decision != "applied":
                ca.revoke(c.serial, "registry refused the device")
    except (PkiError, ValueError, HotPathError) as exc:
        raise fail(exc) from exc
    manifest = []
    for c in creds:
        audit = audits[c.device_id]
        manifest.append(
            {
                "device_id": c.device_id,
                "org": org,
                "project": project,
                "group": group,
                "serial": str(c.serial),
                "registry": str(audit.decision),
            }
        )
        console.print(f"{c.device_id}: {c.cert_path} ({audit.decision}: {audit.reason})")
    (out / "devices.json").write_text(json.dumps(manifest, indent=2))
    console.print(
        f"{count} key pairs + CSRs made and signed in {signed_s:.2f}s "
        f"({count / max(signed_s, 1e-9):,.0f}/s, {kind})"
    )
    if any(m["registry"] != "applied" for m in manifest):
        raise typer.Exit(code=6)  # some entries denied or refused: see the audit reasons


app = typer.Typer(help="A device's lifecycle in the registry (authorized, audited).")


def _device_command(kind: str, device_id: str, principal: str, reason: str | None) -> None:
    """Send one lifecycle command to the registry agent (which authorizes and audits it, as for
    the API); print its audit record. Exit codes as `fleet ota`: 6 denied, 7 refused."""
    from infra.api.client import HotPathError
    from streams.registry.devices import (
        ActivateDevice,
        RegistryCommand,
        RevokeDevice,
        SuspendDevice,
    )
    from streams.registry.rbac import Principal

    try:
        who = Principal.parse(principal)
        command_id = f"cli-{kind}-{uuid.uuid4().hex}"
        command: RegistryCommand
        if kind == "suspend":
            command = SuspendDevice(
                command_id=command_id, principal=who, device_id=device_id, reason=reason
            )
        elif kind == "revoke":
            command = RevokeDevice(
                command_id=command_id, principal=who, device_id=device_id, reason=reason
            )
        else:
            command = ActivateDevice(command_id=command_id, principal=who, device_id=device_id)
        client = hot_client()
        try:
            audit = client.registry_commands([command])[command_id]
        finally:
            client.close()
    except (ValueError, HotPathError) as exc:
        raise fail(exc) from exc
    audit_answer(audit.decision, audit.to_record())


def _lifecycle_command(kind: str, summary: str) -> Callable[..., None]:
    """The command that asks for ``kind`` (suspend, revoke) with a reason for the audit."""

    def command(
        device_id: str = typer.Argument(..., help="Device id."),
        principal: str = typer.Option("orchestrator", "--as", help=f"Who asks (device.{kind})."),
        reason: str = typer.Option(None, help="Why (kept in the audit record)."),
    ) -> None:
        _device_command(kind, device_id, principal, reason)

    command.__doc__ = summary
    return command


app.command("suspend")(
    _lifecycle_command(
        "suspend",
        "Suspend a device: the broker refuses it (its certificate on hold) until activated.",
    )
)
app.command("revoke")(
    _lifecycle_command(
        "revoke",
        "Revoke a device for good: the enforcer revokes its certificate and ends its session.",
    )
)


@app.command("activate")
def device_activate(
    device_id: str = typer.Argument(..., help="Device id."),
    principal: str = typer.Option("orchestrator", "--as", help="Who asks (device.activate)."),
) -> None:
    """Activate a provisioned or suspended device (a revoked one stays revoked: refused)."""
    _device_command("activate", device_id, principal, None)
