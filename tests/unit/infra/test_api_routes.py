"""The HTTP API's routes (infra/api/) on an in-memory backend: authentication, the
authorization before each call, the status codes, audit records and the OpenAPI document.

The fake backend applies registry commands with the registry's own pure core
(`streams.registry.apply`) and desired patches with the twin's (`streams.hot.twin.apply_desired`),
so decisions are the ones the agents would take; the CA is a real one in a temp folder.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer
from cryptography import x509

from infra.api.app import create_app
from infra.api.client import TwinAnswer
from infra.api.models import MAX_JSON_DEPTH
from infra.api.openapi import openapi_document
from infra.api.routes import ROUTES
from infra.pki import CertificateAuthority, generate_private_key, make_csr
from streams.hot.alerts import AlertRule, RuleKind, ScopeType
from streams.hot.twin import Accepted, Twin, TwinDocumentError, apply_desired
from streams.ota.events import OtaRequest
from streams.ota.job import request_event
from streams.ota.model import Rollout
from streams.ota.rollout import step
from streams.registry.devices import (
    Applied,
    AuditRecord,
    DeviceRecord,
    DeviceStatus,
    ProvisionDevice,
    RegistryCommand,
    apply,
)
from streams.registry.rbac import Grant, GrantSet, Principal, Resource, Role
from streams.registry.tokens import TokenAuthority
from tests.unit.streams.ota.test_ota import ARTIFACT

ACME = Resource("acme")
PA, PB = Resource("acme", "pA"), Resource("acme", "pB")
ADMIN, OPERATOR, VIEWER = Principal.user("admin"), Principal.user("op"), Principal.user("viewer")


class FakeBackend:
    def __init__(self, ca: CertificateAuthority) -> None:
        self.ca = ca
        self.grant_sets: dict[str, GrantSet] = {}
        self.agent_grants: dict[str, GrantSet] | None = None  # the agent's view, if it differs
        self.records: dict[str, DeviceRecord] = {}
        self.twins: dict[str, Twin] = {}
        self.audits: list[AuditRecord] = []
        self.issued: list[int] = []
        self.revoked: list[int] = []
        self.commands: list[RegistryCommand] = []
        self.rule_table: dict[str, AlertRule] = {}
        self.rollout_table: dict[str, Rollout] = {}
        self.ota_requests: list[dict[str, object]] = []

    @property
    def ca_pem(self) -> bytes:
        return self.ca.cert_pem

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def ready(self) -> bool:
        return True

    def sizes(self) -> dict[str, int]:
        return {"devices": len(self.records)}

    def grants(self) -> Mapping[str, GrantSet]:
        return dict(self.grant_sets)

    def device(self, device_id: str) -> DeviceRecord | None:
        return self.records.get(device_id)

    def devices(self) -> list[DeviceRecord]:
        return list(self.records.values())

    def twin(self, device_id: str) -> Twin | None:
        return self.twins.get(device_id)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        return predicate()

    def issue_certificate(self, csr_pem: bytes, device_id: str) -> x509.Certificate:
        cert = self.ca.issue_from_csr(csr_pem, device_id)
        self.issued.append(cert.serial_number)
        return cert

    def revoke_certificate(self, serial: int, reason: str) -> None:
        self.ca.revoke(serial, reason)
        self.revoked.append(serial)

    def registry_commands(self, commands: Sequence[RegistryCommand]) -> dict[str, AuditRecord]:
        out = {}
        grants = self.grant_sets if self.agent_grants is None else self.agent_grants
        for command in commands:
            self.commands.append(command)
            result = apply(command, self.records.get(command.device_id), grants, now_ms())
            if isinstance(result, Applied):
                self.records[command.device_id] = result.record
            self.audits.append(result.audit)
            out[command.command_id] = result.audit
        return out

    def set_desired(
        self, device_id: str, patch: Mapping[str, Any], version: int | None, principal: str
    ) -> TwinAnswer:
        twin = self.twins.get(device_id, Twin(device_id))
        try:
            result = apply_desired(twin, patch, version, now_ms())
        except TwinDocumentError as exc:
            return TwinAnswer("invalid", twin.version, str(exc))
        if not isinstance(result, Accepted):
            return TwinAnswer("conflict", twin.version, "stale version")
        self.twins[device_id] = result.twin
        status = "accepted" if result.changed else "unchanged"
        return TwinAnswer(status, result.twin.version, None)

    def put_grants(self, grants: GrantSet, audit: AuditRecord) -> None:
        self.grant_sets[grants.principal.key] = grants
        self.audits.append(audit)

    def write_audit(self, record: AuditRecord) -> None:
        self.audits.append(record)

    def rules(self) -> Mapping[str, AlertRule]:
        return dict(self.rule_table)

    def put_rule(self, rule_id: str, rule: AlertRule | None, audit: AuditRecord) -> None:
        if rule is None:
            self.rule_table.pop(rule_id, None)
        else:
            self.rule_table[rule_id] = rule
        self.audits.append(audit)

    def rollouts(self) -> Mapping[str, Rollout]:
        return dict(self.rollout_table)

    def ota_request(self, request: OtaRequest, principal: Principal) -> AuditRecord:
        """The controller's own pure state machine decides, as the OTA worker would."""
        record = request.to_record(f"req-{len(self.ota_requests)}", principal, 0)
        self.ota_requests.append(record)
        event = request_event(record, {ARTIFACT.artifact_id: ARTIFACT})
        assert not isinstance(event, str), event
        result = step(
            self.rollout_table.get(request.rollout_id),
            event,
            now_ms=now_ms(),
            grants=self.grant_sets,
            devices=self.records,
        )
        if result.rollout is not None:
            self.rollout_table[request.rollout_id] = result.rollout
        self.audits.extend(result.audits)
        return next(a for a in result.audits if a.command_id == record["request_id"])


