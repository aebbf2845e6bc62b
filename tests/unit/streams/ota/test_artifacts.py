"""streams.ota.artifacts: content addressing, the release key, signatures and the device's check."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from infra.release_key import load_or_create_release_key, open_artifact_store
from schemas.codec import AvroCodec, Decoded, load_schema
from streams.ota.artifacts import (
    Artifact,
    ArtifactError,
    ArtifactKind,
    ArtifactStore,
    ReleaseKey,
    SignatureAlgorithm,
    load_public_key,
    signed_message,
    verify,
    verify_download,
)

NOW = 1_700_000_000_000
FIRMWARE = b"\x7fELF firmware image " * 1000


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return open_artifact_store(
        tmp_path / "artifacts", tmp_path / "pki", passphrase=b"test-passphrase"
    )


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> ArtifactStore:
    root = tmp_path_factory.mktemp("shared")
    return open_artifact_store(root / "artifacts", root / "pki", passphrase=b"test-passphrase")


def _file(tmp_path: Path, data: bytes, name: str = "fw.bin") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_add_stores_content_addressed_and_signed(store: ArtifactStore, tmp_path: Path) -> None:
    artifact = store.add(_file(tmp_path, FIRMWARE), "firmware", "2.0.1", now_ms=NOW)
    digest = hashlib.sha256(FIRMWARE).hexdigest()
    assert artifact.artifact_id == artifact.sha256 == digest
    assert (artifact.kind, artifact.version, artifact.size) == (
        ArtifactKind.firmware,
        "2.0.1",
        len(FIRMWARE),
    )
    assert artifact.path == f"sha256/{digest}"
    assert (store.root / artifact.path).read_bytes() == FIRMWARE
    assert store.read(artifact) == FIRMWARE
    assert artifact.name == "fw.bin"
    assert artifact.created_ms == NOW
    assert artifact.signature_alg is SignatureAlgorithm.ed25519
    assert artifact.key_id == store.release_key.key_id
    assert verify(artifact, FIRMWARE, store.release_key.public_key_pem)
    assert store.get(digest) == artifact
    assert store.artifacts() == [artifact]


def test_adding_the_same_content_again_is_idempotent(store: ArtifactStore, tmp_path: Path) -> None:
    first = store.add(_file(tmp_path, FIRMWARE, "a.bin"), ArtifactKind.firmware, "2.0.1", now_ms=1)
    again = store.add(_file(tmp_path, FIRMWARE, "b.bin"), "firmware", "2.0.1", now_ms=99)
    assert again == first  # the stored record, not a new one
    assert store.add_bytes(FIRMWARE, "firmware", "2.0.1") == first
    blobs = [p for p in (store.root / "sha256").iterdir() if not p.name.startswith(".")]
    assert blobs == [store.blob_path(first.sha256)]
    assert not [p for p in (store.root / "sha256").iterdir() if p.name.startswith(".")]
    other = store.add_bytes(FIRMWARE + b"!", "firmware", "2.0.2")
    assert other.artifact_id != first.artifact_id
    assert len(store.artifacts()) == 2


def test_the_same_content_under_another_version_or_kind_is_refused(store: ArtifactStore) -> None:
    store.add_bytes(FIRMWARE, "firmware", "2.0.1")
    with pytest.raises(ArtifactError, match="already artifact"):
        store.add_bytes(FIRMWARE, "firmware", "2.0.2")
    with pytest.raises(ArtifactError, match="already artifact"):
        store.add_bytes(FIRMWARE, "model", "2.0.1")


@pytest.mark.parametrize(
    ("kind", "version"),
    [("kernel", "1.0"), ("firmware", ""), ("firmware", "1.0 beta"), ("firmware", "../1")],
)
def test_invalid_kind_or_version_is_refused(store: ArtifactStore, kind: str, version: str) -> None:
    with pytest.raises(ArtifactError):
        store.add_bytes(b"x", kind, version)


def test_lookups_of_malformed_ids_find_nothing(store: ArtifactStore) -> None:
    assert store.get("../../etc/passwd") is None
    assert store.get("ab" * 32) is None
    with pytest.raises(ArtifactError):
        store.blob_path("../x")


def test_release_key_is_created_once_private_and_exportable(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    key = load_or_create_release_key(pki, passphrase=b"test-passphrase")
    assert stat.S_IMODE((pki / "release.key").stat().st_mode) == 0o600
    assert (pki / "release.pub").read_bytes() == key.public_key_pem
    assert load_public_key(key.public_key_pem) == key.public_key
    again = load_or_create_release_key(pki, passphrase=b"test-passphrase")
    assert again.key_id == key.key_id
    assert len(key.key_id) == 64


def test_release_key_refuses_an_orphan_or_mismatched_public_key(tmp_path: Path) -> None:
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    (orphan / "release.pub").write_bytes(ReleaseKey.generate().public_key_pem)
    with pytest.raises(ArtifactError, match="without"):
        load_or_create_release_key(orphan, passphrase=b"test-passphrase")
    pki = tmp_path / "pki"
    load_or_create_release_key(pki, passphrase=b"test-passphrase")
    (pki / "release.pub").write_bytes(ReleaseKey.generate().public_key_pem)
    with pytest.raises(ArtifactError, match="does not match"):
        load_or_create_release_key(pki, passphrase=b"test-passphrase")


def test_the_device_check_accepts_the_genuine_download(store: ArtifactStore) -> None:
    artifact = store.add_bytes(FIRMWARE, "firmware", "2.0.1")
    pem = store.release_key.public_key_pem
    assert verify_download(FIRMWARE, artifact.to_record(), pem) is None
    assert verify_download(FIRMWARE, artifact.to_record(), pem.decode()) is None


def test_tampered_data_is_refused(store: ArtifactStore) -> None:
    artifact = store.add_bytes(FIRMWARE, "firmware", "2.0.1")
    pem = store.release_key.public_key_pem
    flipped = bytes([FIRMWARE[0] ^ 1]) + FIRMWARE[1:]
    assert not verify(artifact, flipped, pem)
    assert verify_download(flipped, artifact.to_record(), pem) == "digest_mismatch"
    assert verify_download(FIRMWARE[:-1], artifact.to_record(), pem) == "size_mismatch"


def test_a_relabelled_record_is_refused(store: ArtifactStore) -> None:
    # Old firmware offered as a newer version: the digest still matches, the signature not.
    artifact = store.add_bytes(FIRMWARE, "firmware", "1.0.0")
    pem = store.release_key.public_key_pem
    relabelled = {**artifact.to_record(), "version": "9.9.9"}
    assert verify_download(FIRMWARE, relabelled, pem) == "bad_signature"
    as_config = {**artifact.to_record(), "kind": "config"}
    assert verify_download(FIRMWARE, as_config, pem) == "bad_signature"
    assert verify_download(FIRMWARE, {"version": "1"}, pem) == "invalid_record"
    assert verify_download(FIRMWARE, artifact.to_record(), b"not a key") == "invalid_key"


def test_the_wrong_key_is_refused(store: ArtifactStore) -> None:
    artifact = store.add_bytes(FIRMWARE, "firmware", "2.0.1")
    stranger = ReleaseKey.generate()
    assert not verify(artifact, FIRMWARE, stranger.public_key_pem)
    assert verify_download(FIRMWARE, artifact.to_record(), stranger.public_key_pem) == "wrong_key"
    # A forger's signature under the genuine key id does not verify either.
    forged = {**artifact.to_record(), "signature": stranger.sign(artifact.message)}
    pem = store.release_key.public_key_pem
    assert verify_download(FIRMWARE, forged, pem) == "bad_signature"


def test_an_rsa_release_key_signs_with_pss(tmp_path: Path) -> None:
    key = ReleaseKey(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    store = ArtifactStore(tmp_path / "artifacts", key)
    artifact = store.add_bytes(b"model weights", "model", "7")
    assert artifact.signature_alg is SignatureAlgorithm.rsa_pss_sha256
    assert verify(artifact, b"model weights", key.public_key)
    assert verify_download(b"model weights", artifact.to_record(), key.public_key_pem) is None
    ed = ReleaseKey.generate()
    assert verify_download(b"model weights", artifact.to_record(), ed.public_key_pem) == "wrong_key"


def test_small_rsa_keys_are_refused() -> None:
    with pytest.raises(ArtifactError, match="too small"):
        ReleaseKey(rsa.generate_private_key(public_exponent=65537, key_size=1024))


def test_the_manifest_is_canonical() -> None:
    assert signed_message("firmware", "2.0.1", "ab" * 32, 10) == (
        b'["fleetstream-ota-artifact/1","firmware","2.0.1","' + b"ab" * 32 + b'",10]'
    )


def test_avro_round_trip(store: ArtifactStore) -> None:
    artifact = store.add_bytes(FIRMWARE, "config", "c-3", name=None, now_ms=NOW)
    codec = AvroCodec(load_schema("OtaArtifact"), schema_id=1)
    decoded = codec.decode(codec.encode(artifact.to_record()))
    assert isinstance(decoded, Decoded)
    assert Artifact.from_record(decoded.record) == artifact


def test_invalid_records_are_refused(store: ArtifactStore) -> None:
    record = store.add_bytes(FIRMWARE, "firmware", "1").to_record()
    for bad in (
        {**record, "artifact_id": "0" * 64},
        {**record, "sha256": "XYZ"},
        {**record, "size": -1},
        {**record, "signature": b""},
        {**record, "kind": "kernel"},
    ):
        with pytest.raises(ArtifactError):
            Artifact.from_record(bad)


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=2048), flip=st.integers(min_value=0))
def test_any_content_verifies_and_any_flipped_bit_is_refused(
    shared_store: ArtifactStore, data: bytes, flip: int
) -> None:
    version = f"v{hashlib.sha256(data).hexdigest()[:16]}"
    artifact = shared_store.add_bytes(data, "firmware", version)
    pem = shared_store.release_key.public_key_pem
    assert verify_download(data, artifact.to_record(), pem) is None
    if data:
        at = flip % (len(data) * 8)
        tampered = bytearray(data)
        tampered[at // 8] ^= 1 << (at % 8)
        assert verify_download(bytes(tampered), artifact.to_record(), pem) == "digest_mismatch"


# --------------------------------------------------------------------------- key at rest


def test_the_release_key_on_disk_is_encrypted_and_signs(tmp_path: Path) -> None:
    store = open_artifact_store(tmp_path / "a", tmp_path / "pki", passphrase=b"test-passphrase")
    pem = (tmp_path / "pki" / "release.key").read_bytes()
    assert pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    with pytest.raises(TypeError, match="encrypted"):
        serialization.load_pem_private_key(pem, None)
    artifact = store.add_bytes(FIRMWARE, "firmware", "1.0.0")
    assert verify(artifact, FIRMWARE, (tmp_path / "pki" / "release.pub").read_bytes())


def test_the_release_key_with_a_wrong_passphrase_is_a_clear_error(tmp_path: Path) -> None:
    load_or_create_release_key(tmp_path, passphrase=b"test-passphrase")
    with pytest.raises(ArtifactError, match=r"cannot decrypt .* wrong passphrase") as info:
        open_artifact_store(tmp_path / "a", tmp_path, passphrase=b"another-passphrase")
    assert "another-passphrase" not in str(info.value)


def test_a_plain_release_key_is_encrypted_on_load_and_keeps_its_id(tmp_path: Path) -> None:
    plain = ed25519.Ed25519PrivateKey.generate()
    pem = plain.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "release.key").write_bytes(pem)  # a state folder from before
    old_id = ReleaseKey(plain).key_id

    key = load_or_create_release_key(tmp_path, passphrase=b"test-passphrase")

    assert key.key_id == old_id
    assert (
        (tmp_path / "release.key").read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    )
    assert stat.S_IMODE((tmp_path / "release.key").stat().st_mode) == 0o600
    artifact = ArtifactStore(tmp_path / "a", key).add_bytes(FIRMWARE, "firmware", "1.0.1")
    assert verify(artifact, FIRMWARE, plain.public_key())
