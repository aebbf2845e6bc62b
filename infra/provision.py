"""Provisioning a device identity: the key is made on the device side, only its CSR reaches
the CA, and the owner gets `<id>.key`, `<id>.crt` and the fleet's `ca.crt` to flash.

(The registry entry and authorization arrive with the registry/RBAC work; this is the PKI path
the simulator and `fleet provision` share.)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding

from infra.pki import (
    CertificateAuthority,
    KeyKind,
    generate_private_key,
    key_to_pem,
    make_csr,
    write_device_bundle,
)


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
    from cryptography import x509

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


def registry_entry(
    creds: DeviceCredentials, org: str, project: str, group: str, now_ms: int, region: str = "local"
) -> dict[str, Any]:
    """The `registry.devices` record (Avro `Device`) of a freshly provisioned device."""
    from cryptography import x509

    from infra.pki import cert_fingerprint_sha256
    from streams.registry import DeviceRecord, DeviceStatus

    cert = x509.load_pem_x509_certificate(creds.cert_path.read_bytes())
    return DeviceRecord(
        device_id=creds.device_id,
        org=org,
        project=project,
        group=group,
        region=region,
        status=DeviceStatus.provisioned,
        cert_serial=str(creds.serial),
        cert_fingerprint=cert_fingerprint_sha256(cert),
        created_ms=now_ms,
        updated_ms=now_ms,
    ).to_record()
