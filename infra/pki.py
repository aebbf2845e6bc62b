"""Fleet PKI for devices that connect to Mosquitto over mTLS (certificate CN = device id).

The device generates its key and a CSR; the platform's :class:`CertificateAuthority` signs the
CSR, so private keys never leave the device. Platform identities (orchestrator) and the broker's
server certificate are issued on the platform side. Revocations are kept in ``revoked.json`` and
published as ``crl.pem`` for the broker (``crlfile`` in mosquitto.conf).

A revocation is permanent. A *hold* (CRL reason ``certificateHold``, RFC 5280 5.3.1) is the
standard temporary revocation: the broker refuses the certificate while it is listed, and
:meth:`CertificateAuthority.release` lifts it (a full CRL simply stops listing the serial). A
held serial may still be revoked for good; a revoked one is never released.

The CA's private key is encrypted at rest (PKCS#8 ``ENCRYPTED PRIVATE KEY``, cryptography's
BestAvailableEncryption) with a passphrase the caller passes in (the platform's comes from
``Settings.key_passphrase``, see infra/keys.py), so a copy of the state folder, or a file read
through another hole, does not hand out a usable CA. A plain key found on load (a state folder
from before) is encrypted in place. Device keys stay plain: they live on the device, whose MQTT
client cannot prompt.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal, TypeAlias, TypedDict, TypeGuard

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from schemas.identity import DEVICE_ID_PATTERN, RESERVED_IDENTITIES, RevocationState
from streams.runtime.files import atomic_write

__all__ = [
    "ENCRYPTED_KEY_PEM_HEADER",
    "HOLD_REASON",
    "CertificateAuthority",
    "KeyFileError",
    "KeyKind",
    "PkiError",
    "PrivateKey",
    "cert_fingerprint_sha256",
    "encrypted_key_pem",
    "generate_private_key",
    "key_to_pem",
    "load_encrypted_key",
    "make_csr",
    "validate_identity",
    "write_device_bundle",
]

KeyKind = Literal["rsa", "ec"]
PrivateKey: TypeAlias = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
_PublicKey: TypeAlias = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

# Reserved identities, the device id pattern, RevocationState: schemas/identity.py.

RSA_KEY_SIZE = 2048
CA_VALIDITY_DAYS = 3650
DEVICE_VALIDITY_DAYS = 825
CRL_VALIDITY_DAYS = 30
CLOCK_SKEW = dt.timedelta(minutes=5)
DEFAULT_CA_NAME = "fleetstream fleet CA"

ENCRYPTED_KEY_PEM_HEADER = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"

_LOG = logging.getLogger(__name__)
_CA_KEY = "ca.key"
_CA_CERT = "ca.crt"
_CRL = "crl.pem"
_REVOKED = "revoked.json"
_LOCK = ".revocations.lock"
# The revoked.json reason that marks a hold, spelt as RFC 5280's CRLReason (and cryptography's
# ReasonFlags value); every other reason is a permanent revocation.
HOLD_REASON = x509.ReasonFlags.certificate_hold.value
# Reasons a permanent revocation may carry in the CRL (others stay free text in revoked.json).
_CRL_REASONS = {
    flag.value: flag
    for flag in x509.ReasonFlags
    if flag
    not in (
        x509.ReasonFlags.unspecified,
        x509.ReasonFlags.certificate_hold,
        x509.ReasonFlags.remove_from_crl,
    )
}
_ACCEPTED_CURVES = (ec.SECP256R1, ec.SECP384R1)


class PkiError(ValueError):
    """A request the PKI refuses (bad CSR, forbidden identity, inconsistent CA directory)."""


class KeyFileError(PkiError):
    """A private key file that cannot be read: not a key, or not with this passphrase."""


class _Revocation(TypedDict, total=False):
    serial: int
    revoked_at: str
    reason: str


def _state(entry: _Revocation) -> RevocationState:
    if entry.get("reason") == HOLD_REASON:
        return RevocationState.on_hold
    return RevocationState.revoked


def _check_serial(serial: int) -> int:
    if isinstance(serial, bool) or not isinstance(serial, int) or serial <= 0:
        raise PkiError(f"invalid certificate serial {serial!r}")
    return serial


# --------------------------------------------------------------------------- helpers


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _cn_name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _common_names(name: x509.Name) -> list[str]:
    return [str(a.value) for a in name.get_attributes_for_oid(NameOID.COMMON_NAME)]


def _check_pattern(identity: str) -> None:
    if not isinstance(identity, str) or DEVICE_ID_PATTERN.fullmatch(identity) is None:
        raise PkiError(
            f"invalid identity {identity!r}: must match {DEVICE_ID_PATTERN.pattern} "
            "(no '/', '+', '#', spaces; 1-64 characters)"
        )


def validate_identity(identity: str, *, allow_reserved: bool = False) -> None:
    """Raise PkiError unless ``identity`` is usable as a certificate CN and MQTT topic level."""
    _check_pattern(identity)
    if not allow_reserved and identity.lower() in RESERVED_IDENTITIES:
        raise PkiError(f"identity {identity!r} is reserved for the platform")


def _checked_public_key(key: object) -> _PublicKey:
    """Accept only the key types/sizes Mosquitto clients are expected to use."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < RSA_KEY_SIZE:
            raise PkiError(f"RSA key too small ({key.key_size} bits, need >= {RSA_KEY_SIZE})")
        return key
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _ACCEPTED_CURVES):
            raise PkiError(f"unsupported EC curve {key.curve.name}")
        return key
    raise PkiError(f"unsupported public key type {type(key).__name__}")


