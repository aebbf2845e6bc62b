"""The HTTP API on the real stack: tokens, authorization before every call, audit records on
`audit.log`, provisioning through the registry agent, twins through the twin agent.

`fleet up` does not start the API yet: this module starts it as a service (ApiService) and
stops it at the end. Principals, the organization and the devices are new on every run, so a
kept stack (FLEET_TEST_KEEP_STACK) never answers from an earlier one.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer
from cryptography import x509

from infra.api.client import AUDIT, HotPathClient
from infra.keys import key_passphrase, token_authority
from infra.pki import CertificateAuthority, generate_private_key, make_csr
from infra.provision import provision_device, register
from infra.release_key import open_artifact_store
from infra.services.api import ApiService
from infra.services.base import wait_until
from infra.settings import Settings
from infra.stack import Stack
from schemas.codec import Decoded
from streams.registry.devices import AuditRecord
from streams.registry.rbac import GrantSet, Principal, Resource, Role
from streams.registry.tokens import TokenAuthority

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Answer:
    status: int
    body: Any
    headers: dict[str, str]


class Http:
    """A small JSON client for the API (stdlib only)."""

    def __init__(self, base: str) -> None:
        self.base = base

    def __call__(
        self, method: str, path: str, token: str | None = None, body: Any = None
    ) -> Answer:
        data = None if body is None else json.dumps(body).encode()
        return self.raw(method, path, token, data)

    def raw(self, method: str, path: str, token: str | None, data: bytes | None) -> Answer:
        """Send ``data`` as the body, byte for byte (hostile bodies included)."""
        request = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                raw, status, headers = response.read(), response.status, dict(response.headers)
        except urllib.error.HTTPError as error:
            raw, status, headers = error.read(), error.code, dict(error.headers)
        return Answer(status, json.loads(raw) if raw else None, headers)


@dataclass(frozen=True)
class World:
    org: str
    admin: Principal
    operator: Principal  # operator of project pA only
    viewer: Principal  # viewer of the whole organization
    device_a: str  # in pA
    device_b: str  # in pB

    def token(self, tokens: TokenAuthority, principal: Principal) -> str:
        return tokens.issue(principal, ttl_s=600)


@pytest.fixture(scope="module")
def api(stack: Stack) -> ApiService:
    """The API `fleet up` runs (part of the stack)."""
    return stack.api


@pytest.fixture(scope="module")
def http(api: ApiService, settings: Settings) -> Http:
    return Http(f"http://{settings.host}:{settings.api_port}")


@pytest.fixture(scope="module")
def tokens(settings: Settings) -> TokenAuthority:
    return token_authority(settings)  # the key the API verifies with


@pytest.fixture(scope="module")
def client(stack: Stack, settings: Settings) -> Iterator[HotPathClient]:
    hot = HotPathClient(settings)
    yield hot
    hot.close()


@pytest.fixture(scope="module")
def world(
    http: Http,
    client: HotPathClient,
    tokens: TokenAuthority,
    settings: Settings,
    tmp_path_factory: pytest.TempPathFactory,
) -> World:
    run = uuid.uuid4().hex[:8]
    org = f"acme-{run}"
    admin, operator, viewer = (
        Principal.user(f"{role}-{run}") for role in ("admin", "operator", "viewer")
    )
    # Bootstrap: the platform's own identity (the orchestrator, here the test) writes the first
    # grant sets straight to rbac.grants; later changes go through PUT /v1/grants.
    sets = {
        admin: GrantSet.of(admin, (Role.admin, Resource(org))),
        operator: GrantSet.of(operator, (Role.operator, Resource(org, "pA"))),
        viewer: GrantSet.of(viewer, (Role.viewer, Resource(org))),
    }
    for grant_set in sets.values():
        client.put_grants(grant_set)

    def grants_seen() -> bool:
        for principal, grant_set in sets.items():
            own = http("GET", f"/v1/grants/{principal}", tokens.issue(principal))
            if own.status != 200 or len(own.body["grants"]) != len(grant_set.grants):
                return False
        return True

    assert wait_until(grants_seen, timeout=30, interval=0.2), "the API never saw the grants"

    # Two devices, one per project, provisioned by the orchestrator (through the agent).
    ca = CertificateAuthority.load_or_create(settings.pki_dir, passphrase=key_passphrase(settings))
    out = tmp_path_factory.mktemp("api-devices")
    devices = {}
    for project in ("pA", "pB"):
        creds = provision_device(ca, f"api-{project.lower()}-{run}", out, "ec")
        audits = register(client, [creds], org, project, "g1")
        assert audits[creds.device_id].decision == "applied", audits
        devices[project] = creds.device_id
    admin_token = tokens.issue(admin)

    def devices_seen() -> bool:
        return all(
            http("GET", f"/v1/devices/{d}", admin_token).status == 200 for d in devices.values()
        )

    assert wait_until(devices_seen, timeout=30, interval=0.2), "the API never saw the devices"
    return World(org, admin, operator, viewer, devices["pA"], devices["pB"])


def find_audit(settings: Settings, command_id: str, timeout: float = 60.0) -> AuditRecord:
    """The record of `command_id` on audit.log (committed records only)."""
    codec = HotPathClient(settings).codec(AUDIT)
    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": f"test-audit-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    consumer.subscribe([AUDIT])
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=1000, timeout=0.5):
                value = msg.value()
                if msg.error() is not None or value is None:
                    continue
                decoded = codec.decode(value)
                if isinstance(decoded, Decoded) and decoded.record["command_id"] == command_id:
                    return AuditRecord.from_record(decoded.record)
    finally:
        consumer.close()
    raise AssertionError(f"no audit record for {command_id} within {timeout}s")


def csr_pem(device_id: str) -> str:
    return make_csr(generate_private_key("ec"), device_id).decode()


# --------------------------------------------------------------------------- tests


def test_calls_without_a_valid_token_are_401(
    http: Http, tokens: TokenAuthority, tmp_path: Path
) -> None:
    stranger = TokenAuthority.load_or_create(tmp_path / "not-the-platform")
    expired = tokens.issue(Principal.user("someone"), ttl_s=60, now=time.time() - 3600)
    for token in (None, "not-a-jwt", stranger.issue(Principal.user("someone")), expired):
        answer = http("GET", "/v1/devices", token)
        assert answer.status == 401, token
        assert answer.body["error"] == "unauthorized"
        assert answer.body["reason"]
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")


def test_the_openapi_document_is_served_and_lists_the_routes(http: Http) -> None:
    answer = http("GET", "/openapi.json")
    assert answer.status == 200
    document = answer.body
    assert document["openapi"].startswith("3.1")
    assert document["components"]["securitySchemes"]["bearerAuth"]["bearerFormat"] == "JWT"
    assert "Error" in document["components"]["schemas"]
    routes = {(method.upper(), path) for path, ops in document["paths"].items() for method in ops}
    assert {
        ("GET", "/v1/devices"),
        ("POST", "/v1/devices"),
        ("GET", "/v1/devices/{device_id}"),
        ("PATCH", "/v1/devices/{device_id}"),
        ("POST", "/v1/devices/{device_id}/suspend"),
        ("POST", "/v1/devices/{device_id}/revoke"),
        ("POST", "/v1/devices/{device_id}/activate"),
        ("GET", "/v1/devices/{device_id}/twin"),
        ("PATCH", "/v1/devices/{device_id}/twin"),
        ("GET", "/v1/grants/{principal}"),
        ("PUT", "/v1/grants/{principal}"),
    } <= routes
    assert http("GET", "/healthz").body["ready"] is True


def test_an_operator_of_project_a_gets_403_on_project_b(
    http: Http, world: World, tokens: TokenAuthority, settings: Settings
) -> None:
    token = world.token(tokens, world.operator)
    own = http("GET", f"/v1/devices/{world.device_a}", token)
    assert own.status == 200
    assert own.body["project"] == "pA"
    other = http("GET", f"/v1/devices/{world.device_b}", token)
    assert other.status == 403
    assert other.body["error"] == "forbidden"
    assert "no grant covers device.read" in other.body["reason"]
    listed = http("GET", f"/v1/devices?org={world.org}", token)
    assert [d["device_id"] for d in listed.body["devices"]] == [world.device_a]
    # A change on B is refused by the API before any command; on A the agent applies it.
    refused = http("POST", f"/v1/devices/{world.device_b}/suspend", token, {"reason": "test"})
    assert refused.status == 403
    suspended = http("POST", f"/v1/devices/{world.device_a}/suspend", token, {"reason": "test"})
    assert suspended.status == 200, suspended.body
    assert suspended.body["device"]["status"] == "suspended"

    # Each decision left its audit record.
    read_denied = find_audit(settings, other.body["command_id"])
    assert (read_denied.principal, read_denied.action) == (str(world.operator), "device.read")
    assert read_denied.decision == "denied"
    assert read_denied.resource == f"org/{world.org}/project/pB/group/g1/device/{world.device_b}"
    suspend_denied = find_audit(settings, refused.body["command_id"])
    assert (suspend_denied.action, suspend_denied.decision) == ("device.suspend", "denied")
    applied = find_audit(settings, suspended.body["audit"]["command_id"])  # the agent's
    assert (applied.action, applied.decision) == ("device.suspend", "applied")
    assert applied.principal == str(world.operator)


def test_a_viewer_cannot_provision_and_the_refusal_is_audited(
    http: Http, world: World, tokens: TokenAuthority, settings: Settings
) -> None:
    device_id = f"g1-{uuid.uuid4().hex[:10]}"
    answer = http(
        "POST",
        "/v1/devices",
        world.token(tokens, world.viewer),
        {"org": world.org, "project": "pA", "group": "g1", "csr_pem": csr_pem(device_id)},
    )
    assert answer.status == 403
    assert answer.body["error"] == "forbidden"
    audit = find_audit(settings, answer.body["command_id"])
    assert audit.decision == "denied"
    assert audit.principal == str(world.viewer)
    assert audit.action == "device.provision"
    assert audit.resource == f"org/{world.org}/project/pA/group/g1"
    admin = world.token(tokens, world.admin)
    assert http("GET", f"/v1/devices/{device_id}", admin).status == 404


def test_an_admin_provisions_a_device_from_its_csr(
    http: Http, world: World, tokens: TokenAuthority, settings: Settings
) -> None:
    device_id = f"g1-{uuid.uuid4().hex[:10]}"
    token = world.token(tokens, world.admin)
    answer = http(
        "POST",
        "/v1/devices",
        token,
        {
            "org": world.org,
            "project": "pA",
            "group": "g1",
            "device_id": device_id,
            "csr_pem": csr_pem(device_id),
            "firmware_version": "1.2.3",
        },
    )
    assert answer.status == 201, answer.body
    assert answer.body["device_id"] == device_id
    cert = x509.load_pem_x509_certificate(answer.body["certificate_pem"].encode())
    ca = CertificateAuthority.load_or_create(settings.pki_dir, passphrase=key_passphrase(settings))
    assert ca.verify_chain(cert)
    assert not ca.is_revoked(cert.serial_number)
    assert answer.body["ca_pem"] == ca.cert_pem.decode()
    assert answer.body["audit"]["decision"] == "applied"
    assert find_audit(settings, answer.body["audit"]["command_id"]).decision == "applied"
    # Read-your-writes: the answer came once the API's own table had the device.
    listed = http("GET", f"/v1/devices?org={world.org}&project=pA", token)
    entry = next(d for d in listed.body["devices"] if d["device_id"] == device_id)
    assert (entry["status"], entry["cert_serial"]) == ("provisioned", str(cert.serial_number))
    assert entry["firmware_version"] == "1.2.3"
    # The same id again: refused before any certificate is signed.
    again = http(
        "POST",
        "/v1/devices",
        token,
        {"org": world.org, "project": "pA", "group": "g1", "csr_pem": csr_pem(device_id)},
    )
    assert again.status == 409


def test_a_stale_twin_version_is_a_409(
    http: Http, world: World, tokens: TokenAuthority, settings: Settings
) -> None:
    path = f"/v1/devices/{world.device_a}/twin"
    token = world.token(tokens, world.operator)
    before = http("GET", path, token)
    assert before.status == 200
    version = before.body["version"]
    first = http("PATCH", path, token, {"desired": {"led": "blue"}, "version": version})
    assert first.status == 200, first.body
    assert (first.body["status"], first.body["version"]) == ("accepted", version + 1)
    assert first.body["twin"]["desired"]["led"] == "blue"
    stale = http("PATCH", path, token, {"desired": {"led": "red"}, "version": version})
    assert stale.status == 409
    assert stale.body["error"] == "conflict"
    assert find_audit(settings, stale.body["command_id"]).decision == "refused"
    after = http("GET", path, token)
    assert after.body["desired"]["led"] == "blue"
    assert after.body["version"] == version + 1
    viewer = http("PATCH", path, world.token(tokens, world.viewer), {"desired": {"led": "x"}})
    assert viewer.status == 403


def test_grants_are_changed_through_the_api_and_apply_at_once(
    http: Http, world: World, tokens: TokenAuthority, settings: Settings
) -> None:
    newcomer = Principal.user(f"new-{uuid.uuid4().hex[:8]}")
    token = tokens.issue(newcomer)
    # No grant anywhere in the organization: its devices are not even said to exist.
    assert http("GET", f"/v1/devices/{world.device_b}", token).status == 404
    body = {"grants": [{"role": "viewer", "scope": f"org/{world.org}/project/pB"}]}
    by_operator = http("PUT", f"/v1/grants/{newcomer}", world.token(tokens, world.operator), body)
    assert by_operator.status == 403
    put = http("PUT", f"/v1/grants/{newcomer}", world.token(tokens, world.admin), body)
    assert put.status == 200, put.body
    assert put.body["grants"] == body["grants"]
    audit = find_audit(settings, put.body["audit"]["command_id"])
    assert (audit.action, audit.decision) == ("grant.write", "applied")
    # The answer came once the API's grants table had the change: it applies at once.
    assert http("GET", f"/v1/devices/{world.device_b}", token).status == 200
    assert http("GET", f"/v1/devices/{world.device_a}", token).status == 403


def test_alert_rules_and_ota_rollouts_go_through_the_api(
    http: Http,
    world: World,
    tokens: TokenAuthority,
    settings: Settings,
    client: HotPathClient,
    tmp_path: Path,
) -> None:
    operator = world.token(tokens, world.operator)
    group_a = f"org/{world.org}/project/pA/group/g1"
    group_b = f"org/{world.org}/project/pB/group/g1"
    rule_id = f"api-hot-{world.org}"
    rule = {
        "scope_type": "group",
        "scope": group_a,
        "metric": "temperature",
        "kind": "above",
        "threshold": 80.0,
        "clear_threshold": 75.0,
        "severity": "critical",
    }
    stored = http("PUT", f"/v1/alert-rules/{rule_id}", operator, rule)
    assert stored.status == 200, stored.body
    # On the real alerts.rules topic, which the hot worker evaluates.
    assert client.rules()[rule_id].scope == group_a
    audit = find_audit(settings, stored.body["audit"]["command_id"])
    assert (audit.action, audit.decision, audit.resource) == ("alert.write", "applied", group_a)
    refused = http("PUT", f"/v1/alert-rules/{rule_id}-b", operator, {**rule, "scope": group_b})
    assert refused.status == 403
    assert find_audit(settings, refused.body["command_id"]).decision == "denied"
    assert f"{rule_id}-b" not in client.rules()

    # An OTA rollout: created by the operator, pending until an ota-approver approves.
    store = open_artifact_store(
        settings.state_dir / "artifacts", settings.pki_dir, passphrase=key_passphrase(settings)
    )
    firmware = tmp_path / "fw.bin"
    firmware.write_bytes(uuid.uuid4().bytes * 64)
    artifact = store.add(firmware, "firmware", f"9.{uuid.uuid4().int % 1000}.0")
    client.put_artifact(artifact)
    answers: list[Answer] = []

    def created() -> bool:  # 409 (unknown artifact) until the controller has read it
        body = {"artifact_id": artifact.artifact_id, "target": group_a}
        answers.append(http("POST", "/v1/ota/rollouts", operator, body))
        return answers[-1].status != 409

    assert wait_until(created, timeout=60, interval=0.5), answers[-1].body
    answer = answers[-1]
    assert answer.status == 201, answer.body
    assert answer.body["rollout"]["state"] == "pending_approval"
    rollout_id = answer.body["rollout_id"]
    assert http("POST", f"/v1/ota/rollouts/{rollout_id}/approve", operator).status == 403

    approver = Principal.user(f"approver-{world.org}")
    client.put_grants(GrantSet.of(approver, (Role.ota_approver, Resource(world.org, "pA"))))
    approvals: list[Answer] = []

    def approved() -> bool:
        # Until the grant reached the API: 404 (no grant in the organization yet: the rollout
        # is not even said to exist); until it reached the controller: 403.
        path = f"/v1/ota/rollouts/{rollout_id}/approve"
        approvals.append(http("POST", path, world.token(tokens, approver), {"comment": "ok"}))
        return approvals[-1].status not in (403, 404)

    assert wait_until(approved, timeout=60, interval=0.5), approvals[-1].body
    assert approvals[-1].status == 200, approvals[-1].body
    assert approvals[-1].body["audit"]["decision"] == "applied"
    aborted = http("POST", f"/v1/ota/rollouts/{rollout_id}/abort", operator, {"comment": "test"})
    assert aborted.status == 200, aborted.body

    def ended() -> bool:
        seen = http("GET", f"/v1/ota/rollouts/{rollout_id}", world.token(tokens, world.viewer))
        return seen.status == 200 and seen.body["state"] == "aborted"

    assert wait_until(ended, timeout=30, interval=0.2)


def test_a_deeply_nested_or_non_utf8_body_is_a_400_and_the_api_keeps_serving(
    http: Http, world: World, tokens: TokenAuthority
) -> None:
    admin = world.token(tokens, world.admin)
    twin = f"/v1/devices/{world.device_a}/twin"
    deep = ('{"desired": ' + '{"a": ' * 5000 + "1" + "}" * 5001).encode()
    answer = http.raw("PATCH", twin, admin, deep)
    assert answer.status == 400, answer.body
    assert "nested deeper than" in answer.body["reason"]
    for method, path in (
        ("POST", "/v1/devices"),
        ("POST", "/v1/ota/rollouts"),
        ("PUT", "/v1/alert-rules/r-utf8"),
        ("PATCH", twin),
    ):
        bad = http.raw(method, path, admin, b'{"org": "\xff\xfe"}')
        assert bad.status == 400, (method, path, bad.body)
        assert bad.body["error"] == "bad_request"
        assert "UTF-8" in bad.body["reason"]
    fine = http("PATCH", twin, admin, {"desired": {"note": "[" * 100}})
    assert fine.status == 200, fine.body
