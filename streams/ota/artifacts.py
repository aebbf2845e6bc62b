"""OTA artifacts: content-addressed storage, signed by the platform's release key.

``fleet ota artifact add FILE --kind firmware|config|model --version V`` ends in
:meth:`ArtifactStore.add`: the content is stored once under ``<root>/sha256/<hex>`` (its
SHA-256 is its id), and an :class:`Artifact` records kind, version, digest, size and the
release key's signature; its Avro ``OtaArtifact`` record (:meth:`Artifact.to_record`) is the
value of ``ota.artifacts`` (compacted, key = artifact id). Adding the same content again with
the same kind and version returns the stored artifact unchanged (idempotent); the same content
under another kind or version is refused, since its id would then name two artifacts.

**What is signed.** Not the raw content but the canonical manifest :func:`signed_message`:
compact JSON ``["fleetstream-ota-artifact/1", kind, version, sha256, size]``. The signature
thus binds the digest to its kind and version, so old firmware cannot be replayed under a new
version number. A device checks the digest and size of what it downloaded against the record,
then the signature over the record's manifest (:func:`verify_download`).

**The release key** (:class:`ReleaseKey`; infra/release_key.py loads the platform's, and
opens the store with it) lives in the platform's PKI directory:
``release.key`` (encrypted PKCS#8 PEM under the platform's key passphrase, mode 0600; a plain
one from before is encrypted on load, as the CA's: infra/pki.py) and ``release.pub``
(SubjectPublicKeyInfo PEM, for devices to pin). It is created on first use as Ed25519; an
RSA key (>= 2048 bits) placed there instead is used with RSASSA-PSS (SHA-256, MGF1-SHA-256,
32-byte salt). Files are written atomically (a temp file, then a rename; the private key is
linked into place, so two processes creating it at once end up sharing one key). ``key_id``
(SHA-256 of the public key's DER) names the key in each artifact, so devices can tell a
rotated key from a forgery.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Self, TypeAlias

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from schemas.records import AvroRecord, from_avro
from streams.runtime.files import create_once

__all__ = [
    "ARTIFACTS_TOPIC",
    "ARTIFACT_SCHEMA",
    "MANIFEST_TAG",
    "VERSION_PATTERN",
    "Artifact",
    "ArtifactError",
    "ArtifactKind",
    "ArtifactStore",
    "PublicKey",
    "ReleaseKey",
    "SignatureAlgorithm",
    "key_id",
    "load_public_key",
    "signed_message",
    "verify",
    "verify_download",
]

ARTIFACT_SCHEMA = "OtaArtifact"  # schemas/avro/OtaArtifact.avsc
ARTIFACTS_TOPIC = "ota.artifacts"  # compacted, key = artifact id
MANIFEST_TAG = "fleetstream-ota-artifact/1"
# Versions end up in MQTT payloads, file names and shell commands: keep them plain.
VERSION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
RSA_MIN_BITS = 2048

_SHA256 = re.compile(r"[0-9a-f]{64}")
RELEASE_KEY_FILE = "release.key"
RELEASE_PUB_FILE = "release.pub"
_BLOBS = "sha256"
_META = "meta"
_CHUNK = 1 << 20

PrivateKey: TypeAlias = ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
PublicKey: TypeAlias = ed25519.Ed25519PublicKey | rsa.RSAPublicKey


class ArtifactError(ValueError):
    """An artifact, key or request the store refuses."""


class ArtifactKind(StrEnum):
    firmware = "firmware"
    config = "config"
    model = "model"


class SignatureAlgorithm(StrEnum):
    ed25519 = "ed25519"
    rsa_pss_sha256 = "rsa_pss_sha256"


def _pss() -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)


def signed_message(kind: ArtifactKind | str, version: str, sha256: str, size: int) -> bytes:
    """The canonical manifest the release key signs (compact JSON, UTF-8)."""
    manifest = [MANIFEST_TAG, str(kind), version, sha256, size]
    return json.dumps(manifest, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def key_id(public_key: PublicKey) -> str:
    """Lower-case hex SHA-256 of the public key's DER SubjectPublicKeyInfo."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def _checked_public(key: object) -> PublicKey:
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < RSA_MIN_BITS:
            raise ArtifactError(f"RSA release key too small ({key.key_size} bits)")
        return key
    raise ArtifactError(f"unsupported release key type {type(key).__name__}")


def load_public_key(pem: bytes | str) -> PublicKey:
    """The release public key in ``pem`` (``release.pub``); ArtifactError if it is not one."""
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ArtifactError(f"not a PEM public key: {exc}") from None
    return _checked_public(key)


def _algorithm(key: PublicKey) -> SignatureAlgorithm:
    if isinstance(key, ed25519.Ed25519PublicKey):
        return SignatureAlgorithm.ed25519
    return SignatureAlgorithm.rsa_pss_sha256


# --------------------------------------------------------------------------- release key