def _key_usage(
    *, digital_signature: bool, key_encipherment: bool = False, cert_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _is_revocation(entry: object) -> TypeGuard[_Revocation]:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("serial"), int)
        and isinstance(entry.get("revoked_at"), str)
        and isinstance(entry.get("reason", ""), str)
    )


# --------------------------------------------------------------------------- device side


def generate_private_key(kind: KeyKind = "rsa") -> PrivateKey:
    """RSA-2048 by default (the platform's promise); EC P-256 is much faster for big sim fleets."""
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_SIZE)
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    raise PkiError(f"unknown key kind {kind!r}")


def make_csr(key: PrivateKey, device_id: str) -> bytes:
    """PEM CSR with subject CN=device_id, signed with SHA-256 by the device's own key."""
    _check_pattern(device_id)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_cn_name(device_id))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def key_to_pem(key: PrivateKey) -> bytes:
    """Unencrypted PKCS8 PEM, for the device's own disk (Mosquitto clients can't prompt)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _checked_passphrase(passphrase: bytes) -> bytes:
    if not isinstance(passphrase, bytes) or not passphrase:
        raise KeyFileError("a key passphrase must be non-empty bytes")
    return passphrase


def encrypted_key_pem(key: PrivateKeyTypes, passphrase: bytes) -> bytes:
    """PKCS#8 ``ENCRYPTED PRIVATE KEY`` PEM of ``key`` under ``passphrase``."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(_checked_passphrase(passphrase)),
    )


def load_encrypted_key(path: Path, passphrase: bytes) -> PrivateKeyTypes:
    """The private key in ``path``, decrypted with ``passphrase``.

    A key stored otherwise (plain, or in a legacy encrypted format) is rewritten in place as
    encrypted PKCS#8 (0600, atomically): the migration of a state folder from before keys
    were encrypted. KeyFileError (never showing the passphrase) if it cannot be read.
    """
    passphrase = _checked_passphrase(passphrase)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the key: {exc.strerror}") from None
    encrypted = True
    try:
        key = serialization.load_pem_private_key(data, passphrase)
    except TypeError:  # "Password was given but private key is not encrypted"
        encrypted = False
        key = _load_plain(path, data)
    except (ValueError, UnsupportedAlgorithm):
        # cryptography says "ASN.1 parsing error" for a wrong passphrase: say what it means.
        raise KeyFileError(
            f"{path}: cannot decrypt the private key with the configured key passphrase "
            "(FLEET_KEY_PASSPHRASE, or the per-user default): wrong passphrase, or not a key"
        ) from None
    if not encrypted or not data.lstrip().startswith(ENCRYPTED_KEY_PEM_HEADER):
        atomic_write(path, encrypted_key_pem(key, passphrase), mode=0o600)
        was = "unencrypted" if not encrypted else "in a legacy encrypted format"
        _LOG.warning("%s: the private key was stored %s; now encrypted at rest", path, was)
    return key


def _load_plain(path: Path, data: bytes) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(data, None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"{path}: not a PEM private key: {exc}") from None


def cert_fingerprint_sha256(cert: x509.Certificate) -> str:
    """Lower-case hex SHA-256 of the DER certificate."""
    return cert.fingerprint(hashes.SHA256()).hex()


