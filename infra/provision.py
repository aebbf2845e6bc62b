"""Provisioning a device identity: the key is made on the device side, only its CSR reaches
the CA, and the owner gets `<id>.key`, `<id>.crt` and the fleet's `ca.crt` to flash.

The registry entry is then created through the registry agent (`register`): a
`ProvisionDevice` command on `registry.commands`, authorized and audited like any other.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from infra.pki import (
    CertificateAuthority,
    KeyKind,
    cert_fingerprint_sha256,
    generate_private_key,
    key_to_pem,
    make_csr,
    write_device_bundle,
)
from streams.registry.devices import AuditRecord, ProvisionDevice
from streams.registry.rbac import Principal

if TYPE_CHECKING:
    from infra.api.client import HotPathClient


@dataclass(frozen=True)
class DeviceCredentials:
    device_id: str
    key_path: Path
    cert_path: Path
    ca_path: Path
    serial: int


def provision_device(
    ca: CertificateAuthority, device_id: str, out_dir: Path, kind: KeyKind = "rsa"
) -> DeviceCredentials:
    # Device side: the private key never leaves this function's caller's disk (out_dir).
    key = generate_private_key(kind)
    csr_pem = make_csr(key, device_id)
    # CA side: sees the CSR only.
    cert = ca.issue_from_csr(csr_pem, device_id)
    write_device_bundle(
        out_dir, device_id, key_to_pem(key), cert.public_bytes(Encoding.PEM), ca.cert_pem
    )
    return DeviceCredentials(
        device_id=device_id,
        key_path=out_dir / f"{device_id}.key",
        cert_path=out_dir / f"{device_id}.crt",
        ca_path=out_dir / "ca.crt",
        serial=cert.serial_number,
    )


def load_or_provision(
    ca: CertificateAuthority, device_ids: Iterable[str], out_dir: Path, kind: KeyKind = "ec"
) -> list[DeviceCredentials]:
    """Credentials for each id, reusing a bundle already on disk (a device keeps its identity)."""
    result = []
    for device_id in device_ids:
        cert_path, key_path = out_dir / f"{device_id}.crt", out_dir / f"{device_id}.key"
        if cert_path.exists() and key_path.exists():
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            if ca.verify_chain(cert) and not ca.is_revoked(cert.serial_number):
                result.append(
                    DeviceCredentials(
                        device_id, key_path, cert_path, out_dir / "ca.crt", cert.serial_number
                    )
                )
                continue
        result.append(provision_device(ca, device_id, out_dir, kind))
    return result


def provision_command(
    creds: DeviceCredentials,
    org: str,
    project: str,
    group: str,
    principal: Principal,
    region: str = "local",
) -> ProvisionDevice:
    """The registry command that records a freshly issued device (its id is the command's)."""
    cert = x509.load_pem_x509_certificate(creds.cert_path.read_bytes())
    return ProvisionDevice(
        command_id=f"provision-{creds.device_id}-{creds.serial}",
        principal=principal,
        device_id=creds.device_id,
        org=org,
        project=project,
        group=group,
        region=region,
        cert_serial=str(creds.serial),
        cert_fingerprint=cert_fingerprint_sha256(cert),
    )


def register(
    client: HotPathClient,
    creds: Sequence[DeviceCredentials],
    org: str,
    project: str,
    group: str,
    principal: Principal | None = None,
) -> dict[str, AuditRecord]:
    """Provision `creds` in the registry through its agent (authorized, audited); returns
    each device's audit record. A device already registered is refused, not doubled."""
    who = principal or Principal.orchestrator()
    commands = [provision_command(c, org, project, group, who) for c in creds]
    audits = client.registry_commands(commands)
    return {c.device_id: audits[c.command_id] for c in commands}