class ReleaseKey:
    """The platform's release signing key (Ed25519, or RSA with PSS)."""

    def __init__(self, private_key: PrivateKey) -> None:
        if not isinstance(private_key, ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey):
            raise ArtifactError(f"unsupported release key type {type(private_key).__name__}")
        self._key = private_key
        self._public = _checked_public(private_key.public_key())
        self._key_id = key_id(self._public)

    @classmethod
    def generate(cls) -> ReleaseKey:
        """A new Ed25519 key, in memory only (tests; the platform loads its own with
        infra/release_key.py)."""
        return cls(ed25519.Ed25519PrivateKey.generate())

    @property
    def public_key(self) -> PublicKey:
        return self._public

    @property
    def public_key_pem(self) -> bytes:
        """The public key as SubjectPublicKeyInfo PEM: what devices pin."""
        return self._public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def key_id(self) -> str:
        return self._key_id

    @property
    def algorithm(self) -> SignatureAlgorithm:
        return _algorithm(self._public)

    def sign(self, message: bytes) -> bytes:
        if isinstance(self._key, ed25519.Ed25519PrivateKey):
            return self._key.sign(message)
        return self._key.sign(message, _pss(), hashes.SHA256())


# --------------------------------------------------------------------------- artifacts


def _check_version(version: object) -> str:
    if not isinstance(version, str) or VERSION_PATTERN.fullmatch(version) is None:
        raise ArtifactError(f"invalid version {version!r}: must match {VERSION_PATTERN.pattern}")
    return version


@dataclass(frozen=True, slots=True, kw_only=True)
class Artifact(AvroRecord):
    """One stored, signed artifact: the value of ``ota.artifacts`` under its id."""

    artifact_id: str  # = sha256
    kind: ArtifactKind
    version: str
    sha256: str
    size: int
    signature: bytes
    signature_alg: SignatureAlgorithm
    key_id: str
    created_ms: int
    path: str  # relative to the store's root: sha256/<hex>
    name: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", ArtifactKind(self.kind))
        object.__setattr__(self, "signature_alg", SignatureAlgorithm(self.signature_alg))
        if not isinstance(self.sha256, str) or _SHA256.fullmatch(self.sha256) is None:
            raise ArtifactError(f"invalid sha256 {self.sha256!r}: 64 lower-case hex digits")
        if self.artifact_id != self.sha256:
            raise ArtifactError("an artifact's id is its sha256")
        _check_version(self.version)
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 0:
            raise ArtifactError(f"invalid size {self.size!r}")
        if not isinstance(self.signature, bytes) or not self.signature:
            raise ArtifactError("an artifact needs its signature")
        if not isinstance(self.key_id, str) or _SHA256.fullmatch(self.key_id) is None:
            raise ArtifactError(f"invalid key id {self.key_id!r}")

    @property
    def message(self) -> bytes:
        """The manifest its signature is over (:func:`signed_message`)."""
        return signed_message(self.kind, self.version, self.sha256, self.size)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Self:
        """Inverse of :meth:`to_record`; ArtifactError (a ValueError) if it is not valid."""
        try:
            return from_avro(cls, record)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ArtifactError):
                raise
            raise ArtifactError(f"invalid artifact record: {exc!r}") from None


def _signature_valid(artifact: Artifact, public_key: PublicKey) -> bool:
    if artifact.key_id != key_id(public_key) or artifact.signature_alg != _algorithm(public_key):
        return False
    try:
        if isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(artifact.signature, artifact.message)
        else:
            public_key.verify(artifact.signature, artifact.message, _pss(), hashes.SHA256())
    except InvalidSignature:
        return False
    return True


def _public(public_key: PublicKey | bytes | str) -> PublicKey:
    if isinstance(public_key, bytes | str):
        return load_public_key(public_key)
    return _checked_public(public_key)


def verify(artifact: Artifact, data: bytes, public_key: PublicKey | bytes | str) -> bool:
    """True when ``data`` is ``artifact``'s content and its signature is the release key's
    (``public_key``: a key or its PEM). Raises ArtifactError only for an unusable key."""
    return (
        len(data) == artifact.size
        and hashlib.sha256(data).hexdigest() == artifact.sha256
        and _signature_valid(artifact, _public(public_key))
    )


def verify_download(
    data: bytes, artifact_record: Mapping[str, Any], public_key_pem: bytes | str
) -> str | None:
    """The device's check of a download: None when it may install ``data``, else the reason
    to report as ``failed``: ``invalid_record``, ``invalid_key``, ``size_mismatch``,
    ``digest_mismatch``, ``wrong_key`` (signed by another key) or ``bad_signature``."""
    try:
        artifact = Artifact.from_record(artifact_record)
    except ArtifactError:
        return "invalid_record"
    try:
        public_key = load_public_key(public_key_pem)
    except ArtifactError:
        return "invalid_key"
    if len(data) != artifact.size:
        return "size_mismatch"
    if hashlib.sha256(data).hexdigest() != artifact.sha256:
        return "digest_mismatch"
    if artifact.key_id != key_id(public_key) or artifact.signature_alg != _algorithm(public_key):
        return "wrong_key"
    if not _signature_valid(artifact, public_key):
        return "bad_signature"
    return None