def now_ms() -> int:
    return int(time.time() * 1000)


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "pki", passphrase=b"test-passphrase")


@pytest.fixture
def tokens(tmp_path: Path) -> TokenAuthority:
    return TokenAuthority.load_or_create(tmp_path / "pki" / "api")


@pytest.fixture
def backend(ca: CertificateAuthority) -> FakeBackend:
    fake = FakeBackend(ca)
    for principal, role, scope in (
        (ADMIN, Role.admin, ACME),
        (OPERATOR, Role.operator, PA),
        (VIEWER, Role.viewer, ACME),
    ):
        fake.grant_sets[principal.key] = GrantSet.of(principal, (role, scope))
    for device_id, project in (("a-1", "pA"), ("b-1", "pB")):
        command = ProvisionDevice(
            command_id=f"seed-{device_id}",
            principal=Principal.orchestrator(),
            device_id=device_id,
            org="acme",
            project=project,
            group="g",
            region="local",
            cert_serial="1",
            cert_fingerprint="0" * 64,
        )
        fake.registry_commands([command])
    fake.audits.clear()
    return fake


Scenario = Callable[[TestClient[Any, Any]], Awaitable[None]]


def run(backend: FakeBackend, tokens: TokenAuthority, scenario: Scenario) -> None:
    async def main() -> None:
        async with TestClient(TestServer(create_app(backend, tokens))) as client:
            await scenario(client)

    asyncio.run(main())


def bearer(tokens: TokenAuthority, principal: Principal) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens.issue(principal)}"}


def csr_for(device_id: str) -> str:
    return make_csr(generate_private_key("ec"), device_id).decode()


async def provision(
    client: TestClient[Any, Any], headers: dict[str, str], device_id: str
) -> ClientResponse:
    """POST /v1/devices: a device of acme/pA/g, from a CSR for `device_id`."""
    request = {"org": "acme", "project": "pA", "group": "g", "csr_pem": csr_for(device_id)}
    return await client.post("/v1/devices", headers=headers, json=request)


# --------------------------------------------------------------------------- the document


