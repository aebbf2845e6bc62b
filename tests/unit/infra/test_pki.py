"""Unit tests for infra.pki (no services; RSA key generation kept to a handful)."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from infra.pki import (
    CertificateAuthority,
    KeyFileError,
    KeyKind,
    PkiError,
    PrivateKey,
    cert_fingerprint_sha256,
    generate_private_key,
    key_to_pem,
    load_encrypted_key,
    make_csr,
    write_device_bundle,
)
from schemas.identity import DEVICE_ID_PATTERN, RESERVED_IDENTITIES


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ca")


@pytest.fixture(scope="module")
def ca(ca_dir: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(ca_dir, passphrase=b"test-passphrase")


@pytest.fixture(scope="module")
def ec_key() -> PrivateKey:
    return generate_private_key("ec")


def _cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def _raw_csr(key: PrivateKey, cn: str) -> bytes:
    """A CSR built without make_csr's client-side validation, to test the CA's checks."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def test_load_or_create_is_idempotent(ca: CertificateAuthority, ca_dir: Path) -> None:
    again = CertificateAuthority.load_or_create(ca_dir, passphrase=b"test-passphrase")
    assert again.certificate == ca.certificate
    assert (ca_dir / "revoked.json").read_text().strip() != ""
    assert stat.S_IMODE((ca_dir / "ca.key").stat().st_mode) == 0o600
    assert ca.cert_path.read_bytes() == ca.cert_pem
    assert ca.crl_path.exists()
    basic = ca.certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical
    assert basic.value.ca
    assert basic.value.path_length == 0


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_issue_from_csr(ca: CertificateAuthority, kind: KeyKind) -> None:
    key = generate_private_key(kind)
    cert = ca.issue_from_csr(make_csr(key, "sensor-01"), "sensor-01")
    assert ca.verify_chain(cert)
    assert _cn(cert) == "sensor-01"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert ExtendedKeyUsageOID.SERVER_AUTH not in eku
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.public_key() == key.public_key()
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature
    assert usage.key_encipherment == (kind == "rsa")
    assert len(cert_fingerprint_sha256(cert)) == 64


def test_cert_from_other_ca_fails_verify_chain(
    ca: CertificateAuthority, tmp_path: Path, ec_key: PrivateKey
) -> None:
    other = CertificateAuthority.load_or_create(tmp_path / "other", passphrase=b"test-passphrase")
    cert = other.issue_from_csr(make_csr(ec_key, "dev-x"), "dev-x")
    assert other.verify_chain(cert)
    assert not ca.verify_chain(cert)


def test_csr_cn_mismatch_refused(ca: CertificateAuthority, ec_key: PrivateKey) -> None:
    with pytest.raises(PkiError, match="does not match"):
        ca.issue_from_csr(make_csr(ec_key, "dev-a"), "dev-b")


def test_tampered_csr_refused(ca: CertificateAuthority, ec_key: PrivateKey) -> None:
    """An attacker rewriting the CN in a signed CSR invalidates its signature."""
    der = x509.load_pem_x509_csr(make_csr(ec_key, "dev-aaaa")).public_bytes(
        serialization.Encoding.DER
    )
    tampered = x509.load_der_x509_csr(der.replace(b"dev-aaaa", b"dev-bbbb"))
    assert _cn_of_csr(tampered) == "dev-bbbb"
    with pytest.raises(PkiError, match="signature"):
        ca.issue_from_csr(tampered.public_bytes(serialization.Encoding.PEM), "dev-bbbb")


def _cn_of_csr(csr: x509.CertificateSigningRequest) -> str:
    return str(csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def test_garbage_csr_refused(ca: CertificateAuthority) -> None:
    with pytest.raises(PkiError):
        ca.issue_from_csr(b"not a csr", "dev-1")


@pytest.mark.parametrize("bad_id", ["orchestrator", "broker", "Orchestrator", "a/b", "x+", "#"])
def test_reserved_and_unsafe_ids_refused(
    ca: CertificateAuthority, ec_key: PrivateKey, bad_id: str
) -> None:
    with pytest.raises(PkiError):
        ca.issue_from_csr(_raw_csr(ec_key, bad_id), bad_id)


@pytest.mark.parametrize("bad_id", ["", "-lead", "sp ace", "a" * 65])
def test_invalid_ids_refused_before_csr(
    ca: CertificateAuthority, ec_key: PrivateKey, bad_id: str
) -> None:
    csr = make_csr(ec_key, "dev-1")
    with pytest.raises(PkiError):
        ca.issue_from_csr(csr, bad_id)
    with pytest.raises(PkiError):
        make_csr(ec_key, bad_id)


def test_issue_identity_allows_reserved(ca: CertificateAuthority) -> None:
    key_pem, cert_pem = ca.issue_identity("orchestrator", kind="ec")
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert _cn(cert) == "orchestrator"
    assert ca.verify_chain(cert)
    key = serialization.load_pem_private_key(key_pem, None)
    assert key.public_key() == cert.public_key()


def test_revoke(ca: CertificateAuthority, ca_dir: Path, ec_key: PrivateKey) -> None:
    cert = ca.issue_from_csr(make_csr(ec_key, "dev-revoked"), "dev-revoked")
    serial = cert.serial_number
    assert not ca.is_revoked(serial)

    ca.revoke(serial, reason="stolen")
    ca.revoke(serial)

    crl = ca.crl()
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    ca_public_key = ca.certificate.public_key()
    assert isinstance(ca_public_key, rsa.RSAPublicKey)
    assert crl.is_signature_valid(ca_public_key)
    assert [r.serial_number for r in crl].count(serial) == 1
    assert ca.is_revoked(serial)
    assert CertificateAuthority.load_or_create(ca_dir, passphrase=b"test-passphrase").is_revoked(
        serial
    )


def test_write_device_bundle(ca: CertificateAuthority, tmp_path: Path, ec_key: PrivateKey) -> None:
    cert = ca.issue_from_csr(make_csr(ec_key, "dev-7"), "dev-7")
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    out = tmp_path / "bundle"
    write_device_bundle(out, "dev-7", key_to_pem(ec_key), cert_pem, ca.cert_pem)
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "dev-7.crt", "dev-7.key"]
    assert stat.S_IMODE((out / "dev-7.key").stat().st_mode) == 0o600
    assert (out / "dev-7.crt").read_bytes() == cert_pem
    assert (out / "ca.crt").read_bytes() == ca.cert_pem
    with pytest.raises(PkiError):
        write_device_bundle(out, "../evil", b"", b"", b"")