class ArtifactStore:
    """Artifacts under ``root``: content at ``sha256/<hex>``, records at ``meta/<hex>.json``.

    Files are written once and never modified (a temp file linked into place), so several
    processes may add the same content at once and a reader never sees a partial file.
    """

    def __init__(self, root: Path, release_key: ReleaseKey) -> None:
        self._root = root
        self._key = release_key

    @property
    def root(self) -> Path:
        return self._root

    @property
    def release_key(self) -> ReleaseKey:
        return self._key

    def blob_path(self, sha256: str) -> Path:
        if _SHA256.fullmatch(sha256) is None:
            raise ArtifactError(f"invalid sha256 {sha256!r}")
        return self._root / _BLOBS / sha256

    def _meta_path(self, sha256: str) -> Path:
        return self._root / _META / f"{sha256}.json"

    def add(
        self,
        path: Path,
        kind: ArtifactKind | str,
        version: str,
        *,
        now_ms: int | None = None,
    ) -> Artifact:
        """Store the file at ``path`` as a signed artifact (idempotent; see the module doc)."""
        with path.open("rb") as fh:
            chunks = iter(lambda: fh.read(_CHUNK), b"")
            return self._add(chunks, kind, version, path.name, now_ms)

    def add_bytes(
        self,
        data: bytes,
        kind: ArtifactKind | str,
        version: str,
        *,
        name: str | None = None,
        now_ms: int | None = None,
    ) -> Artifact:
        """:meth:`add` for content in memory."""
        return self._add([data], kind, version, name, now_ms)

    def _add(
        self,
        chunks: Iterable[bytes],
        kind: ArtifactKind | str,
        version: str,
        name: str | None,
        now_ms: int | None,
    ) -> Artifact:
        try:
            kind = ArtifactKind(kind)
        except ValueError:
            raise ArtifactError(
                f"invalid kind {kind!r}: one of {', '.join(ArtifactKind)}"
            ) from None
        _check_version(version)
        blobs = self._root / _BLOBS
        blobs.mkdir(parents=True, exist_ok=True)
        (self._root / _META).mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        fd, tmp_name = tempfile.mkstemp(dir=blobs, prefix=".incoming.", suffix=".tmp")
        tmp = Path(tmp_name)
        try:
            os.fchmod(fd, 0o644)
            with os.fdopen(fd, "wb") as fh:
                for chunk in chunks:
                    digest.update(chunk)
                    size += len(chunk)
                    fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            sha256 = digest.hexdigest()
            with contextlib.suppress(FileExistsError):  # already stored: same bytes
                os.link(tmp, self.blob_path(sha256))
        finally:
            tmp.unlink(missing_ok=True)

        existing = self.get(sha256)
        if existing is not None:
            return self._same_or_refuse(existing, kind, version)
        message = signed_message(kind, version, sha256, size)
        artifact = Artifact(
            artifact_id=sha256,
            kind=kind,
            version=version,
            sha256=sha256,
            size=size,
            signature=self._key.sign(message),
            signature_alg=self._key.algorithm,
            key_id=self._key.key_id,
            created_ms=int(time.time() * 1000) if now_ms is None else now_ms,
            path=f"{_BLOBS}/{sha256}",
            name=name,
        )
        if not create_once(self._meta_path(sha256), _meta_json(artifact)):
            stored = self.get(sha256)  # another process added it first
            assert stored is not None
            return self._same_or_refuse(stored, kind, version)
        return artifact

    @staticmethod
    def _same_or_refuse(existing: Artifact, kind: ArtifactKind, version: str) -> Artifact:
        if (existing.kind, existing.version) != (kind, version):
            raise ArtifactError(
                f"this content is already artifact {existing.artifact_id[:12]}... "
                f"({existing.kind} {existing.version}), not {kind} {version}"
            )
        return existing

    def get(self, artifact_id: str) -> Artifact | None:
        """The stored artifact ``artifact_id`` (= sha256), or None."""
        if not isinstance(artifact_id, str) or _SHA256.fullmatch(artifact_id) is None:
            return None
        try:
            text = self._meta_path(artifact_id).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        record = json.loads(text)
        record["signature"] = bytes.fromhex(record["signature"])
        return Artifact.from_record(record)

    def artifacts(self) -> list[Artifact]:
        """Every stored artifact, oldest first."""
        meta = self._root / _META
        found = [self.get(p.stem) for p in meta.glob("*.json")] if meta.is_dir() else []
        return sorted((a for a in found if a is not None), key=lambda a: (a.created_ms, a.sha256))

    def read(self, artifact: Artifact) -> bytes:
        """The content of ``artifact`` (whole; for the simulator and tests)."""
        return self.blob_path(artifact.sha256).read_bytes()


def _meta_json(artifact: Artifact) -> bytes:
    record = artifact.to_record()
    record["signature"] = artifact.signature.hex()
    return (json.dumps(record, sort_keys=True, indent=1) + "\n").encode("utf-8")
