"""The platform's OTA release key on disk, and the artifact store that signs with it.

The key files live in the platform's PKI directory: ``release.key`` (encrypted PKCS#8 PEM
under the platform's key passphrase, mode 0600; a plain one from before is encrypted on load,
as the CA's: infra/pki.py) and ``release.pub`` (SubjectPublicKeyInfo PEM, for devices to
pin). The artifacts themselves, the signing and the device's check are the OTA capability's
(streams/ota/artifacts.py); reading encrypted key files is the composition root's.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from infra.pki import KeyFileError, encrypted_key_pem, load_encrypted_key
from streams.ota.artifacts import (
    RELEASE_KEY_FILE,
    RELEASE_PUB_FILE,
    ArtifactError,
    ArtifactStore,
    ReleaseKey,
    load_public_key,
)
from streams.runtime.files import atomic_write, create_once

__all__ = ["load_or_create_release_key", "open_artifact_store"]


def load_or_create_release_key(pki_dir: Path, *, passphrase: bytes) -> ReleaseKey:
    """The key in ``pki_dir/release.key``, created (Ed25519, 0600, encrypted under
    ``passphrase``) on first use, and ``release.pub`` written beside it. Refuses a
    ``release.pub`` that does not match; a plain key is encrypted in place."""
    pki_dir.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = pki_dir / RELEASE_KEY_FILE, pki_dir / RELEASE_PUB_FILE
    if not key_path.exists():
        if pub_path.exists():
            raise ArtifactError(
                f"{pub_path} exists without {key_path}: refusing to mint a new release key "
                "devices would not trust"
            )
        pem = encrypted_key_pem(ed25519.Ed25519PrivateKey.generate(), passphrase)
        create_once(key_path, pem, mode=0o600)  # lost a race: the other key is loaded
    try:
        loaded = load_encrypted_key(key_path, passphrase)
    except KeyFileError as exc:
        raise ArtifactError(str(exc)) from None
    if not isinstance(loaded, ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey):
        raise ArtifactError(f"{key_path}: expected an Ed25519 or RSA key")
    key = ReleaseKey(loaded)
    if pub_path.exists():
        if load_public_key(pub_path.read_bytes()) != key.public_key:
            raise ArtifactError(f"{pub_path} does not match {key_path}")
    else:
        atomic_write(pub_path, key.public_key_pem)
    return key


def open_artifact_store(root: Path, pki_dir: Path, *, passphrase: bytes) -> ArtifactStore:
    """The store at ``root``, signing with the release key of ``pki_dir`` (created on first
    use, encrypted under ``passphrase``)."""
    return ArtifactStore(root, load_or_create_release_key(pki_dir, passphrase=passphrase))
