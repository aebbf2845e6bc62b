"""Process entry points (infra/entrypoints/): the composition root builds each lower-layer
process's small config from the settings, and `fleet up`'s services start those modules."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from infra.entrypoints.bridge import bridge_config
from infra.entrypoints.enforcer import enforcer_config
from infra.pki import CRL_VALIDITY_DAYS
from infra.services.bridge import BridgeService
from infra.services.enforcer import EnforcerService
from infra.settings import Settings


def test_the_bridge_gets_its_config_from_the_settings(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path)
    config = bridge_config(settings)
    assert (config.host, config.mqtt_port) == (settings.host, settings.mqtt_port)
    assert config.mqtt_max_inflight == settings.mqtt_max_inflight
    assert config.bootstrap_servers == settings.bootstrap_servers
    assert config.registry_url == settings.registry_url
    assert config.run_dir == settings.run_dir
    assert config.identities.ca_cert == settings.pki_dir / "ca.crt"
    assert config.identities.identity_cert("bridge-1") == settings.pki_dir / "bridge-1" / (
        "bridge-1.crt"
    )
    assert (config.ts_max_age_s, config.ts_max_ahead_s) == (
        settings.ts_max_age_s,
        settings.ts_max_ahead_s,
    )


def test_the_enforcer_gets_its_config_from_the_settings(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path)
    config = enforcer_config(settings)
    assert (config.host, config.mqtt_port) == (settings.host, settings.mqtt_port)
    assert config.registry_url == settings.registry_url
    assert config.run_dir == settings.run_dir
    assert config.identities.pki_dir == settings.pki_dir
    assert config.crl_validity_days == CRL_VALIDITY_DAYS


def test_services_start_the_entry_points(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path)
    bridge, enforcer = BridgeService(settings, 2), EnforcerService(settings)
    assert bridge.command()[1:] == ["-m", "infra.entrypoints.bridge", "2"]
    assert enforcer.command()[1:] == ["-m", "infra.entrypoints.enforcer"]
    for argv in (bridge.command(), enforcer.command()):
        assert importlib.util.find_spec(argv[2]) is not None
