"""Broker enforcement from the registry: the pure plan, CRL holds, the broker's generated config."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pytest
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st

from infra.pki import HOLD_REASON, CertificateAuthority, PkiError
from infra.services.mosquitto import (
    BrokerFiles,
    ensure_broker_identities,
    render_acl,
    render_config,
    render_dynsec_config,
)
from infra.settings import Settings
from ingest.enforcement import (
    EnforcementError,
    EnforcerConfig,
    Plan,
    SessionEnder,
    Verdict,
    denied_devices,
    kick_commands,
    kicked,
    parse_serial,
    plan,
    verdict,
)
from ingest.mqtt_client import DYNSEC_RESPONSE_TOPIC, DYNSEC_TOPIC, claim_identity
from schemas.identity import ENFORCER_IDENTITIES, RevocationState
from streams.registry.devices import DeviceRecord, DeviceStatus
from tests.support.records import device_record

REVOKED, HOLD = RevocationState.revoked, RevocationState.on_hold


def device(device_id: str, status: str, serial: int | str) -> DeviceRecord:
    return device_record(device_id, status=DeviceStatus(status), cert_serial=str(serial))


def registry(*records: DeviceRecord) -> dict[str, DeviceRecord]:
    return {r.device_id: r for r in records}


# --------------------------------------------------------------------------- verdicts and plan


def test_statuses_map_to_verdicts() -> None:
    assert verdict(DeviceStatus.provisioned) is Verdict.allow
    assert verdict(DeviceStatus.active) is Verdict.allow
    assert verdict(DeviceStatus.suspended) is Verdict.hold
    assert verdict(DeviceStatus.revoked) is Verdict.revoke


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", 1),
        ("340282366920938463463374607431768211455", 2**128 - 1),
        ("0", None),
        ("012", None),
        ("-5", None),
        ("", None),
        ("12a", None),
        ("١٢", None),  # Arabic-Indic digits: isdigit() but not a decimal serial
        (str(2**160), None),
    ],
)
def test_parse_serial(text: str, expected: int | None) -> None:
    assert parse_serial(text) == expected


def test_an_allowed_device_needs_nothing() -> None:
    devices = registry(device("a", "active", 11), device("p", "provisioned", 12))
    assert plan(devices, {}) == Plan()
    assert plan(devices, {}).empty


def test_a_revoked_device_is_revoked_and_its_sessions_end() -> None:
    result = plan(registry(device("a", "revoked", 11)), {})
    assert result.revoke == {11}
    assert not result.hold
    assert not result.release
    assert result.end_sessions == ("a",)


def test_a_suspended_device_is_held_and_its_sessions_end() -> None:
    result = plan(registry(device("a", "suspended", 11)), {})
    assert result.hold == {11}
    assert not result.revoke
    assert result.end_sessions == ("a",)


def test_once_listed_and_ended_nothing_more_is_done() -> None:
    devices = registry(device("r", "revoked", 1), device("s", "suspended", 2))
    assert plan(devices, {1: REVOKED, 2: HOLD}, ended={"r", "s"}).empty


def test_after_a_restart_refused_devices_are_kicked_again() -> None:
    # The CRL already refuses them, but nobody remembers ending their sessions.
    result = plan(registry(device("r", "revoked", 1)), {1: REVOKED})
    assert not result.crl_changes
    assert result.end_sessions == ("r",)


def test_a_reinstated_device_is_released_and_not_kicked() -> None:
    devices = registry(device("a", "active", 11))
    result = plan(devices, {11: HOLD}, ended={"a"})
    assert result.release == {11}
    assert result.end_sessions == ()
    assert denied_devices(devices) == frozenset()  # the runner forgets it was ended


def test_a_held_serial_is_upgraded_when_the_device_is_revoked() -> None:
    result = plan(registry(device("a", "revoked", 11)), {11: HOLD}, ended={"a"})
    assert result.revoke == {11}
    assert result.end_sessions == ()  # already refused and kicked while suspended


def test_a_suspended_device_keeps_a_permanent_revocation() -> None:
    assert plan(registry(device("a", "suspended", 11)), {11: REVOKED}, ended={"a"}).empty


def test_a_revocation_is_never_released() -> None:
    result = plan(registry(device("a", "active", 11)), {11: REVOKED})
    assert not result.release
    assert result.stuck == ("a",)


def test_serials_the_registry_does_not_name_are_left_alone() -> None:
    result = plan(registry(device("a", "active", 11)), {99: HOLD, 98: REVOKED})
    assert result == Plan()


def test_a_shared_serial_takes_the_strictest_verdict() -> None:
    devices = registry(device("a", "active", 5), device("b", "suspended", 5))
    assert plan(devices, {}).hold == {5}
    devices = registry(device("a", "suspended", 5), device("b", "revoked", 5))
    assert plan(devices, {}).revoke == {5}
    assert plan(devices, {5: HOLD}).release == frozenset()


def test_a_bad_serial_still_ends_the_session_and_is_reported() -> None:
    result = plan(registry(device("a", "suspended", "12x")), {})
    assert not result.crl_changes
    assert result.end_sessions == ("a",)
    assert [device_id for device_id, _ in result.invalid] == ["a"]


@pytest.mark.parametrize(
    "name", ["orchestrator", "Enforcer", "enforcer-1", "broker", "bridge-0", "Bridge-7", "bad/id"]
)
def test_platform_identities_and_bad_ids_are_never_kicked(name: str) -> None:
    result = plan({name: device(name, "revoked", 7)}, {})
    assert result.empty
    assert [device_id for device_id, _ in result.invalid] == [name]


def test_a_record_under_another_key_is_ignored() -> None:
    result = plan({"a": device("b", "revoked", 7)}, {})
    assert result.empty
    assert result.invalid[0][0] == "a"
    assert denied_devices({"a": device("b", "revoked", 7)}) == frozenset()


def test_sessions_to_end_are_sorted_and_skip_those_already_ended() -> None:
    devices = registry(
        device("c", "revoked", 3), device("a", "suspended", 1), device("b", "revoked", 2)
    )
    assert plan(devices, {}, ended={"b"}).end_sessions == ("a", "c")


def _apply(crl: Mapping[int, RevocationState], result: Plan) -> dict[int, RevocationState]:
    """What CertificateAuthority.update_revocations does to the CRL, as a dict."""
    out = dict(crl)
    for serial in result.revoke:
        out[serial] = REVOKED
    for serial in result.hold:
        out.setdefault(serial, HOLD)
    for serial in result.release:
        if out.get(serial) is HOLD:
            del out[serial]
    return out


_statuses = st.sampled_from(list(DeviceStatus))
_serials = st.integers(min_value=1, max_value=6)


@settings(max_examples=300, deadline=None)
@given(
    records=st.dictionaries(
        st.sampled_from(["d1", "d2", "d3", "d4"]), st.tuples(_statuses, _serials), max_size=4
    ),
    crl=st.dictionaries(_serials, st.sampled_from(list(RevocationState)), max_size=6),
)
def test_one_plan_brings_the_crl_in_line_and_a_second_finds_nothing(
    records: dict[str, tuple[DeviceStatus, int]], crl: dict[int, RevocationState]
) -> None:
    devices = {d: device(d, status, serial) for d, (status, serial) in records.items()}
    first = plan(devices, crl)
    after = _apply(crl, first)
    second = plan(devices, after, ended=set(first.end_sessions))
    assert second.empty
    # Revocations are never undone, and every refused device is refused by the CRL.
    assert all(after.get(s) is REVOKED for s, state in crl.items() if state is REVOKED)
    for device_id, (status, serial) in records.items():
        if status is DeviceStatus.revoked:
            assert after[serial] is REVOKED
        elif status is DeviceStatus.suspended:
            assert serial in after
        if status in (DeviceStatus.revoked, DeviceStatus.suspended):
            assert device_id in first.end_sessions
    # A hold survives only if some device with that serial is still refused.
    refused = {serial for status, serial in records.values() if verdict(status) > Verdict.allow}
    named = {serial for _, serial in records.values()}
    for serial, state in after.items():
        if state is HOLD and serial in named:
            assert serial in refused


# --------------------------------------------------------------------------- kick commands


def test_kick_commands_create_then_delete_each_device() -> None:
    commands = kick_commands(["a", "b"], "batch1")
    assert [(c["command"], c["username"]) for c in commands] == [
        ("createClient", "a"),
        ("deleteClient", "a"),
        ("createClient", "b"),
        ("deleteClient", "b"),
    ]
    assert {c["correlationData"] for c in commands} == {"batch1:0", "batch1:1"}


def test_kicked_reads_the_delete_answers_of_its_batch_only() -> None:
    responses = [
        {"command": "createClient", "correlationData": "b1:0", "error": "Client already exists"},
        {"command": "deleteClient", "correlationData": "b1:0"},
        {"command": "createClient", "correlationData": "b1:1"},
        {"command": "deleteClient", "correlationData": "b1:1", "error": "Internal error"},
        {"command": "deleteClient", "correlationData": "other:2"},
    ]
    assert kicked(["a", "b", "c"], "b1", responses) == {
        "a": None,
        "b": "Internal error",
        "c": "no answer",
    }


# --------------------------------------------------------------------------- CRL holds


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(
        tmp_path_factory.mktemp("ca"), passphrase=b"test-passphrase"
    )


def _crl_reason(ca: CertificateAuthority, serial: int) -> x509.ReasonFlags | None:
    entry = ca.crl().get_revoked_certificate_by_serial_number(serial)
    assert entry is not None
    try:
        return entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        return None


def test_hold_lists_the_serial_as_certificate_hold_and_release_lifts_it(
    ca: CertificateAuthority,
) -> None:
    ca.hold(1001)
    assert ca.is_on_hold(1001)
    assert not ca.is_revoked(1001)  # still the device's identity: no replacement is due
    assert ca.revocation_states()[1001] is HOLD
    assert _crl_reason(ca, 1001) is x509.ReasonFlags.certificate_hold  # the broker refuses it
    assert ca.release(1001)
    assert not ca.is_on_hold(1001)
    assert 1001 not in ca.revocation_states()
    assert ca.crl().get_revoked_certificate_by_serial_number(1001) is None
    assert not ca.release(1001)  # not listed any more


def test_a_held_serial_can_be_revoked_for_good_but_a_revoked_one_never_released(
    ca: CertificateAuthority,
) -> None:
    ca.hold(1002)
    ca.revoke(1002, reason="keyCompromise")
    assert ca.revocation_states()[1002] is REVOKED
    assert _crl_reason(ca, 1002) is x509.ReasonFlags.key_compromise
    with pytest.raises(PkiError):
        ca.release(1002)
    ca.hold(1002)  # a hold never downgrades a revocation
    assert ca.revocation_states()[1002] is REVOKED
    assert not ca.update_revocations(release=[1002])
    assert ca.is_revoked(1002)


def test_free_text_reasons_leave_the_crl_reason_unspecified(ca: CertificateAuthority) -> None:
    ca.revoke(1003, reason="registry: device revoked")
    assert _crl_reason(ca, 1003) is None
    with pytest.raises(PkiError):
        ca.revoke(1004, reason=HOLD_REASON)


def test_update_revocations_batches_and_reports_changes(ca: CertificateAuthority) -> None:
    assert ca.update_revocations(revoke=[1010], hold=[1011, 1010], release=[1012])
    states = ca.revocation_states()
    assert states[1010] is REVOKED  # revoke wins over hold in one call
    assert states[1011] is HOLD
    assert 1012 not in states
    assert not ca.update_revocations(revoke=[1010], hold=[1011])  # nothing new
    crl = ca.crl()
    assert [r.serial_number for r in crl].count(1010) == 1
    # revoked.json keeps holds as a reason, readable by a fresh load.
    reloaded = CertificateAuthority.load_or_create(ca.directory, passphrase=b"test-passphrase")
    assert reloaded.revocation_states()[1011] is HOLD
    entries = json.loads((ca.directory / "revoked.json").read_text())
    assert [e["reason"] for e in entries if e["serial"] == 1011] == [HOLD_REASON]


@pytest.mark.parametrize("serial", [0, -1, True])
def test_invalid_serials_are_refused(ca: CertificateAuthority, serial: int) -> None:
    with pytest.raises(PkiError):
        ca.hold(serial)


# --------------------------------------------------------------------------- broker config


def test_only_the_enforcers_reach_the_control_topic() -> None:
    acl = render_acl().splitlines()
    orchestrator = acl.index("user orchestrator")
    assert acl[orchestrator + 1] == "topic readwrite #"  # unchanged
    bridge = acl.index("user bridge-0")
    assert acl[bridge + 1] == "topic readwrite #"  # what the orchestrator has
    for name in ENFORCER_IDENTITIES:
        enforcer = acl.index(f"user {name}")
        assert acl[enforcer + 1 : enforcer + 3] == [
            f"topic write {DYNSEC_TOPIC}",
            f"topic read {DYNSEC_RESPONSE_TOPIC}",
        ]
    control = [line for line in acl if "$CONTROL" in line]
    assert len(control) == 2 * len(ENFORCER_IDENTITIES)  # nobody else, and no pattern names it
    assert "pattern readwrite devices/%u/#" in acl


def test_the_broker_loads_the_plugin_with_an_empty_configuration(tmp_path: Path) -> None:
    files = BrokerFiles(home=tmp_path, pki_dir=tmp_path / "pki")
    plugin = Path("/opt/mosquitto/mosquitto_dynamic_security.so")
    lines = render_config(Settings(), files, "fleet", plugin).splitlines()
    assert f"plugin {plugin}" in lines
    assert f"plugin_opt_config_file {files.dynsec_config}" in lines
    assert "use_identity_as_username true" in lines  # the plugin never authenticates
    assert "use_username_as_clientid true" in lines  # no takeover of another identity's id
    config = json.loads(render_dynsec_config())
    assert config["clients"] == config["groups"] == config["roles"] == []
    assert not any(config["defaultACLAccess"].values())


def test_concurrent_enforcers_hold_distinct_identities(tmp_path: Path) -> None:
    # The broker makes the certificate identity the client id: two enforcers sharing one would
    # take each other's connection over, so each claims its own until it closes.
    files = BrokerFiles(home=tmp_path / "mosquitto", pki_dir=tmp_path / "pki")
    ensure_broker_identities(
        CertificateAuthority.load_or_create(files.pki_dir, passphrase=b"test-passphrase"), files
    )
    stack = Settings(state_dir=tmp_path)
    config = EnforcerConfig(
        host=stack.host,
        mqtt_port=stack.mqtt_port,
        registry_url=stack.registry_url,
        run_dir=stack.run_dir,
        identities=files.identities,
        crl_validity_days=30,
    )
    first, second = SessionEnder(config), SessionEnder(config)
    assert (first.client_id, second.client_id) == ENFORCER_IDENTITIES[:2]
    first.close()
    third = SessionEnder(config)  # the released identity is free again
    assert third.client_id == ENFORCER_IDENTITIES[0]
    held = [claim_identity(files.identities, ENFORCER_IDENTITIES) for _ in ENFORCER_IDENTITIES[2:]]
    assert all(held)
    with pytest.raises(EnforcementError, match="held by running enforcers"):
        SessionEnder(config)
    for claim in held:
        assert claim is not None
        claim.release()
    second.close()
    third.close()
