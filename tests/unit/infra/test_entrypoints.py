"""Process entry points (infra/entrypoints/): the composition root builds each lower-layer
process's small config from the settings, and `fleet up`'s services start those modules."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import pytest

from infra.entrypoints.bridge import bridge_config
from infra.entrypoints.enforcer import enforcer_config
from infra.keys import token_authority
from infra.pki import CRL_VALIDITY_DAYS
from infra.process import query_port_config
from infra.services.bridge import BridgeService
from infra.services.enforcer import EnforcerService
from infra.settings import Settings
from ingest.bridge import BridgeConfig
from ingest.enforcement import EnforcerConfig
from streams.registry.rbac import Principal
from streams.registry.tokens import KEY_FILE, TokenAuthority


@pytest.mark.parametrize("config_of", [bridge_config, enforcer_config])
def test_the_mqtt_processes_get_broker_registry_and_run_dir_from_the_settings(
    tmp_path: Path, config_of: Callable[[Settings], BridgeConfig | EnforcerConfig]
) -> None:
    settings = Settings(state_dir=tmp_path)
    config = config_of(settings)
    assert (config.host, config.mqtt_port) == (settings.host, settings.mqtt_port)
    assert config.registry_url == settings.registry_url
    assert config.run_dir == settings.run_dir


def test_the_bridge_gets_its_config_from_the_settings(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path)
    config = bridge_config(settings)
    assert config.mqtt_max_inflight == settings.mqtt_max_inflight
    assert config.bootstrap_servers == settings.bootstrap_servers
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
    assert config.identities.pki_dir == settings.pki_dir
    assert config.crl_validity_days == CRL_VALIDITY_DAYS


def test_the_query_port_gets_its_config_from_the_settings(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path)
    config = query_port_config(settings)
    assert (config.host, config.port) == (settings.host, settings.query_port)
    assert config.warehouse_dsn == settings.warehouse_dsn
    assert config.kafka.bootstrap_servers == settings.bootstrap_servers
    assert config.kafka.registry_url == settings.registry_url
    assert config.limits.timeout_s == settings.query_timeout_s
    assert config.limits.max_memory_bytes == settings.query_max_memory_bytes
    assert config.run_dir == settings.run_dir
    assert config.token_dir == settings.pki_dir / "api"


def test_the_token_key_is_the_one_in_the_pki_folder(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path)
    tokens = token_authority(settings)
    assert (settings.pki_dir / "api" / KEY_FILE).exists()
    # The query port opens the same key from its config: it verifies the API's tokens.
    port = TokenAuthority.load_or_create(query_port_config(settings).token_dir)
    assert port.key_id == tokens.key_id
    user = Principal.user("ada")
    assert port.verify(tokens.issue(user)) == user


def test_services_start_the_entry_points(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path)
    bridge, enforcer = BridgeService(settings, 2), EnforcerService(settings)
    assert bridge.command()[1:] == ["-m", "infra.entrypoints.bridge", "2"]
    assert enforcer.command()[1:] == ["-m", "infra.entrypoints.enforcer"]
    for argv in (bridge.command(), enforcer.command()):
        assert importlib.util.find_spec(argv[2]) is not None
