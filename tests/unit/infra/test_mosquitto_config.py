"""The broker's generated config: subscribe ACL plugin first, the envelope's size limit."""

from __future__ import annotations

import subprocess
from pathlib import Path

from infra.services.mosquitto import (
    DEVICE_TOPIC_PREFIX,
    PLATFORM_IDENTITIES,
    SUBSCRIBE_ACL_SOURCE,
    BrokerFiles,
    build_subscribe_acl_plugin,
    render_config,
)
from infra.settings import Settings
from ingest.envelope import MAX_PAYLOAD_BYTES


def _config(tmp_path: Path) -> list[str]:
    files = BrokerFiles(home=tmp_path, pki_dir=tmp_path / "pki")
    dynsec = Path("/opt/mosquitto/mosquitto_dynamic_security.so")
    acl = tmp_path / "plugins" / "fleet_subscribe_acl-x.so"
    return render_config(Settings(), files, "fleet", dynsec, acl).splitlines()


def test_the_broker_refuses_payloads_over_the_envelopes_limit(tmp_path: Path) -> None:
    lines = _config(tmp_path)
    assert f"message_size_limit {MAX_PAYLOAD_BYTES}" in lines
    assert MAX_PAYLOAD_BYTES == 64 * 1024


def test_the_subscribe_acl_plugin_is_asked_before_the_dynsec_plugin(tmp_path: Path) -> None:
    lines = _config(tmp_path)
    plugins = [line for line in lines if line.startswith("plugin ")]
    assert plugins == [
        f"plugin {tmp_path / 'plugins' / 'fleet_subscribe_acl-x.so'}",
        "plugin /opt/mosquitto/mosquitto_dynamic_security.so",
    ]
    first = lines.index(plugins[0])
    # plugin_opt_* lines belong to the plugin line above them.
    assert lines[first + 1] == f"plugin_opt_subtree_prefix {DEVICE_TOPIC_PREFIX}"
    option = lines[first + 2]
    assert option.startswith("plugin_opt_platform_identities ")
    assert option.split(" ", 1)[1].split(",") == list(PLATFORM_IDENTITIES)


def test_the_plugin_builds_once_per_source(tmp_path: Path) -> None:
    first = build_subscribe_acl_plugin(tmp_path)
    assert build_subscribe_acl_plugin(tmp_path) == first  # cached: not rebuilt
    symbols = subprocess.run(["nm", "-D", str(first)], capture_output=True, text=True).stdout
    for entry in ("mosquitto_plugin_version", "mosquitto_plugin_init", "mosquitto_plugin_cleanup"):
        assert f" T {entry}" in symbols
    changed = tmp_path / "changed.c"
    changed.write_text(SUBSCRIBE_ACL_SOURCE.read_text() + "\n/* changed */\n")
    assert build_subscribe_acl_plugin(tmp_path, changed) != first