def test_the_openapi_document_describes_every_route(
    backend: FakeBackend, tokens: TokenAuthority
) -> None:
    document = openapi_document()
    assert document["openapi"].startswith("3.1")
    scheme = document["components"]["securitySchemes"]["bearerAuth"]
    assert scheme == {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
    assert "Error" in document["components"]["schemas"]
    documented = {(m.upper(), p) for p, ops in document["paths"].items() for m in ops}
    assert documented == {(r.method, r.path) for r in ROUTES}
    for route in ROUTES:
        op = document["paths"][route.path][route.method.lower()]
        if route.public:
            assert op["security"] == []
        else:
            assert {"401", "403"} <= set(op["responses"])
            assert op["x-fleetstream-action"] == str(route.action)
    # Every $ref points at a schema that exists.
    schemas = document["components"]["schemas"]

    def refs(node: object) -> list[str]:
        if isinstance(node, dict):
            found = [node["$ref"]] if "$ref" in node else []
            return found + [r for v in node.values() for r in refs(v)]
        if isinstance(node, list):
            return [r for v in node for r in refs(v)]
        return []

    for ref in refs(document):
        assert ref.removeprefix("#/components/schemas/") in schemas

    async def scenario(client: TestClient[Any, Any]) -> None:
        served = await client.get("/openapi.json")  # no token needed
        assert served.status == 200
        assert await served.json() == document
        registered = {
            (r.method, r.resource.canonical)
            for r in client.app.router.routes()
            if r.resource is not None and r.method != "HEAD"
        }
        assert registered == documented
        health = await client.get("/healthz")
        assert health.status == 200
        assert (await health.json())["ready"] is True

    run(backend, tokens, scenario)


# --------------------------------------------------------------------------- authentication


def test_no_token_or_a_bad_one_is_a_401_with_a_json_error(
    backend: FakeBackend, tokens: TokenAuthority, tmp_path: Path
) -> None:
    other = TokenAuthority.load_or_create(tmp_path / "elsewhere")
    expired = tokens.issue(ADMIN, ttl_s=60, now=time.time() - 3600)

    async def scenario(client: TestClient[Any, Any]) -> None:
        for headers in (
            {},
            {"Authorization": "Basic YWRtaW46YWRtaW4="},
            {"Authorization": "Bearer "},
            {"Authorization": "Bearer garbage"},
            {"Authorization": f"Bearer {other.issue(ADMIN)}"},
            {"Authorization": f"Bearer {expired}"},
        ):
            answer = await client.get("/v1/devices", headers=headers)
            assert answer.status == 401, headers
            body = await answer.json()
            assert body["error"] == "unauthorized"
            assert body["reason"]
            assert answer.headers["WWW-Authenticate"].startswith("Bearer")
        # Unknown routes too: nothing is said to a caller without a token.
        assert (await client.get("/v1/nothing")).status == 401
        missing = await client.get("/v1/nothing", headers=bearer(tokens, ADMIN))
        assert missing.status == 404
        assert (await missing.json())["error"] == "not_found"
        wrong_method = await client.delete("/v1/devices", headers=bearer(tokens, ADMIN))
        assert wrong_method.status == 405
        assert (await wrong_method.json())["error"] == "method_not_allowed"

    run(backend, tokens, scenario)
    assert backend.audits == []


# --------------------------------------------------------------------------- devices


def test_an_operator_of_project_a_is_refused_project_b(
    backend: FakeBackend, tokens: TokenAuthority
) -> None:
    async def scenario(client: TestClient[Any, Any]) -> None:
        op = bearer(tokens, OPERATOR)
        own = await client.get("/v1/devices/a-1", headers=op)
        assert own.status == 200
        assert (await own.json())["resource"] == "org/acme/project/pA/group/g/device/a-1"
        other = await client.get("/v1/devices/b-1", headers=op)
        assert other.status == 403
        body = await other.json()
        assert body["error"] == "forbidden"
        assert "no grant covers device.read" in body["reason"]
        listed = await client.get("/v1/devices", headers=op)
        assert [d["device_id"] for d in (await listed.json())["devices"]] == ["a-1"]
        everything = await client.get("/v1/devices?org=acme", headers=bearer(tokens, VIEWER))
        assert [d["device_id"] for d in (await everything.json())["devices"]] == ["a-1", "b-1"]
        only_b = await client.get("/v1/devices?project=pB", headers=bearer(tokens, VIEWER))
        assert [d["device_id"] for d in (await only_b.json())["devices"]] == ["b-1"]
        suspend_b = await client.post("/v1/devices/b-1/suspend", headers=op)
        assert suspend_b.status == 403
        unknown = await client.get("/v1/devices/nope", headers=op)
        assert unknown.status == 404

    run(backend, tokens, scenario)
    # The denials are audited by the API (no command reached the agent).
    assert [(a.principal, a.action, a.decision) for a in backend.audits] == [
        ("user:op", "device.read", "denied"),
        ("user:op", "device.suspend", "denied"),
    ]
    assert backend.commands[2:] == []


def test_a_viewer_cannot_provision_and_nothing_is_signed(
    backend: FakeBackend, tokens: TokenAuthority
) -> None:
    async def scenario(client: TestClient[Any, Any]) -> None:
        answer = await provision(client, bearer(tokens, VIEWER), "v-1")
        assert answer.status == 403
        body = await answer.json()
        assert body["error"] == "forbidden"
        audit = next(a for a in backend.audits if a.command_id == body["command_id"])
        assert audit.decision == "denied"
        assert audit.action == "device.provision"
        assert audit.principal == "user:viewer"
        assert audit.resource == "org/acme/project/pA/group/g"

    run(backend, tokens, scenario)
    assert backend.issued == []
    assert "v-1" not in backend.records


def test_an_admin_provisions_from_a_csr(
    backend: FakeBackend, tokens: TokenAuthority, ca: CertificateAuthority
) -> None:
    async def scenario(client: TestClient[Any, Any]) -> None:
        admin = bearer(tokens, ADMIN)
        request = {
            "org": "acme",
            "project": "pA",
            "group": "g",
            "csr_pem": csr_for("g-new"),
            "labels": {"site": "north"},
        }
        answer = await client.post("/v1/devices", headers=admin, json=request)
        assert answer.status == 201, await answer.text()
        body = await answer.json()
        assert body["device_id"] == "g-new"  # taken from the CSR's CN
        cert = x509.load_pem_x509_certificate(body["certificate_pem"].encode())
        assert ca.verify_chain(cert)
        assert body["ca_pem"] == ca.cert_pem.decode()
        assert body["device"]["status"] == "provisioned"
        assert body["device"]["labels"] == {"site": "north"}
        assert body["audit"]["decision"] == "applied"
        listed = await client.get("/v1/devices?project=pA", headers=admin)
        assert "g-new" in [d["device_id"] for d in (await listed.json())["devices"]]

        again = await client.post("/v1/devices", headers=admin, json=request)
        assert again.status == 409  # the id is taken: refused before signing
        mismatch = {**request, "csr_pem": csr_for("g-x"), "device_id": "g-y"}
        bad = await client.post("/v1/devices", headers=admin, json=mismatch)
        assert bad.status == 400
        assert "does not match" in (await bad.json())["reason"]
        garbage = await client.post("/v1/devices", headers=admin, json={**request, "csr_pem": "x"})
        assert garbage.status == 400
        missing = await client.post("/v1/devices", headers=admin, json={"org": "acme"})
        assert missing.status == 400

    run(backend, tokens, scenario)
    assert len(backend.issued) == 1
    decisions = [a.decision for a in backend.audits]
    assert decisions == ["applied", "refused", "refused", "refused"]


def test_a_certificate_the_registry_refuses_is_revoked(
    backend: FakeBackend, tokens: TokenAuthority, ca: CertificateAuthority
) -> None:
    # The agent's grants lag behind (the admin's grant was just withdrawn): it denies.
    backend.agent_grants = {}

    async def scenario(client: TestClient[Any, Any]) -> None:
        answer = await provision(client, bearer(tokens, ADMIN), "g-late")
        assert answer.status == 403
        body = await answer.json()
        assert body["audit"]["decision"] == "denied"

    run(backend, tokens, scenario)
    assert backend.revoked == backend.issued
    assert ca.is_revoked(backend.issued[0])


def test_lifecycle_commands_map_the_agents_decisions(
    backend: FakeBackend, tokens: TokenAuthority
) -> None:
    async def scenario(client: TestClient[Any, Any]) -> None:
        op, admin = bearer(tokens, OPERATOR), bearer(tokens, ADMIN)
        suspended = await client.post(
            "/v1/devices/a-1/suspend", headers=op, json={"reason": "maintenance"}
        )
        assert suspended.status == 200
        body = await suspended.json()
        assert body["device"]["status"] == "suspended"
        assert "maintenance" in body["audit"]["reason"]
        again = await client.post("/v1/devices/a-1/suspend", headers=op)
        assert (await again.json())["audit"]["decision"] == "unchanged"
        assert (await client.post("/v1/devices/a-1/revoke", headers=op)).status == 403
        revoked = await client.post("/v1/devices/a-1/revoke", headers=admin)
        assert revoked.status == 200
        assert (await revoked.json())["device"]["status"] == "revoked"
        back = await client.post("/v1/devices/a-1/activate", headers=admin)
        assert back.status == 409
        assert (await back.json())["error"] == "conflict"
        moved = await client.patch(
            "/v1/devices/b-1", headers=admin, json={"group": "h", "firmware_version": "2.0"}
        )
        assert moved.status == 200
        assert (await moved.json())["device"]["group"] == "h"
        not_mine = await client.patch("/v1/devices/b-1", headers=op, json={"region": "eu"})
        assert not_mine.status == 403
        bad_labels = await client.patch("/v1/devices/b-1", headers=admin, json={"labels": [1]})
        assert bad_labels.status == 400

    run(backend, tokens, scenario)
    assert backend.records["a-1"].status is DeviceStatus.revoked
    assert backend.revoked == [1]  # the seeded device's serial


# --------------------------------------------------------------------------- twins


def test_twin_reads_and_writes(backend: FakeBackend, tokens: TokenAuthority) -> None:
    async def scenario(client: TestClient[Any, Any]) -> None:
        op = bearer(tokens, OPERATOR)
        empty = await client.get("/v1/devices/a-1/twin", headers=op)
        assert await empty.json() == {"desired": {}, "reported": {}, "delta": {}, "version": 0}
        first = await client.patch("/v1/devices/a-1/twin", headers=op, json={"desired": {"a": 1}})
        assert first.status == 200
        body = await first.json()
        assert (body["status"], body["version"]) == ("accepted", 1)
        assert body["twin"]["delta"] == {"a": 1}
        stale = await client.patch(
            "/v1/devices/a-1/twin", headers=op, json={"desired": {"a": 2}, "version": 0}
        )
        assert stale.status == 409
        assert (await stale.json())["status"] == "conflict"
        too_deep: dict[str, Any] = {"x": 1}
        for _ in range(7):  # within the body's bound, past the twin's own (6 levels)
            too_deep = {"x": too_deep}
        invalid = await client.patch(
            "/v1/devices/a-1/twin", headers=op, json={"desired": too_deep, "version": 1}
        )
        assert invalid.status == 400
        empty_key = await client.patch(
            "/v1/devices/a-1/twin", headers=op, json={"desired": {"": 1}, "version": 1}
        )
        assert empty_key.status == 400  # the documented schema refuses it: never sent
        assert (
            await client.patch("/v1/devices/a-1/twin", headers=op, json={"desired": [1]})
        ).status == 400
        assert (await client.get("/v1/devices/b-1/twin", headers=op)).status == 403
        viewer = bearer(tokens, VIEWER)
        assert (await client.get("/v1/devices/a-1/twin", headers=viewer)).status == 200
        write = await client.patch("/v1/devices/a-1/twin", headers=viewer, json={"desired": {}})
        assert write.status == 403

    run(backend, tokens, scenario)
    assert [a.decision for a in backend.audits] == [
        "applied",
        "refused",
        "refused",
        "denied",
        "denied",
    ]


# --------------------------------------------------------------------------- grants


def test_grant_changes_need_grant_write_on_every_scope(
    backend: FakeBackend, tokens: TokenAuthority
) -> None:
    newcomer = Principal.user("new")

    async def scenario(client: TestClient[Any, Any]) -> None:
        admin, op = bearer(tokens, ADMIN), bearer(tokens, OPERATOR)
        body = {"grants": [{"role": "viewer", "scope": "org/acme/project/pB"}]}
        assert (await client.put("/v1/grants/user:new", headers=op, json=body)).status == 403
        put = await client.put("/v1/grants/user:new", headers=admin, json=body)
        assert put.status == 200
        answer = await put.json()
        assert answer["grants"] == body["grants"]
        assert answer["audit"]["decision"] == "applied"
        assert answer["audit"]["resource"] == "org/acme/project/pB"
        own = await client.get("/v1/grants/user:new", headers=bearer(tokens, newcomer))
        assert (await own.json())["grants"] == body["grants"]
        # Another's grants: only those on scopes the caller may read.
        seen_by_op = await client.get("/v1/grants/user:new", headers=op)
        assert (await seen_by_op.json())["grants"] == []
        outside = {"grants": [{"role": "admin", "scope": "org/other"}]}
        assert (await client.put("/v1/grants/user:new", headers=admin, json=outside)).status == 403
        device = await client.put("/v1/grants/device:d-1", headers=admin, json=body)
        assert device.status == 400
        bad_role = {"grants": [{"role": "owner", "scope": "org/acme"}]}
        assert (await client.put("/v1/grants/user:new", headers=admin, json=bad_role)).status == 400

    run(backend, tokens, scenario)
    assert backend.grant_sets["user:new"] == GrantSet(newcomer, (Grant(newcomer, Role.viewer, PB),))
    assert [a.decision for a in backend.audits] == ["denied", "applied", "denied"]


# --------------------------------------------------------------------------- alert rules

GROUP_A, GROUP_B = "org/acme/project/pA/group/g", "org/acme/project/pB/group/g"


def rule_body(scope: str, scope_type: str = "group", threshold: float = 80.0) -> dict[str, Any]:
    return {
        "scope_type": scope_type,
        "scope": scope,
        "metric": "temperature",
        "kind": "above",
        "threshold": threshold,
        "clear_threshold": threshold - 5,
        "severity": "critical",
    }


def test_alert_rules_are_written_only_on_scopes_the_caller_operates(
    backend: FakeBackend, tokens: TokenAuthority
) -> None:
    async def scenario(client: TestClient[Any, Any]) -> None:
        op, viewer = bearer(tokens, OPERATOR), bearer(tokens, VIEWER)
        own = await client.put("/v1/alert-rules/hot-a", headers=op, json=rule_body(GROUP_A))
        assert own.status == 200
        body = await own.json()
        assert body["rule"]["resource"] == GROUP_A
        assert body["audit"]["decision"] == "applied"
        on_device = await client.put(
            "/v1/alert-rules/hot-a1", headers=op, json=rule_body("a-1", "device")
        )
        assert on_device.status == 200
        assert (await on_device.json())["rule"]["resource"].endswith("/device/a-1")
        other = await client.put("/v1/alert-rules/hot-b", headers=op, json=rule_body(GROUP_B))
        assert other.status == 403
        other_device = await client.put(
            "/v1/alert-rules/hot-b1", headers=op, json=rule_body("b-1", "device")
        )
        assert other_device.status == 403
        by_viewer = await client.put("/v1/alert-rules/v", headers=viewer, json=rule_body(GROUP_A))
        assert by_viewer.status == 403
        admin = bearer(tokens, ADMIN)
        assert (
            await client.put("/v1/alert-rules/hot-b", headers=admin, json=rule_body(GROUP_B))
        ).status == 200
        # Taking pB's rule over into pA needs alert.write on pB too.
        takeover = await client.put("/v1/alert-rules/hot-b", headers=op, json=rule_body(GROUP_A))
        assert takeover.status == 403
        listed = await client.get("/v1/alert-rules", headers=op)
        assert [r["rule_id"] for r in (await listed.json())["rules"]] == ["hot-a", "hot-a1"]
        everything = await client.get("/v1/alert-rules", headers=viewer)
        assert len((await everything.json())["rules"]) == 3
        assert (await client.get("/v1/alert-rules/hot-b", headers=op)).status == 403
        assert (await client.delete("/v1/alert-rules/hot-b", headers=op)).status == 403
        deleted = await client.delete("/v1/alert-rules/hot-a", headers=op)
        assert deleted.status == 200
        assert (await deleted.json())["rule"] is None
        assert (await client.get("/v1/alert-rules/hot-a", headers=op)).status == 404

    run(backend, tokens, scenario)
    assert set(backend.rule_table) == {"hot-a1", "hot-b"}
    assert backend.rule_table["hot-b"].scope == GROUP_B
    decisions = [(a.principal, a.command, str(a.decision)) for a in backend.audits]
    assert decisions.count(("user:op", "alert_rule.put", "denied")) == 3
    assert ("user:viewer", "alert_rule.put", "denied") in decisions
    assert ("user:op", "alert_rule.delete", "applied") in decisions


def test_an_invalid_alert_rule_is_a_400_and_an_unknown_device_a_404(
    backend: FakeBackend, tokens: TokenAuthority
) -> None:
    async def scenario(client: TestClient[Any, Any]) -> None:
        admin = bearer(tokens, ADMIN)
        for body in (
            {**rule_body(GROUP_A), "kind": "sideways"},
            {**rule_body(GROUP_A), "clear_threshold": 99.0},  # above: clear must be <= threshold
            {**rule_body("org/acme/project/pA"), "scope_type": "group"},  # not a group
            {k: v for k, v in rule_body(GROUP_A).items() if k != "kind"},
            {**rule_body(GROUP_A), "rule_id": "another"},
        ):
            answer = await client.put("/v1/alert-rules/r", headers=admin, json=body)
            assert answer.status == 400, body
            assert (await answer.json())["error"] == "bad_request"
        unknown = await client.put(
            "/v1/alert-rules/r", headers=admin, json=rule_body("ghost", "device")
        )
        assert unknown.status == 404

    run(backend, tokens, scenario)
    assert backend.rule_table == {}


# --------------------------------------------------------------------------- OTA rollouts

APPROVER = Principal.user("approver")
TARGET_A = "org/acme/project/pA/group/g"


def test_rollouts_are_created_by_operators_and_approved_by_approvers_only(
    backend: FakeBackend, tokens: TokenAuthority
) -> None:
    backend.grant_sets[APPROVER.key] = GrantSet.of(APPROVER, (Role.ota_approver, PA))

    async def scenario(client: TestClient[Any, Any]) -> None:
        op, approver = bearer(tokens, OPERATOR), bearer(tokens, APPROVER)
        create = {"artifact_id": ARTIFACT.artifact_id, "target": TARGET_A, "rollout_id": "r-1"}
        created = await client.post("/v1/ota/rollouts", headers=op, json=create)
        assert created.status == 201, await created.text()
        body = await created.json()
        assert body["rollout"]["state"] == "pending_approval"
        assert body["audit"]["decision"] == "applied"
        # Outside the operator's project: refused by the API, nothing reaches the controller.
        sent = len(backend.ota_requests)
        elsewhere = {**create, "target": "org/acme/project/pB/group/g", "rollout_id": "r-2"}
        assert (await client.post("/v1/ota/rollouts", headers=op, json=elsewhere)).status == 403
        # An operator cannot approve; an ota-approver of the project can.
        assert (await client.post("/v1/ota/rollouts/r-1/approve", headers=op)).status == 403
        assert len(backend.ota_requests) == sent
        approved = await client.post(
            "/v1/ota/rollouts/r-1/approve", headers=approver, json={"comment": "lgtm"}
        )
        assert approved.status == 200, await approved.text()
        assert (await approved.json())["rollout"]["state"] != "pending_approval"
        # The controller's own refusals come back as 409: approving twice, say.
        again = await client.post("/v1/ota/rollouts/r-1/abort", headers=op)
        assert again.status == 200
        assert (await again.json())["rollout"]["state"] == "aborted"
        after = await client.post("/v1/ota/rollouts/r-1/resume", headers=op)
        assert after.status == 409
        listed = await client.get("/v1/ota/rollouts", headers=bearer(tokens, VIEWER))
        assert [r["rollout_id"] for r in (await listed.json())["rollouts"]] == ["r-1"]
        assert (await client.get("/v1/ota/rollouts/nope", headers=op)).status == 404
        bad_plan = {**create, "rollout_id": "r-3", "plan": {"percentages": [50, 10]}}
        assert (await client.post("/v1/ota/rollouts", headers=op, json=bad_plan)).status == 400

    run(backend, tokens, scenario)
    assert [r["kind"] for r in backend.ota_requests] == ["create", "approve", "abort", "resume"]
    denied = [(a.principal, a.command) for a in backend.audits if a.decision == "denied"]
    assert denied == [("user:op", "ota.create"), ("user:op", "ota.approve")]


# --------------------------------------------------------------------------- tenants


def test_another_organization_learns_nothing_not_even_that_an_object_exists(
    backend: FakeBackend, tokens: TokenAuthority
) -> None:
    stranger = Principal.user("stranger")
    backend.grant_sets[stranger.key] = GrantSet.of(stranger, (Role.admin, Resource("other")))
    backend.rule_table["hot-a"] = AlertRule(
        rule_id="hot-a", scope_type=ScopeType.group, scope=GROUP_A, metric="t",
        kind=RuleKind.above, threshold=1.0,
    )  # fmt: skip

    async def scenario(client: TestClient[Any, Any]) -> None:
        them = bearer(tokens, stranger)
        unknown = await client.get("/v1/devices/nope", headers=them)
        existing = await client.get("/v1/devices/a-1", headers=them)
        assert (existing.status, unknown.status) == (404, 404)
        assert await existing.json() == {"error": "not_found", "reason": "unknown device 'a-1'"}
        assert (await unknown.json())["reason"] == "unknown device 'nope'"
        for method, path in (
            ("GET", "/v1/devices/a-1/twin"),
            ("POST", "/v1/devices/a-1/suspend"),
            ("GET", "/v1/alert-rules/hot-a"),
            ("DELETE", "/v1/alert-rules/hot-a"),
        ):
            answer = await client.request(method, path, headers=them)
            assert answer.status == 404, path
        on_device = await client.put(
            "/v1/alert-rules/mine", headers=them, json=rule_body("a-1", "device")
        )
        assert on_device.status == 404
        # Inside the organization the caller is told why: a 403 with the decision's reason.
        inside = await client.get("/v1/devices/b-1", headers=bearer(tokens, OPERATOR))
        assert inside.status == 403

    run(backend, tokens, scenario)
    # Hidden, but audited: every attempt on the other tenant's objects left a denial.
    denied = [a for a in backend.audits if a.principal == "user:stranger"]
    assert len(denied) == 6
    assert all(a.decision == "denied" for a in denied)


# --------------------------------------------------------------------------- hostile bodies


def test_a_deeply_nested_body_or_invalid_utf8_is_a_400_not_a_500(
    backend: FakeBackend, tokens: TokenAuthority
) -> None:
    deep = '{"desired": ' + '{"a": ' * 5000 + "1" + "}" * 5000 + "}"
    just_over = '{"desired": ' + '{"a": ' * MAX_JSON_DEPTH + "1" + "}" * MAX_JSON_DEPTH + "}"
    json_type = {"Content-Type": "application/json"}

    async def scenario(client: TestClient[Any, Any]) -> None:
        admin = {**bearer(tokens, ADMIN), **json_type}
        for body, reason in (
            (deep, f"nested deeper than {MAX_JSON_DEPTH} levels"),
            (just_over, f"nested deeper than {MAX_JSON_DEPTH} levels"),
            ('["' + "[" * 5000 + '"]', "should be an object"),  # a string, not nesting
        ):
            answer = await client.patch("/v1/devices/a-1/twin", headers=admin, data=body)
            assert answer.status == 400, body[:40]
            error = await answer.json()
            assert error["error"] == "bad_request"
            assert reason in error["reason"]
        # Brackets inside strings are text, not nesting: a deep-looking string is fine.
        text = json.dumps({"desired": {"note": "[" * 5000}})
        fine = await client.patch("/v1/devices/a-1/twin", headers=admin, data=text)
        assert fine.status == 200
        for method, path in (
            ("POST", "/v1/devices"),
            ("POST", "/v1/ota/rollouts"),
            ("PUT", "/v1/alert-rules/r"),
            ("PATCH", "/v1/devices/a-1/twin"),
            ("POST", "/v1/devices/a-1/suspend"),
        ):
            bad = await client.request(method, path, headers=admin, data=b'{"org": "\xff\xfe"}')
            assert bad.status == 400, (method, path)
            error = await bad.json()
            assert error["error"] == "bad_request"
            assert "UTF-8" in error["reason"]

    run(backend, tokens, scenario)
    assert [a.decision for a in backend.audits] == ["applied"]  # only the string-valued patch


def test_the_document_is_generated_from_the_models_the_handlers_validate_with(
    backend: FakeBackend, tokens: TokenAuthority
) -> None:
    document = openapi_document()
    schemas = document["components"]["schemas"]
    for route in ROUTES:
        op = document["paths"][route.path][route.method.lower()]
        for model, where in (
            (route.body, op.get("requestBody", {})),
            (route.result, op["responses"][str(route.ok)]),
        ):
            if model is None:
                continue
            name = model.__name__
            assert where["content"]["application/json"]["schema"] == {
                "$ref": f"#/components/schemas/{name}"
            }
            generated = model.model_json_schema(ref_template="#/components/schemas/{model}")
            generated.pop("$defs", None)
            assert schemas[name] == generated, name

    # What the document leaves out is refused: an undocumented field, a string for a number.
    async def scenario(client: TestClient[Any, Any]) -> None:
        admin = bearer(tokens, ADMIN)
        for method, path, body in (
            ("POST", "/v1/devices", {"org": "acme", "project": "pA", "group": "g",
                                     "csr_pem": csr_for("x-1"), "colour": "red"}),
            ("PATCH", "/v1/devices/a-1", {"group": "g", "colour": "red"}),
            ("POST", "/v1/devices/a-1/suspend", {"why": "undocumented"}),
            ("PATCH", "/v1/devices/a-1/twin", {"desired": {}, "version": "1"}),
            ("PUT", "/v1/grants/user:x", {"grants": [{"role": "admin", "scope": "acme"}]}),
            ("PUT", "/v1/alert-rules/r", {**rule_body(GROUP_A), "threshold": "80"}),
            ("POST", "/v1/ota/rollouts", {"artifact_id": "a", "target": TARGET_A,
                                          "plan": {"percentages": [10, 50]}}),
        ):  # fmt: skip
            answer = await client.request(method, path, headers=admin, json=body)
            assert answer.status == 400, (method, path, await answer.text())
            assert (await answer.json())["error"] == "bad_request"

    seeded = list(backend.commands)
    run(backend, tokens, scenario)
    assert backend.commands == seeded  # refused before anything was sent...
    assert backend.audits == []
    assert backend.issued == []
