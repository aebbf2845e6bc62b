"""Generated configuration: Kafka properties, Mosquitto config and ACL, topic declarations."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import psutil
import psutil._pslinux
import pytest

from infra.pki import CertificateAuthority, PkiError, generate_private_key, make_csr
from infra.services.base import PidRecord, wait_until
from infra.services.kafka import server_properties
from infra.services.mosquitto import (
    PLATFORM_IDENTITIES,
    BrokerFiles,
    render_acl,
    render_config,
)
from infra.settings import Settings
from schemas.identity import (
    BRIDGE_IDENTITIES,
    MAX_BRIDGE_REPLICAS,
    RESERVED_IDENTITIES,
    bridge_identity,
)
from schemas.topics import TOPICS


def _props(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line)


def test_single_broker_bootstraps_its_own_quorum(tmp_path: Path) -> None:
    props = _props(server_properties(Settings(), 0, tmp_path))
    assert props["process.roles"] == "broker,controller"
    assert props["controller.quorum.bootstrap.servers"] == "127.0.0.1:9093"
    assert "controller.quorum.voters" not in props
    assert props["listeners"].startswith("PLAINTEXT://127.0.0.1:9092")
    assert props["auto.create.topics.enable"] == "false"


def test_three_brokers_share_a_static_quorum_with_rf_3(tmp_path: Path) -> None:
    props = _props(server_properties(Settings(brokers=3), 2, tmp_path))
    assert props["node.id"] == "3"
    assert props["controller.quorum.voters"] == (
        "1@127.0.0.1:9093,2@127.0.0.1:9095,3@127.0.0.1:9097"
    )
    assert props["default.replication.factor"] == "3"
    assert props["min.insync.replicas"] == "2"


def test_mosquitto_config_requires_client_certificates(tmp_path: Path) -> None:
    files = BrokerFiles(home=tmp_path, pki_dir=tmp_path / "pki")
    lines = render_config(Settings(), files, "fleet").splitlines()
    for expected in (
        "listener 8883 127.0.0.1",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",  # a client's id is its certificate's CN
        "allow_anonymous false",
        "persistence true",
        f"crlfile {files.crl}",
    ):
        assert expected in lines
    assert sum(line.startswith("listener") for line in lines) == 1  # no plain listener


def test_acl_gives_devices_their_own_subtree_and_the_orchestrator_everything() -> None:
    acl = render_acl().splitlines()
    assert "pattern readwrite devices/%u/#" in acl
    orchestrator = acl.index("user orchestrator")
    assert acl[orchestrator + 1] == "topic readwrite #"


def test_each_bridge_replica_has_a_reserved_identity_with_the_orchestrators_topics() -> None:
    acl = render_acl().splitlines()
    orchestrator = acl.index("user orchestrator")
    granted = acl[orchestrator + 1 : orchestrator + 4]
    # As many identities as replicas may run, one per replica, each allowed what the
    # orchestrator is (the client id is the identity: replicas must not share one).
    field = Settings.model_fields["bridge_replicas"]
    assert any(getattr(m, "le", None) == MAX_BRIDGE_REPLICAS for m in field.metadata)
    assert [bridge_identity(i) for i in range(MAX_BRIDGE_REPLICAS)] == list(BRIDGE_IDENTITIES)
    with pytest.raises(ValueError, match="out of range"):
        bridge_identity(MAX_BRIDGE_REPLICAS)
    for name in BRIDGE_IDENTITIES:
        start = acl.index(f"user {name}")
        assert acl[start + 1 : start + 4] == granted
    users = {line.removeprefix("user ") for line in acl if line.startswith("user ")}
    assert users == set(PLATFORM_IDENTITIES)  # nobody else is named
    assert set(PLATFORM_IDENTITIES) <= RESERVED_IDENTITIES


@pytest.mark.parametrize("name", ["bridge-0", "bridge-7", "Bridge-1", "enforcer-2"])
def test_no_device_can_get_a_platform_identity(tmp_path: Path, name: str) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path, passphrase=b"test-passphrase")
    with pytest.raises(PkiError, match="reserved"):
        ca.issue_from_csr(make_csr(generate_private_key("ec"), name), name)


def test_topic_contract_names_and_compaction() -> None:
    by_name = {t.name: t for t in TOPICS}
    contract = {
        "telemetry.raw",
        "device.events",
        "twin.reported",
        "twin.desired",
        "twin.state",
        "alerts",
        "mqtt.downlink",
        "registry.devices",
        "rbac.grants",
        "ota.rollouts",
        "fleet.health",
    }
    assert contract <= set(by_name)
    compacted = {n for n, t in by_name.items() if t.cleanup == "compact"}
    state = {"twin.state", "registry.devices", "rbac.grants", "ota.rollouts"}
    assert compacted == state | {"alerts.rules", "alerts.state", "ota.artifacts", "fleet.health"}
    # Changelogs are co-partitioned with the inputs whose state they keep.
    assert by_name["alerts.state"].partitions == by_name["telemetry.raw"].partitions
    assert by_name["_registry.journal"].partitions == 1
    journal = by_name["_registry.journal"].config(Settings().min_insync_replicas)
    assert journal["retention.ms"] == "-1"


def test_a_pid_record_never_names_a_recycled_pid(tmp_path: Path) -> None:
    path = tmp_path / "svc.pid"
    PidRecord.of(os.getpid()).write(path)
    record = PidRecord.read(path)
    assert record is not None
    assert record.process() is not None
    other_start = dataclasses.replace(record, start_ticks=record.start_ticks - 100)
    other_start.write(path)  # same pid, another process's start
    stale = PidRecord.read(path)
    assert stale is not None
    assert stale.process() is None


def test_a_pid_record_still_names_its_process_after_the_wall_clock_moves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "svc.pid"
    PidRecord.of(os.getpid()).write(path)
    # An adjusted wall clock moves /proc/stat's boot time, and with it psutil's create_time.
    boot = psutil.boot_time()
    monkeypatch.setattr(psutil, "boot_time", lambda: boot + 1.0)
    monkeypatch.setattr(psutil._pslinux, "boot_time", lambda: boot + 1.0)
    record = PidRecord.read(path)
    assert record is not None
    assert record.process() is not None


def test_a_pid_record_of_a_zombie_or_an_exited_process_is_not_alive(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    record = PidRecord.of(child.pid)
    assert wait_until(lambda: not record.alive(), timeout=10)  # exited, not reaped: a zombie
    assert record.process() is None
    child.wait()
    assert not record.alive()  # reaped: no such process
    assert PidRecord.of(os.getpid()).alive()
