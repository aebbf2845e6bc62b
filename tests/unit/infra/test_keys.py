"""infra.keys: where the signing keys' passphrase comes from, and that it is never shown."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from pydantic import SecretStr

from infra.keys import KeyPassphraseError, default_passphrase_file, key_passphrase
from infra.pki import CertificateAuthority
from infra.settings import Settings, settings_env


@pytest.fixture
def config_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The per-user config folder, in tmp_path (never the real ~/.config)."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("FLEET_KEY_PASSPHRASE", raising=False)
    return tmp_path / "config"


def test_an_unset_passphrase_is_a_per_user_secret_outside_the_state_folder(
    config_home: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(state_dir=tmp_path / "state")
    with caplog.at_level("WARNING"):
        first = key_passphrase(settings)
    path = default_passphrase_file()
    assert path == config_home / "fleetstream" / "key-passphrase"
    assert not path.is_relative_to(settings.state_dir)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(first) >= 32
    assert "FLEET_KEY_PASSPHRASE is not set" in caplog.text  # the warning when defaulted
    assert first.decode() not in caplog.text
    assert key_passphrase(settings) == first  # stable: the state's keys stay readable
    assert key_passphrase(Settings(state_dir=tmp_path / "other")) == first  # per user


def test_the_setting_wins_and_is_passed_to_children_but_never_shown(config_home: Path) -> None:
    settings = Settings(key_passphrase=SecretStr("a long operator passphrase"))
    assert key_passphrase(settings) == b"a long operator passphrase"
    assert not default_passphrase_file().exists()
    assert "operator" not in repr(settings)
    assert "operator" not in str(settings.model_dump())
    assert settings_env(settings)["FLEET_KEY_PASSPHRASE"] == "a long operator passphrase"
    assert "FLEET_KEY_PASSPHRASE" not in settings_env(Settings())


def test_the_setting_is_read_from_the_environment(
    config_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLEET_KEY_PASSPHRASE", "from the environment")
    assert key_passphrase(Settings()) == b"from the environment"


def test_a_short_passphrase_is_refused_without_echoing_it(config_home: Path) -> None:
    with pytest.raises(KeyPassphraseError, match="shorter than 8") as info:
        key_passphrase(Settings(key_passphrase=SecretStr("abc1234")))
    assert "abc1234" not in str(info.value)


def test_a_passphrase_file_others_can_read_is_refused(config_home: Path) -> None:
    path = default_passphrase_file()
    path.parent.mkdir(parents=True)
    path.write_text("shared passphrase\n")
    path.chmod(0o644)
    with pytest.raises(KeyPassphraseError, match="chmod 600"):
        key_passphrase(Settings())
    path.chmod(0o600)
    assert key_passphrase(Settings()) == b"shared passphrase"


def test_the_platform_ca_opens_with_the_resolved_passphrase(
    config_home: Path, tmp_path: Path
) -> None:
    settings = Settings(state_dir=tmp_path / "state")
    ca = CertificateAuthority.load_or_create(settings.pki_dir, passphrase=key_passphrase(settings))
    pem = (settings.pki_dir / "ca.key").read_bytes()
    assert pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert key_passphrase(settings) not in pem
    again = CertificateAuthority.load_or_create(
        settings.pki_dir, passphrase=key_passphrase(settings)
    )
    assert again.certificate == ca.certificate