def test_server_certificate(ca: CertificateAuthority) -> None:
    _, cert_pem = ca.issue_server_certificate()
    cert = x509.load_pem_x509_certificate(cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert ca.verify_chain(cert)


@settings(max_examples=10, deadline=None)
@given(device_id=st.from_regex(DEVICE_ID_PATTERN, fullmatch=True))
def test_issued_cn_equals_any_valid_id(ca: CertificateAuthority, device_id: str) -> None:
    assume(device_id.lower() not in RESERVED_IDENTITIES)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.issue_from_csr(make_csr(key, device_id), device_id)
    assert _cn(cert) == device_id


# --------------------------------------------------------------------------- keys at rest

PASSPHRASE = b"test-passphrase"


def test_the_ca_key_on_disk_is_encrypted_pkcs8(ca: CertificateAuthority, ca_dir: Path) -> None:
    pem = (ca_dir / "ca.key").read_bytes()
    assert pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    with pytest.raises(TypeError, match="encrypted"):  # a file read elsewhere is no key
        serialization.load_pem_private_key(pem, None)
    key = serialization.load_pem_private_key(pem, PASSPHRASE)
    assert key.public_key() == ca.certificate.public_key()


def test_a_wrong_passphrase_is_a_clear_error_that_does_not_echo_it(
    ca: CertificateAuthority, ca_dir: Path
) -> None:
    wrong = b"not-the-passphrase"
    with pytest.raises(KeyFileError, match=r"cannot decrypt .* wrong passphrase") as info:
        CertificateAuthority.load_or_create(ca_dir, passphrase=wrong)
    assert wrong.decode() not in str(info.value)
    assert PASSPHRASE.decode() not in str(info.value)
    with pytest.raises(KeyFileError, match="non-empty"):
        CertificateAuthority.load_or_create(ca_dir, passphrase=b"")


def test_a_plain_ca_key_is_encrypted_on_load_and_keeps_issuing(
    tmp_path: Path, ec_key: PrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    """A state folder from before keys were encrypted: same CA, now encrypted at rest."""
    first = CertificateAuthority.load_or_create(tmp_path, passphrase=PASSPHRASE)
    key = serialization.load_pem_private_key((tmp_path / "ca.key").read_bytes(), PASSPHRASE)
    assert isinstance(key, rsa.RSAPrivateKey)
    (tmp_path / "ca.key").write_bytes(key_to_pem(key))  # what the old code wrote
    (tmp_path / "ca.key").chmod(0o644)

    with caplog.at_level("DEBUG"):
        migrated = CertificateAuthority.load_or_create(tmp_path, passphrase=PASSPHRASE)

    pem = (tmp_path / "ca.key").read_bytes()
    assert pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600
    assert migrated.certificate == first.certificate
    assert "now encrypted at rest" in caplog.text
    assert PASSPHRASE.decode() not in caplog.text
    cert = migrated.issue_from_csr(make_csr(ec_key, "dev-migrated"), "dev-migrated")
    assert migrated.verify_chain(cert)
    again = CertificateAuthority.load_or_create(tmp_path, passphrase=PASSPHRASE)
    assert again.certificate == first.certificate
    assert (tmp_path / "ca.key").read_bytes() == pem  # migrated once, not rewritten each load


def test_a_key_file_that_is_no_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    with pytest.raises(KeyFileError, match=r"not a PEM private key|cannot decrypt"):
        load_encrypted_key(path, PASSPHRASE)
    with pytest.raises(KeyFileError, match="cannot read"):
        load_encrypted_key(tmp_path / "missing.pem", PASSPHRASE)


def test_a_key_in_a_legacy_encrypted_format_is_rewritten_as_encrypted_pkcs8(
    tmp_path: Path, ec_key: PrivateKey
) -> None:
    path = tmp_path / "legacy.key"
    path.write_bytes(
        ec_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.BestAvailableEncryption(PASSPHRASE),
        )
    )
    assert b"Proc-Type: 4,ENCRYPTED" in path.read_bytes()
    assert load_encrypted_key(path, PASSPHRASE).public_key() == ec_key.public_key()
    assert path.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert load_encrypted_key(path, PASSPHRASE).public_key() == ec_key.public_key()