def write_device_bundle(
    out_dir: Path, device_id: str, key_pem: bytes, cert_pem: bytes, ca_pem: bytes
) -> None:
    """Write ``<id>.key`` (0600), ``<id>.crt`` and ``ca.crt``: what an owner flashes on a device."""
    _check_pattern(device_id)  # the id becomes a file name: no path traversal
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / f"{device_id}.key", key_pem, mode=0o600)
    atomic_write(out_dir / f"{device_id}.crt", cert_pem)
    atomic_write(out_dir / _CA_CERT, ca_pem)


# --------------------------------------------------------------------------- CA


class CertificateAuthority:
    """A fleet CA persisted in a directory (ca.key, ca.crt, crl.pem, revoked.json).

    Changes to the revocations (``revoke``, ``hold``, ``release``) hold an exclusive lock on
    ``.revocations.lock`` while they read, change and republish, so several processes (the
    enforcer, the CLI) may revoke without losing an entry.
    """

    def __init__(self, directory: Path, key: rsa.RSAPrivateKey, cert: x509.Certificate) -> None:
        self._dir = directory
        self._key = key
        self._cert = cert
        self._ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())

    # ---------------------------------------------------------------- construction

    @classmethod
    def load_or_create(
        cls, directory: Path, name: str = DEFAULT_CA_NAME, *, passphrase: bytes
    ) -> CertificateAuthority:
        """Load the CA in ``directory``, creating it on first use (idempotent); its key is
        encrypted under ``passphrase`` (a plain one is migrated: :func:`load_encrypted_key`)."""
        directory.mkdir(parents=True, exist_ok=True)
        key_path, cert_path = directory / _CA_KEY, directory / _CA_CERT
        if key_path.exists() != cert_path.exists():
            raise PkiError(f"{directory}: exactly one of {_CA_KEY}/{_CA_CERT} exists; refusing")
        if key_path.exists():
            ca = cls._load(directory, passphrase)
        else:
            ca = cls._create(directory, name, passphrase)
        if not (directory / _REVOKED).exists():
            atomic_write(directory / _REVOKED, b"[]\n")
        if not (directory / _CRL).exists():
            ca.refresh_crl()
        return ca

    @classmethod
    def _load(cls, directory: Path, passphrase: bytes) -> CertificateAuthority:
        key = load_encrypted_key(directory / _CA_KEY, passphrase)
        cert = x509.load_pem_x509_certificate((directory / _CA_CERT).read_bytes())
        if not isinstance(key, rsa.RSAPrivateKey):
            raise PkiError(f"{directory / _CA_KEY}: expected an RSA CA key")
        if cert.public_key() != key.public_key():
            raise PkiError(f"{directory}: {_CA_CERT} does not match {_CA_KEY}")
        return cls(directory, key, cert)

    @classmethod
    def _create(cls, directory: Path, name: str, passphrase: bytes) -> CertificateAuthority:
        # RSA rather than EC for the CA: the broadest compatibility with constrained TLS stacks.
        key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_SIZE)
        now = _now()
        subject = _cn_name(name)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + dt.timedelta(days=CA_VALIDITY_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(digital_signature=False, cert_sign=True), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        # Key first: a crash between the two writes leaves "key without cert", which
        # load_or_create refuses rather than silently minting a second CA.
        atomic_write(directory / _CA_KEY, encrypted_key_pem(key, passphrase), mode=0o600)
        atomic_write(directory / _CA_CERT, _cert_pem(cert))
        return cls(directory, key, cert)

    # ---------------------------------------------------------------- properties

    @property
    def directory(self) -> Path:
        return self._dir

    @property
    def certificate(self) -> x509.Certificate:
        return self._cert

    @property
    def cert_pem(self) -> bytes:
        return _cert_pem(self._cert)

    @property
    def cert_path(self) -> Path:
        return self._dir / _CA_CERT

    @property
    def crl_path(self) -> Path:
        return self._dir / _CRL

    # ---------------------------------------------------------------- issuing

    def _sign_leaf(
        self,
        common_name: str,
        public_key: _PublicKey,
        eku: x509.ObjectIdentifier,
        days: int,
        san: x509.SubjectAlternativeName | None = None,
    ) -> x509.Certificate:
        if days < 1:
            raise PkiError(f"validity must be at least 1 day, got {days}")
        now = _now()
        # Never outlive the CA: the chain would fail anyway, and clients report it confusingly.
        not_after = min(now + dt.timedelta(days=days), self._cert.not_valid_after_utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_cn_name(common_name))
            .issuer_name(self._cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                _key_usage(
                    digital_signature=True,
                    key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self._ski),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        )
        if san is not None:
            builder = builder.add_extension(san, critical=False)
        return builder.sign(self._key, hashes.SHA256())

    def issue_from_csr(
        self, csr_pem: bytes, device_id: str, days: int = DEVICE_VALIDITY_DAYS
    ) -> x509.Certificate:
        """Sign a device's CSR as a clientAuth certificate with CN=device_id.

        Only the CSR's public key is used; requested extensions are ignored.
        """
        validate_identity(device_id)
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise PkiError(f"cannot parse CSR for {device_id!r}: {exc}") from exc
        if not csr.is_signature_valid:
            raise PkiError(f"CSR for {device_id!r} has an invalid signature")
        names = _common_names(csr.subject)
        if names != [device_id]:
            raise PkiError(f"CSR subject CN {names!r} does not match device id {device_id!r}")
        public_key = _checked_public_key(csr.public_key())
        return self._sign_leaf(device_id, public_key, ExtendedKeyUsageOID.CLIENT_AUTH, days)

    def issue_identity(self, common_name: str, kind: KeyKind = "rsa") -> tuple[bytes, bytes]:
        """(key_pem, cert_pem) for a platform client identity such as "orchestrator".

        The only path that may issue reserved names: the key is generated here, platform side.
        """
        validate_identity(common_name, allow_reserved=True)
        key = generate_private_key(kind)
        cert = self._sign_leaf(
            common_name, key.public_key(), ExtendedKeyUsageOID.CLIENT_AUTH, DEVICE_VALIDITY_DAYS
        )
        return key_to_pem(key), _cert_pem(cert)

    def issue_server_certificate(
        self,
        hostnames: Sequence[str] = ("localhost",),
        ips: Sequence[str] = ("127.0.0.1",),
    ) -> tuple[bytes, bytes]:
        """(key_pem, cert_pem) for the broker: serverAuth with DNS and IP subjectAltNames."""
        if isinstance(hostnames, str) or isinstance(ips, str):
            raise PkiError("hostnames and ips must be sequences of strings, not a string")
        general: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
        try:
            general += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        except ValueError as exc:
            raise PkiError(f"invalid IP address in {list(ips)!r}") from exc
        if not general:
            raise PkiError("a server certificate needs at least one hostname or IP")
        key = generate_private_key("rsa")
        cn = hostnames[0] if hostnames else "broker"
        cert = self._sign_leaf(
            cn[:64],
            key.public_key(),
            ExtendedKeyUsageOID.SERVER_AUTH,
            DEVICE_VALIDITY_DAYS,
            san=x509.SubjectAlternativeName(general),
        )
        return key_to_pem(key), _cert_pem(cert)

    # ---------------------------------------------------------------- revocation

    def _read_revoked(self) -> list[_Revocation]:
        path = self._dir / _REVOKED
        if not path.exists():
            return []
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list) or not all(_is_revocation(e) for e in data):
            raise PkiError(f"{path}: expected a list of {{serial, revoked_at, reason?}}")
        return data

    @contextlib.contextmanager
    def _revocations_locked(self) -> Iterator[None]:
        """Serialize read-modify-write of revoked.json across processes (enforcer, CLI)."""
        with (self._dir / _LOCK).open("a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def revoke(self, serial: int, reason: str | None = None) -> None:
        """Record ``serial`` as revoked for good and republish crl.pem.

        No-op if already revoked; a serial on hold becomes permanently revoked. ``reason`` is
        free text, written into the CRL as its reason code when it names an RFC 5280 reason
        (``keyCompromise``, ``cessationOfOperation``, ...). Use :meth:`hold` to suspend.
        """
        if reason == HOLD_REASON:
            raise PkiError("a hold is not a revocation: use hold()")
        self.update_revocations(revoke=[serial], reason=reason)

    def hold(self, serial: int) -> None:
        """Put ``serial`` on hold (CRL reason certificateHold); no-op if already listed."""
        self.update_revocations(hold=[serial])

    def release(self, serial: int) -> bool:
        """Lift the hold on ``serial``; True if it was on hold.

        False if it was not listed. Raises PkiError for a permanent revocation: a revoked
        certificate is never valid again (issue a new one).
        """
        if self.revocation_states().get(serial) is RevocationState.revoked:
            raise PkiError(f"serial {serial} is revoked for good; it cannot be released")
        return self.update_revocations(release=[serial])

    def update_revocations(
        self,
        *,
        revoke: Iterable[int] = (),
        hold: Iterable[int] = (),
        release: Iterable[int] = (),
        reason: str | None = None,
    ) -> bool:
        """Apply several changes with one CRL signature; True if the CRL changed.

        ``revoke`` lists (or upgrades a hold to) a permanent revocation with ``reason``;
        ``hold`` lists a serial not yet listed as on hold; ``release`` removes holds only, never
        a permanent revocation (those serials are skipped). A serial both held and revoked in
        one call ends up revoked.
        """
        to_revoke = {_check_serial(s) for s in revoke}
        to_hold = {_check_serial(s) for s in hold} - to_revoke
        to_release = {_check_serial(s) for s in release} - to_revoke - to_hold
        if reason == HOLD_REASON:
            raise PkiError("a hold is not a revocation reason: pass the serial in hold")
        with self._revocations_locked():
            entries = self._read_revoked()
            by_serial = {e["serial"]: e for e in entries}
            changed = False
            now = _now().isoformat()
            for serial in sorted(to_revoke):
                current = by_serial.get(serial)
                if current is not None and _state(current) is RevocationState.revoked:
                    continue
                entry = _Revocation(serial=serial, revoked_at=now)
                if reason is not None:
                    entry["reason"] = reason
                by_serial[serial] = entry
                changed = True
            for serial in sorted(to_hold):
                if serial not in by_serial:
                    by_serial[serial] = _Revocation(
                        serial=serial, revoked_at=now, reason=HOLD_REASON
                    )
                    changed = True
            for serial in to_release:
                current = by_serial.get(serial)
                if current is not None and _state(current) is RevocationState.on_hold:
                    del by_serial[serial]
                    changed = True
            if not changed:
                return False
            # Keep the file's order (oldest first); new entries go last.
            order = [e["serial"] for e in entries if e["serial"] in by_serial]
            known = set(order)
            order += [s for s in by_serial if s not in known]
            updated = [by_serial[s] for s in order]
            payload = json.dumps(updated, indent=2) + "\n"
            atomic_write(self._dir / _REVOKED, payload.encode("utf-8"))
            self._write_crl(updated)
            return True

    def revocation_states(self) -> dict[int, RevocationState]:
        """Every listed serial and whether it is revoked for good or on hold."""
        return {e["serial"]: _state(e) for e in self._read_revoked()}

    def is_revoked(self, serial: int) -> bool:
        """True if ``serial`` is revoked for good (not merely on hold: see :meth:`is_on_hold`).

        A held certificate is still its device's identity (it comes back on release), so
        callers deciding whether to issue a replacement must not treat it as revoked; the
        broker refuses both (``serial in revocation_states()``).
        """
        return self.revocation_states().get(serial) is RevocationState.revoked

    def is_on_hold(self, serial: int) -> bool:
        return self.revocation_states().get(serial) is RevocationState.on_hold

    def refresh_crl(self) -> None:
        """Re-sign crl.pem. Call well within CRL_VALIDITY_DAYS: brokers reject expired CRLs."""
        with self._revocations_locked():
            self._write_crl(self._read_revoked())

    def _write_crl(self, entries: Sequence[_Revocation]) -> None:
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self._cert.subject)
            .last_update(now)
            .next_update(now + dt.timedelta(days=CRL_VALIDITY_DAYS))
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self._ski),
                critical=False,
            )
            # Monotonic enough for one writer; lets relying parties spot a newer CRL.
            .add_extension(x509.CRLNumber(int(now.timestamp() * 1000)), critical=False)
        )
        for entry in entries:
            revoked = (
                x509.RevokedCertificateBuilder()
                .serial_number(entry["serial"])
                .revocation_date(dt.datetime.fromisoformat(entry["revoked_at"]))
            )
            flag = (
                x509.ReasonFlags.certificate_hold
                if _state(entry) is RevocationState.on_hold
                else _CRL_REASONS.get(entry.get("reason", ""))
            )
            if flag is not None:
                revoked = revoked.add_extension(x509.CRLReason(flag), critical=False)
            builder = builder.add_revoked_certificate(revoked.build())
        crl = builder.sign(self._key, hashes.SHA256())
        atomic_write(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))

    def crl(self) -> x509.CertificateRevocationList:
        return x509.load_pem_x509_crl(self.crl_path.read_bytes())

    # ---------------------------------------------------------------- verification

    def verify_chain(self, cert: x509.Certificate) -> bool:
        """True iff ``cert`` was signed by this CA and ``now`` is inside its validity window.

        Does not consult the CRL; use :meth:`revocation_states` for that.
        """
        try:
            cert.verify_directly_issued_by(self._cert)
        except (ValueError, TypeError, InvalidSignature):
            return False
        now = _now()
        return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc
