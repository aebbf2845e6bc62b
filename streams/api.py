"""`python -m streams.api`: the platform's HTTP API for devices, grants, twins, alert rules and
OTA rollouts.

Every call but ``GET /openapi.json`` and ``GET /healthz`` carries a bearer token signed by the
platform (:mod:`streams.tokens`); a missing or invalid one is a 401. The handler then asks
:func:`streams.rbac.authorize` (the one decision function) whether the caller may do the route's
action on the resource concerned, *before* doing anything (a 403 otherwise). Errors are JSON:
``{"error": "unauthorized|forbidden|bad_request|not_found|conflict|timeout|...", "reason": ...}``.

State is read from the compacted topics, followed in memory (``registry.devices``,
``rbac.grants``, ``twin.state``, ``alerts.rules``, ``ota.rollouts``:
:class:`streams.runtime.tables.GlobalTable`); changes go through Kafka
like any client's: registry commands to the registry agent, which authorizes them again and
answers on ``audit.log`` (its decision maps to the status: denied 403, refused 409 or 404 for an
unknown device, applied/unchanged 2xx); desired-state patches to the twin agent; grant sets to
``rbac.grants``; alert rules to ``alerts.rules`` (with their audit record, in one transaction);
OTA requests to the OTA controller, which authorizes them again and answers on ``audit.log``
like the registry agent. After a change is applied, the answer waits (briefly) until the API's
own table shows it, so a client reads its own writes.

Audit: every decision on a change leaves one record on ``audit.log``: the registry agent writes
those of the commands it receives; the API writes the others itself (a refusal before any
command is sent, a grant change, a twin write) and every denied read. A grant change and its
audit record are written in one Kafka transaction: both or neither.

Provisioning keeps the CLI's rule: authorize first, sign the CSR only then; a certificate
whose registry entry the agent refuses is revoked at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web
from aiohttp.typedefs import Handler
from confluent_kafka import KafkaException, Message, Producer
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from pydantic import BaseModel

from infra.keys import key_passphrase
from infra.ota_summary import rollout_summary
from infra.pki import CertificateAuthority, PkiError, cert_fingerprint_sha256
from infra.process import kafka_config
from infra.services.base import ServiceError
from infra.settings import Settings, load_settings
from schemas.codec import Decoded
from streams.api_models import (
    MAX_JSON_DEPTH,
    PRINCIPAL_PATTERN,
    AlertRuleBody,
    BodyError,
    CommandResult,
    Device,
    DeviceList,
    DeviceUpdate,
    GrantsPut,
    GrantsResult,
    Health,
    LifecycleRequest,
    M,
    Provisioned,
    ProvisionRequest,
    RolloutControl,
    RolloutCreate,
    RolloutList,
    RolloutPlanBody,
    RolloutResult,
    RuleList,
    RuleResult,
    TwinPatch,
    component_schemas,
    parse_body,
)
from streams.api_models import AlertRule as AlertRuleModel
from streams.api_models import GrantSet as GrantSetModel
from streams.api_models import Rollout as RolloutModel
from streams.api_models import Twin as TwinModel
from streams.api_models import TwinAnswer as TwinAnswerModel
from streams.client import (
    AUDIT,
    COMMANDS,
    DESIRED,
    DEVICES,
    GRANTS,
    OTA_REQUESTS,
    RESPONSES,
    ROLLOUTS,
    RULES,
    TWIN_STATE,
    HotPathClient,
    HotPathError,
    TwinAnswer,
)
from streams.hot.alerts import AlertRule, ScopeType, rule_from_record, rule_to_record
from streams.hot.twin import Twin, from_record, twin_view
from streams.ota import Rollout, RolloutPlan
from streams.ota import from_record as rollout_from_record
from streams.rbac import (
    Action,
    Decision,
    Grant,
    GrantSet,
    Principal,
    PrincipalKind,
    Resource,
    Role,
    authorize,
)
from streams.registry import (
    ActivateDevice,
    AuditDecision,
    AuditRecord,
    CommandKind,
    DeviceRecord,
    DeviceStatus,
    ProvisionDevice,
    RegistryCommand,
    RevokeDevice,
    SuspendDevice,
    UpdateDevice,
)
from streams.runtime.status import write_status
from streams.runtime.tables import GlobalTable, key_text
from streams.tokens import TokenAuthority, TokenError

__all__ = [
    "MAX_JSON_DEPTH",
    "OPENAPI_VERSION",
    "ROUTES",
    "ApiError",
    "Backend",
    "FleetApi",
    "KafkaBackend",
    "Route",
    "create_app",
    "main",
    "openapi_document",
]

log = logging.getLogger("fleetstream.api")

OPENAPI_VERSION = "3.1.0"
API_VERSION = "1.0.0"
STATUS_FILE = "api.json"
PUBLIC_PATHS = frozenset({"/openapi.json", "/healthz"})
SETTLE_TIMEOUT_S = 10.0  # how long an answer waits for the API's table to show its change
POLL_IDLE_S = 0.02  # the table follower's pause when nothing arrived
MAX_BODY_BYTES = 256 * 1024
_STATUS_EVERY_S = 1.0

# Who calls: set by the authentication middleware in the request's own task, read by handlers.
_CALLER: ContextVar[Principal] = ContextVar("caller")


def now_ms() -> int:
    return int(time.time() * 1000)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class ApiError(Exception):
    """An answer other than success: ``{"error": error, "reason": reason, **extra}``."""

    def __init__(self, http_status: int, error: str, reason: str, /, **extra: Any) -> None:
        super().__init__(reason)
        self.status = http_status
        self.error = error
        self.reason = reason
        self.extra = extra

    def response(self) -> web.Response:
        headers = {}
        if self.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="fleetstream"'
        body = {"error": self.error, "reason": self.reason, **self.extra}
        return web.json_response(body, status=self.status, headers=headers)


# --------------------------------------------------------------------------- views


def device_view(record: DeviceRecord) -> dict[str, Any]:
    return {**record.to_record(), "resource": str(record.resource)}


def grants_view(grants: GrantSet, visible: Sequence[Grant] | None = None) -> dict[str, Any]:
    shown = grants.grants if visible is None else visible
    return {
        "principal": str(grants.principal),
        "grants": [{"role": str(g.role), "scope": str(g.scope)} for g in shown],
    }


def answer_view(answer: TwinAnswer) -> dict[str, Any]:
    return {"status": answer.status, "version": answer.version, "detail": answer.detail}


def _member_of(principal: Principal, org: str, grants: Mapping[str, GrantSet]) -> bool:
    """The principal holds some grant in organization ``org`` (the orchestrator: in all)."""
    if principal.kind is PrincipalKind.orchestrator:
        return True
    held = grants.get(principal.key)
    return held is not None and any(g.scope.org == org for g in held.grants)


def rule_from_body(rule_id: str, body: Mapping[str, Any]) -> AlertRule:
    """The rule a PUT body describes (every field but the id, which is the path's)."""
    if "rule_id" in body and body["rule_id"] != rule_id:
        raise ApiError(400, "bad_request", "the body's rule_id differs from the path's")
    try:
        return rule_from_record({**body, "rule_id": rule_id})
    except KeyError as exc:
        raise ApiError(400, "bad_request", f"{exc.args[0]!r} is required") from None
    except (TypeError, ValueError) as exc:
        raise ApiError(400, "bad_request", str(exc)) from None


def plan_from_body(given: RolloutPlanBody | None) -> RolloutPlan:
    """A rollout plan from a request's `plan` (absent: the default plan)."""
    if given is None:
        return RolloutPlan()
    try:
        return RolloutPlan(**given.model_dump())
    except (TypeError, ValueError) as exc:  # what a schema cannot say (ascending shares...)
        raise ApiError(400, "bad_request", f"invalid plan: {exc}") from None


# --------------------------------------------------------------------------- backend


class Backend(Protocol):
    """What the API reads and writes; :class:`KafkaBackend` on the real platform.

    The tables are in memory and never block; the other methods block (Kafka, the CA) and are
    called in a worker thread.
    """

    @property
    def ca_pem(self) -> bytes: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def ready(self) -> bool: ...

    def sizes(self) -> dict[str, int]: ...

    def grants(self) -> Mapping[str, GrantSet]: ...

    def device(self, device_id: str) -> DeviceRecord | None: ...

    def devices(self) -> list[DeviceRecord]: ...

    def twin(self, device_id: str) -> Twin | None: ...

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Until ``predicate`` holds (re-checked when a table changes) or ``timeout``."""
        ...

    def issue_certificate(self, csr_pem: bytes, device_id: str) -> x509.Certificate: ...

    def revoke_certificate(self, serial: int, reason: str) -> None: ...

    def registry_commands(self, commands: Sequence[RegistryCommand]) -> dict[str, AuditRecord]: ...

    def set_desired(
        self, device_id: str, patch: Mapping[str, Any], version: int | None, principal: str
    ) -> TwinAnswer: ...

    def put_grants(self, grants: GrantSet, audit: AuditRecord) -> None:
        """Write the grant set and its audit record together (one transaction)."""
        ...

    def write_audit(self, record: AuditRecord) -> None: ...

    def rules(self) -> Mapping[str, AlertRule]: ...

    def put_rule(self, rule_id: str, rule: AlertRule | None, audit: AuditRecord) -> None:
        """Write a rule (None: delete it) and its audit record, both or neither."""

    def rollouts(self) -> Mapping[str, Rollout]: ...

    def ota_request(
        self,
        rollout_id: str,
        kind: str,
        principal: Principal,
        *,
        artifact_id: str | None = None,
        target: str | None = None,
        plan: Mapping[str, Any] | None = None,
        comment: str | None = None,
    ) -> AuditRecord:
        """Ask the OTA controller; its decision (the audit record answering the request)."""


class KafkaBackend:
    """The platform's topics, followed in memory, and its clients (registry agent, twin agent,
    CA, a transactional producer for what the API itself writes)."""

    def __init__(self, settings: Settings, timeout: float = 30.0) -> None:
        self.settings = settings
        self.timeout = timeout
        self.client = HotPathClient(settings, timeout)
        self.ca = CertificateAuthority.load_or_create(
            settings.pki_dir, passphrase=key_passphrase(settings)
        )
        self._lock = threading.Lock()
        self._ca_lock = threading.Lock()
        self._producer_lock = threading.Lock()
        self._devices: dict[str, DeviceRecord] = {}
        self._grants: dict[str, GrantSet] = {}
        self._twins: dict[str, Twin] = {}
        self._rules: dict[str, AlertRule] = {}
        self._rollouts: dict[str, Rollout] = {}
        followed: list[tuple[str, dict[str, Any], Callable[[dict[str, Any]], Any]]] = [
            (DEVICES, self._devices, DeviceRecord.from_record),
            (GRANTS, self._grants, GrantSet.from_record),
            (TWIN_STATE, self._twins, from_record),
            (RULES, self._rules, rule_from_record),
            (ROLLOUTS, self._rollouts, rollout_from_record),
        ]
        self._tables = [
            GlobalTable(kafka_config(settings), topic, self._applier(topic, into, parse))
            for topic, into, parse in followed
        ]
        self._producer: Producer | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed = asyncio.Event()
        self._ready = False

    @property
    def ca_pem(self) -> bytes:
        return self.ca.cert_pem

    # ------------------------------------------------------------------ tables

    def _record(self, topic: str, msg: Message) -> dict[str, Any] | None:
        value = msg.value()
        if value is None:
            return None
        decoded = self.client.codec(topic).decode(value)
        if not isinstance(decoded, Decoded):
            log.warning("%s at offset %d unreadable: %s", topic, msg.offset(), decoded.detail)
            return None
        return decoded.record

    def _applier(
        self, topic: str, into: dict[str, Any], parse: Callable[[dict[str, Any]], Any]
    ) -> Callable[[Message], None]:
        """How a followed topic's record lands in ``into``: parsed, or a tombstone (a record
        that cannot be parsed is logged and counts as one)."""

        def apply(msg: Message) -> None:
            key, record = key_text(msg), self._record(topic, msg)
            try:
                value = None if record is None else parse(record)
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("%s %s at offset %d ignored: %s", topic, key, msg.offset(), exc)
                value = None
            with self._lock:
                if value is None:
                    into.pop(key, None)
                else:
                    into[key] = value

        return apply

    def grants(self) -> Mapping[str, GrantSet]:
        with self._lock:
            return dict(self._grants)

    def device(self, device_id: str) -> DeviceRecord | None:
        with self._lock:
            return self._devices.get(device_id)

    def devices(self) -> list[DeviceRecord]:
        with self._lock:
            return list(self._devices.values())

    def twin(self, device_id: str) -> Twin | None:
        with self._lock:
            return self._twins.get(device_id)

    def rules(self) -> Mapping[str, AlertRule]:
        with self._lock:
            return dict(self._rules)

    def rollouts(self) -> Mapping[str, Rollout]:
        with self._lock:
            return dict(self._rollouts)

    def sizes(self) -> dict[str, int]:
        with self._lock:
            return {
                "devices": len(self._devices),
                "grant_sets": len(self._grants),
                "twins": len(self._twins),
                "rules": len(self._rules),
                "rollouts": len(self._rollouts),
            }

    def ready(self) -> bool:
        return self._ready

    # ------------------------------------------------------------------ following

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        await asyncio.to_thread(self._catch_up)
        self._thread = threading.Thread(target=self._follow, name="api-tables", daemon=True)
        self._thread.start()
        self._ready = True

    def _catch_up(self) -> None:
        topics = (COMMANDS, AUDIT, DESIRED, RESPONSES, GRANTS, DEVICES, TWIN_STATE, RULES)
        for topic in (*topics, ROLLOUTS, OTA_REQUESTS):
            self.client.codec(topic)  # registered once, before the first request needs it
        for table in self._tables:
            applied = table.catch_up()
            log.info("%s read to its end: %d records", table.topic, applied)
        with self._producer_lock:
            self._transactional()

    def _follow(self) -> None:
        while not self._stopping.is_set():
            try:
                applied = sum(table.poll() for table in self._tables)
            except Exception:
                log.exception("following the tables failed; retrying in a second")
                self._stopping.wait(1.0)
                continue
            if applied:
                self._notify_threadsafe()
            else:
                self._stopping.wait(POLL_IDLE_S)

    def _notify_threadsafe(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._notify)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                return predicate()
        return True

    async def stop(self) -> None:
        self._ready = False
        self._stopping.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
        for table in self._tables:
            table.close()
        with self._producer_lock:
            if self._producer is not None:
                self._producer.flush(self.timeout)
        self.client.close()

    # ------------------------------------------------------------------ writes

    def _transactional(self) -> Producer:
        """The API's own producer (caller holds the producer lock)."""
        if self._producer is None:
            producer = Producer(
                {
                    "bootstrap.servers": self.settings.bootstrap_servers,
                    "transactional.id": f"fleetstream-api-{self.settings.api_port}",
                    "transaction.timeout.ms": 10_000,
                    "enable.idempotence": True,
                    "acks": "all",
                }
            )
            producer.init_transactions(self.timeout)  # fences a predecessor's open transaction
            self._producer = producer
        return self._producer

    def _transact(self, records: Sequence[tuple[str, str, bytes | None]]) -> None:
        """Write ``(topic, key, value)`` records in one transaction: all visible, or none."""
        with self._producer_lock:
            try:
                producer = self._transactional()
                producer.begin_transaction()
                for topic, key, value in records:
                    producer.produce(topic, key=key, value=value)
                producer.commit_transaction(self.timeout)
            except KafkaException as exc:
                error = exc.args[0]
                if self._producer is not None and error.txn_requires_abort():
                    with contextlib.suppress(KafkaException):
                        self._producer.abort_transaction(self.timeout)
                else:  # fatal or unknown: a fresh producer (same id) next time
                    self._producer = None
                raise HotPathError(f"not written: {error}") from exc

    def _audit_entry(self, record: AuditRecord) -> tuple[str, str, bytes]:
        value = self.client.codec(AUDIT).encode(record.to_record())
        return AUDIT, record.device_id or record.principal, value

    def write_audit(self, record: AuditRecord) -> None:
        self._transact([self._audit_entry(record)])

    def put_grants(self, grants: GrantSet, audit: AuditRecord) -> None:
        value = self.client.codec(GRANTS).encode(grants.to_record())
        self._transact([(GRANTS, grants.principal.key, value), self._audit_entry(audit)])

    def registry_commands(self, commands: Sequence[RegistryCommand]) -> dict[str, AuditRecord]:
        return self.client.registry_commands(commands)

    def put_rule(self, rule_id: str, rule: AlertRule | None, audit: AuditRecord) -> None:
        value = None if rule is None else self.client.codec(RULES).encode(rule_to_record(rule))
        self._transact([(RULES, rule_id, value), self._audit_entry(audit)])

    def ota_request(
        self, rollout_id: str, kind: str, principal: Principal, **request: Any
    ) -> AuditRecord:
        return self.client.ota_request(rollout_id, kind, principal, **request)

    def set_desired(
        self, device_id: str, patch: Mapping[str, Any], version: int | None, principal: str
    ) -> TwinAnswer:
        return self.client.set_desired(device_id, patch, version, principal)

    # ------------------------------------------------------------------ the CA

    def issue_certificate(self, csr_pem: bytes, device_id: str) -> x509.Certificate:
        return self.ca.issue_from_csr(csr_pem, device_id)

    def revoke_certificate(self, serial: int, reason: str) -> None:
        """Revoke in the CA's CRL and have the broker read it again (if it runs)."""
        from infra.services.mosquitto import Mosquitto

        with self._ca_lock:
            self.ca.revoke(serial, reason)
        try:
            Mosquitto(self.settings).reload()
        except (ServiceError, OSError) as exc:
            log.warning("broker not reloaded after revoking %d: %s", serial, exc)


# --------------------------------------------------------------------------- routes


@dataclass(frozen=True)
class Route:
    """One route: how it is served and how the OpenAPI document describes it."""

    method: str
    path: str
    name: str  # FleetApi's handler and the operationId
    summary: str
    action: Action | None = None  # the RBAC action it needs
    public: bool = False  # no token needed
    body: type[BaseModel] | None = None  # request body: validated with, documented from
    body_required: bool = True
    ok: int = 200
    result: type[BaseModel] | None = None  # response body: sent as, documented from
    errors: tuple[int, ...] = ()
    query: tuple[str, ...] = ()

    @property
    def path_parameters(self) -> list[str]:
        return re.findall(r"\{([A-Za-z_]+)\}", self.path)


_COMMAND_ERRORS = (400, 404, 409, 503, 504)
ROUTES: tuple[Route, ...] = (
    Route("GET", "/openapi.json", "openapi", "This OpenAPI document", public=True),
    Route("GET", "/healthz", "healthz", "Liveness and readiness", public=True, result=Health),
    Route(
        "GET", "/v1/devices", "list_devices", "The devices the caller may read",
        Action.device_read, result=DeviceList, errors=(400,),
        query=("org", "project", "group", "status"),
    ),
    Route(
        "POST", "/v1/devices", "provision",
        "Provision a device: authorize, sign its CSR, record it through the registry agent",
        Action.device_provision, body=ProvisionRequest, ok=201, result=Provisioned,
        errors=(400, 409, 503, 504),
    ),
    Route(
        "GET", "/v1/devices/{device_id}", "get_device", "One device's registry entry",
        Action.device_read, result=Device, errors=(404,),
    ),
    Route(
        "PATCH", "/v1/devices/{device_id}", "update_device",
        "Change a device's group, region, firmware version or labels",
        Action.device_update, body=DeviceUpdate, result=CommandResult, errors=_COMMAND_ERRORS,
    ),
    Route(
        "POST", "/v1/devices/{device_id}/suspend", "suspend_device", "Suspend a device",
        Action.device_suspend, body=LifecycleRequest, body_required=False,
        result=CommandResult, errors=_COMMAND_ERRORS,
    ),
    Route(
        "POST", "/v1/devices/{device_id}/revoke", "revoke_device",
        "Revoke a device for good (its certificate too)",
        Action.device_revoke, body=LifecycleRequest, body_required=False,
        result=CommandResult, errors=_COMMAND_ERRORS,
    ),
    Route(
        "POST", "/v1/devices/{device_id}/activate", "activate_device",
        "Activate a provisioned or suspended device",
        Action.device_activate, result=CommandResult, errors=_COMMAND_ERRORS,
    ),
    Route(
        "GET", "/v1/devices/{device_id}/twin", "get_twin",
        "A device's twin: desired, reported, delta, version",
        Action.twin_read, result=TwinModel, errors=(404,),
    ),
    Route(
        "PATCH", "/v1/devices/{device_id}/twin", "patch_twin",
        "Merge a patch into the desired state (optimistic concurrency with `version`)",
        Action.twin_write, body=TwinPatch, result=TwinAnswerModel, errors=_COMMAND_ERRORS,
    ),
    Route(
        "GET", "/v1/grants/{principal}", "get_grants",
        "A principal's grants: all of one's own, else those on scopes the caller may read",
        Action.grant_read, result=GrantSetModel, errors=(400,),
    ),
    Route(
        "PUT", "/v1/grants/{principal}", "put_grants",
        "Replace a principal's grants; needs grant.write on every scope added or removed",
        Action.grant_write, body=GrantsPut, result=GrantsResult, errors=(400, 503, 504),
    ),
    Route(
        "GET", "/v1/alert-rules", "list_alert_rules",
        "The alert rules on scopes the caller may read", Action.alert_read, result=RuleList,
    ),
    Route(
        "GET", "/v1/alert-rules/{rule_id}", "get_alert_rule", "One alert rule",
        Action.alert_read, result=AlertRuleModel, errors=(404,),
    ),
    Route(
        "PUT", "/v1/alert-rules/{rule_id}", "put_alert_rule",
        "Add or replace an alert rule; needs alert.write on its scope (and on the scope of the "
        "rule it replaces)",
        Action.alert_write, body=AlertRuleBody, result=RuleResult,
        errors=(400, 404, 503, 504),
    ),
    Route(
        "DELETE", "/v1/alert-rules/{rule_id}", "delete_alert_rule", "Delete an alert rule",
        Action.alert_write, result=RuleResult, errors=(404, 503, 504),
    ),
    Route(
        "GET", "/v1/ota/rollouts", "list_rollouts",
        "The OTA rollouts whose target the caller may read", Action.ota_read,
        result=RolloutList,
    ),
    Route(
        "GET", "/v1/ota/rollouts/{rollout_id}", "get_rollout",
        "One rollout: state, cohort, device counts", Action.ota_read, result=RolloutModel,
        errors=(404,),
    ),
    Route(
        "POST", "/v1/ota/rollouts", "create_rollout",
        "Create a rollout, pending approval: nothing is sent before an ota-approver approves",
        Action.ota_create, body=RolloutCreate, ok=201, result=RolloutResult,
        errors=(400, 409, 504),
    ),
    *(
        Route(
            "POST", f"/v1/ota/rollouts/{{rollout_id}}/{kind}", f"{kind}_rollout",
            f"{kind.capitalize()} a rollout (the OTA controller decides and audits)",
            action, body=RolloutControl, body_required=False, result=RolloutResult,
            errors=(400, 404, 409, 504),
        )
        for kind, action in (
            ("approve", Action.ota_approve),
            ("reject", Action.ota_approve),
            ("pause", Action.ota_control),
            ("resume", Action.ota_control),
            ("abort", Action.ota_control),
        )
    ),
)  # fmt: skip

ROUTE_BY_NAME = {route.name: route for route in ROUTES}
_TEXT = {"type": "string", "minLength": 1}
# What Principal.parse accepts for a grantee (users and services hold grants).
_PATH_SCHEMAS = {"principal": {"type": "string", "pattern": PRINCIPAL_PATTERN}}

_STATUS_TEXT = {
    200: "OK",
    201: "Created",
    400: "Invalid request (error body says why)",
    401: "No valid bearer token",
    403: "Not authorized (the reason names the missing grant)",
    404: "No such device, rule or rollout",
    409: "Refused: conflict with the current state",
    503: "The decision's audit record could not be written (see the reason)",
    504: "The platform did not answer in time",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_content(schema: Mapping[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": dict(schema)}}


def _operation(route: Route) -> dict[str, Any]:
    description = route.summary + "."
    if route.action is not None:
        description += f" Needs `{route.action}` (streams.rbac.authorize)."
    op: dict[str, Any] = {
        "operationId": route.name,
        "summary": route.summary,
        "description": description,
    }
    if route.action is not None:
        op["x-fleetstream-action"] = str(route.action)
    params = [
        {"name": p, "in": "path", "required": True, "schema": _PATH_SCHEMAS.get(p, _TEXT)}
        for p in route.path_parameters
    ]
    params += [
        {"name": q, "in": "query", "required": False, "schema": {"type": "string"}}
        for q in route.query
    ]
    if params:
        op["parameters"] = params
    if route.body is not None:
        op["requestBody"] = {
            "required": route.body_required,
            "content": _json_content(_ref(route.body.__name__)),
        }
    result = _ref(route.result.__name__) if route.result else {"type": "object"}
    responses: dict[str, Any] = {
        str(route.ok): {"description": _STATUS_TEXT[route.ok], "content": _json_content(result)}
    }
    statuses = route.errors if route.public else (401, 403, *route.errors)
    for status in sorted(set(statuses)):
        responses[str(status)] = {
            "description": _STATUS_TEXT[status],
            "content": _json_content(_ref("Error")),
        }
    op["responses"] = responses
    if route.public:
        op["security"] = []
    return op


def openapi_document(routes: Sequence[Route] = ROUTES) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``routes``: every route, bearer-JWT security, errors."""
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "fleetstream API",
            "version": API_VERSION,
            "description": (
                "Devices, grants, twins, alert rules and OTA rollouts of the fleet. Every call "
                "but /openapi.json and /healthz needs a bearer token signed by the platform "
                "(`fleet token`), and is then authorized against the caller's grants. "
                f"Request bodies are UTF-8 JSON nested at most {MAX_JSON_DEPTH} levels, with "
                "the documented fields only; anything else is a 400."
            ),
        },
        "servers": [{"url": "/"}],
        "security": [{"bearerAuth": []}],
        "components": {
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
            "schemas": component_schemas(),
        },
        "paths": paths,
    }


# --------------------------------------------------------------------------- request bodies


async def _body(request: web.Request, model: type[M]) -> M:
    """The request's body as ``model``, which must be the route's documented body (whether it
    is required too), or a 400."""
    route = ROUTE_BY_NAME[request.match_info.route.name or ""]
    if route.body is not model:  # a programming error, caught by any test of the route
        raise TypeError(f"{route.name} documents {route.body}, validates with {model}")
    try:
        return parse_body(await request.read(), model, required=route.body_required)
    except BodyError as exc:
        raise ApiError(400, "bad_request", str(exc)) from None


def _reply(model: type[BaseModel], payload: Mapping[str, Any], status: int = 200) -> web.Response:
    """``payload`` sent as its documented ``model``: what is served is what is documented."""
    document = model.model_validate(payload).model_dump(mode="json")
    return web.json_response(document, status=status)


def _csr_common_name(csr_pem: str) -> str:
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except ValueError as exc:
        raise ApiError(400, "bad_request", f"cannot parse the CSR: {exc}") from None
    names = [str(a.value) for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if len(names) != 1:
        raise ApiError(400, "bad_request", f"the CSR needs exactly one CN, has {names!r}")
    return names[0]


# --------------------------------------------------------------------------- the API


class FleetApi:
    """The route handlers; each authenticates (middleware) then authorizes first."""

    def __init__(self, backend: Backend, tokens: TokenAuthority) -> None:
        self.backend = backend
        self.tokens = tokens
        self.responses: Counter[int] = Counter()
        self._document = openapi_document()

    # ------------------------------------------------------------------ helpers

    async def _audit(
        self,
        principal: Principal,
        *,
        command: str,
        action: Action,
        resource: Resource | None,
        device_id: str | None,
        decision: AuditDecision,
        authorization: str,
        reason: str,
        command_id: str | None = None,
    ) -> AuditRecord:
        record = AuditRecord(
            ts_ms=now_ms(),
            command_id=command_id or new_id(f"api-{command}"),
            command=command,
            principal=str(principal),
            action=str(action),
            device_id=device_id,
            resource=None if resource is None else str(resource),
            decision=decision,
            authorization=authorization,
            reason=reason,
        )
        try:
            await asyncio.to_thread(self.backend.write_audit, record)
        except HotPathError as exc:
            raise ApiError(503, "unavailable", f"audit record not written: {exc}") from None
        return record

    async def _authorize(
        self,
        principal: Principal,
        action: Action,
        resource: Resource,
        *,
        command: str,
        device_id: str | None = None,
        unknown: str | None = None,
    ) -> Decision:
        """``authorize`` on the grants of the moment; a denial is audited, then a 403.

        ``unknown`` is the 404 reason an existing object (device, rule, rollout) is answered
        with when the caller holds no grant at all in its organization: another tenant learns
        nothing, not even that it exists (the denial is audited all the same). Within its own
        organization a caller gets the 403 and its reason."""
        grants = self.backend.grants()
        decision = authorize(principal, action, resource, grants)
        if not decision.allowed:
            if unknown is None and device_id is not None:
                unknown = f"unknown device {device_id!r}"
            audit = await self._audit(
                principal,
                command=command,
                action=action,
                resource=resource,
                device_id=device_id,
                decision=AuditDecision.denied,
                authorization=decision.reason,
                reason=decision.reason,
            )
            if unknown is not None and not _member_of(principal, resource.org, grants):
                raise ApiError(404, "not_found", unknown)
            raise ApiError(403, "forbidden", decision.reason, command_id=audit.command_id)
        return decision

    async def _refuse(
        self,
        principal: Principal,
        status: int,
        error: str,
        reason: str,
        *,
        command: str,
        action: Action,
        resource: Resource,
        device_id: str | None,
        decision: Decision,
    ) -> ApiError:
        """An allowed change refused by the API itself (bad CSR, id taken...), audited."""
        audit = await self._audit(
            principal,
            command=command,
            action=action,
            resource=resource,
            device_id=device_id,
            decision=AuditDecision.refused,
            authorization=decision.reason,
            reason=reason,
        )
        return ApiError(status, error, reason, command_id=audit.command_id)

    def _known_device(self, request: web.Request) -> DeviceRecord:
        device_id = request.match_info["device_id"]
        record = self.backend.device(device_id)
        if record is None:
            raise ApiError(404, "not_found", f"unknown device {device_id!r}")
        return record

    async def _send(self, command: RegistryCommand) -> AuditRecord:
        """Send a registry command; its decision by the registry agent, or an ApiError."""
        try:
            audits = await asyncio.to_thread(self.backend.registry_commands, [command])
        except HotPathError as exc:
            raise ApiError(504, "timeout", str(exc), command_id=command.command_id) from None
        audit = audits[command.command_id]
        if audit.allowed:
            return audit
        extra = {"command_id": audit.command_id, "audit": audit.to_record()}
        if audit.decision is AuditDecision.denied:
            raise ApiError(403, "forbidden", audit.reason, **extra)
        if audit.reason.startswith("unknown device"):
            raise ApiError(404, "not_found", audit.reason, **extra)
        raise ApiError(409, "conflict", audit.reason, **extra)

    async def _settled(self, device_id: str, audit: AuditRecord) -> DeviceRecord | None:
        """The device as the API's table shows it once the applied command reached it."""

        def seen() -> bool:
            record = self.backend.device(device_id)
            return record is not None and (
                record.last_command_id == audit.command_id or record.updated_ms > audit.ts_ms
            )

        if audit.decision is AuditDecision.applied:
            await self.backend.wait_for(seen, SETTLE_TIMEOUT_S)
        return self.backend.device(device_id)

    async def _command_result(self, device_id: str, audit: AuditRecord) -> web.Response:
        record = await self._settled(device_id, audit)
        return _reply(
            CommandResult,
            {
                "device": None if record is None else device_view(record),
                "audit": audit.to_record(),
            },
        )

    # ------------------------------------------------------------------ public

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(self._document)

    async def healthz(self, request: web.Request) -> web.Response:
        ready = self.backend.ready()
        return _reply(
            Health, {"status": "ok" if ready else "starting", "ready": ready}, 200 if ready else 503
        )

    # ------------------------------------------------------------------ devices

    async def list_devices(self, request: web.Request) -> web.Response:
        principal = _CALLER.get()
        wanted = {
            k: v for k in ("org", "project", "group", "status") if (v := request.query.get(k))
        }
        grants = self.backend.grants()
        visible = [
            device_view(record)
            for record in sorted(self.backend.devices(), key=lambda r: r.device_id)
            if all(str(getattr(record, k)) == v for k, v in wanted.items())
            and authorize(principal, Action.device_read, record.resource, grants).allowed
        ]
        return _reply(DeviceList, {"devices": visible})

    async def get_device(self, request: web.Request) -> web.Response:
        principal = _CALLER.get()
        record = self._known_device(request)
        await self._authorize(
            principal,
            Action.device_read,
            record.resource,
            command="device.get",
            device_id=record.device_id,
        )
        return _reply(Device, device_view(record))

    async def provision(self, request: web.Request) -> web.Response:
        principal = _CALLER.get()
        body = await _body(request, ProvisionRequest)
        org, project, group, csr_pem = body.org, body.project, body.group, body.csr_pem
        try:
            scope = Resource(org, project, group)
        except ValueError as exc:
            raise ApiError(400, "bad_request", str(exc)) from None
        action, command = Action.device_provision, "provision"
        # Authorize before anything is signed.
        decision = await self._authorize(principal, action, scope, command=command)
        device_id = body.device_id

        async def refuse(status: int, error: str, reason: str) -> ApiError:
            return await self._refuse(
                principal, status, error, reason, command=command, action=action,
                resource=scope, device_id=device_id, decision=decision,
            )  # fmt: skip

        if device_id is None:
            try:
                device_id = _csr_common_name(csr_pem)
            except ApiError as error:
                raise await refuse(error.status, error.error, error.reason) from None
        try:
            target = scope.child(device_id)
        except ValueError as exc:
            raise await refuse(400, "bad_request", f"invalid device id: {exc}") from None
        existing = self.backend.device(device_id)
        if existing is not None:
            reason = f"device {device_id} already exists ({existing.status})"
            raise await refuse(409, "conflict", reason)
        try:
            cert = await asyncio.to_thread(
                self.backend.issue_certificate, csr_pem.encode(), device_id
            )
        except PkiError as exc:
            raise await refuse(400, "bad_request", str(exc)) from None
        provision = ProvisionDevice(
            command_id=f"provision-{device_id}-{cert.serial_number}",
            principal=principal,
            device_id=device_id,
            org=target.org,
            project=project,
            group=group,
            region=body.region,
            cert_serial=str(cert.serial_number),
            cert_fingerprint=cert_fingerprint_sha256(cert),
            firmware_version=body.firmware_version,
            labels=body.labels,
        )
        try:
            audit = await self._send(provision)
        except ApiError as error:
            # Refused (or unanswered): the certificate must not outlive the refusal.
            await asyncio.to_thread(
                self.backend.revoke_certificate,
                cert.serial_number,
                f"registry did not record the device: {error.reason}",
            )
            raise
        record = await self._settled(device_id, audit)
        return _reply(
            Provisioned,
            {
                "device_id": device_id,
                "certificate_pem": cert.public_bytes(Encoding.PEM).decode(),
                "ca_pem": self.backend.ca_pem.decode(),
                "device": None if record is None else device_view(record),
                "audit": audit.to_record(),
            },
            201,
        )

    async def update_device(self, request: web.Request) -> web.Response:
        principal = _CALLER.get()
        record = self._known_device(request)
        body = await _body(request, DeviceUpdate)
        group = body.group
        update = UpdateDevice(
            command_id=new_id("api-update"),
            principal=principal,
            device_id=record.device_id,
            group=group,
            region=body.region,
            firmware_version=body.firmware_version,
            labels=body.labels,
        )
        await self._authorize(
            principal, Action.device_update, record.resource,
            command="update", device_id=record.device_id,
        )  # fmt: skip
        if group is not None and group != record.group:
            try:
                moved = Resource(record.org, record.project, group, record.device_id)
            except ValueError as exc:
                raise ApiError(400, "bad_request", f"invalid group: {exc}") from None
            await self._authorize(
                principal, Action.device_update, moved,
                command="update", device_id=record.device_id,
            )  # fmt: skip
        return await self._command_result(record.device_id, await self._send(update))

    async def _lifecycle(self, request: web.Request, kind: CommandKind) -> web.Response:
        principal = _CALLER.get()
        record = self._known_device(request)
        reason = None
        if kind is not CommandKind.activate:  # activate takes no body
            reason = (await _body(request, LifecycleRequest)).reason
        command_id, device_id = new_id(f"api-{kind}"), record.device_id
        command: RegistryCommand
        if kind is CommandKind.suspend:
            command = SuspendDevice(
                command_id=command_id, principal=principal, device_id=device_id, reason=reason
            )
        elif kind is CommandKind.revoke:
            command = RevokeDevice(
                command_id=command_id, principal=principal, device_id=device_id, reason=reason
            )
        else:
            command = ActivateDevice(
                command_id=command_id, principal=principal, device_id=device_id
            )
        await self._authorize(
            principal, command.action, record.resource,
            command=str(kind), device_id=record.device_id,
        )  # fmt: skip
        audit = await self._send(command)
        if isinstance(command, RevokeDevice) and audit.decision is AuditDecision.applied:
            await asyncio.to_thread(
                self.backend.revoke_certificate,
                int(record.cert_serial),
                f"device revoked by {principal}" + (f": {reason}" if reason else ""),
            )
        return await self._command_result(record.device_id, audit)

    async def suspend_device(self, request: web.Request) -> web.Response:
        return await self._lifecycle(request, CommandKind.suspend)

    async def revoke_device(self, request: web.Request) -> web.Response:
        return await self._lifecycle(request, CommandKind.revoke)

    async def activate_device(self, request: web.Request) -> web.Response:
        return await self._lifecycle(request, CommandKind.activate)

    # ------------------------------------------------------------------ twins

    async def get_twin(self, request: web.Request) -> web.Response:
        principal = _CALLER.get()
        record = self._known_device(request)
        await self._authorize(
            principal, Action.twin_read, record.resource,
            command="twin.get", device_id=record.device_id,
        )  # fmt: skip
        twin = self.backend.twin(record.device_id) or Twin(record.device_id)
        return _reply(TwinModel, twin_view(twin))

    async def patch_twin(self, request: web.Request) -> web.Response:
        principal = _CALLER.get()
        record = self._known_device(request)
        body = await _body(request, TwinPatch)
        patch, version = dict(body.desired), body.version
        action, command = Action.twin_write, "twin.patch"
        decision = await self._authorize(
            principal, action, record.resource, command=command, device_id=record.device_id
        )
        if record.status is DeviceStatus.revoked:
            raise await self._refuse(
                principal, 409, "conflict", f"device {record.device_id} is revoked",
                command=command, action=action, resource=record.resource,
                device_id=record.device_id, decision=decision,
            )  # fmt: skip
        try:
            answer = await asyncio.to_thread(
                self.backend.set_desired, record.device_id, patch, version, str(principal)
            )
        except HotPathError as exc:
            raise ApiError(504, "timeout", str(exc)) from None
        outcome = {
            "accepted": AuditDecision.applied,
            "unchanged": AuditDecision.unchanged,
        }.get(answer.status, AuditDecision.refused)
        audit = await self._audit(
            principal,
            command=command,
            action=action,
            resource=record.resource,
            device_id=record.device_id,
            decision=outcome,
            authorization=decision.reason,
            reason=f"{answer.status} at version {answer.version}"
            + (f": {answer.detail}" if answer.detail else ""),
        )
        view = {**answer_view(answer), "audit": audit.to_record()}
        if answer.status == "conflict":
            reason = answer.detail or f"stale version: the twin is at version {answer.version}"
            raise ApiError(409, "conflict", reason, command_id=audit.command_id, **view)
        if answer.status not in ("accepted", "unchanged"):
            reason = answer.detail or "invalid desired patch"
            raise ApiError(400, "bad_request", reason, command_id=audit.command_id, **view)

        def caught_up() -> bool:
            twin = self.backend.twin(record.device_id)
            return twin is not None and twin.version >= answer.version

        await self.backend.wait_for(caught_up, SETTLE_TIMEOUT_S)
        twin = self.backend.twin(record.device_id) or Twin(record.device_id)
        return _reply(TwinAnswerModel, {**view, "twin": twin_view(twin)})

    # ------------------------------------------------------------------ grants

    @staticmethod
    def _grantee(request: web.Request) -> Principal:
        text = request.match_info["principal"]
        try:
            return Principal.parse(text)
        except ValueError as exc:
            raise ApiError(400, "bad_request", str(exc)) from None

    async def get_grants(self, request: web.Request) -> web.Response:
        principal = _CALLER.get()
        grantee = self._grantee(request)
        grants = self.backend.grants()
        held = grants.get(grantee.key)
        if held is None:
            try:
                held = GrantSet(grantee)
            except ValueError as exc:
                raise ApiError(400, "bad_request", str(exc)) from None
        if grantee == principal:
            return _reply(GrantSetModel, grants_view(held))
        visible = [
            g for g in held.grants if authorize(principal, Action.grant_read, g.scope, grants)
        ]
        return _reply(GrantSetModel, grants_view(held, visible))

    async def put_grants(self, request: web.Request) -> web.Response:
        principal = _CALLER.get()
        grantee = self._grantee(request)
        body = await _body(request, GrantsPut)
        try:
            wanted = GrantSet(
                grantee,
                tuple(Grant(grantee, Role(i.role), Resource.parse(i.scope)) for i in body.grants),
            )
        except ValueError as exc:
            raise ApiError(400, "bad_request", str(exc)) from None
        action, command = Action.grant_write, "grants.put"
        grants = self.backend.grants()
        current = grants.get(grantee.key) or GrantSet(grantee)
        added = sorted(set(wanted.grants) - set(current.grants), key=str)
        removed = sorted(set(current.grants) - set(wanted.grants), key=str)
        reasons: list[str] = []
        for grant in (*added, *removed):
            decision = await self._authorize(principal, action, grant.scope, command=command)
            if decision.reason not in reasons:
                reasons.append(decision.reason)
        scopes = {g.scope for g in (*added, *removed)}
        changes = [f"+{g.role} on {g.scope}" for g in added]
        changes += [f"-{g.role} on {g.scope}" for g in removed]
        audit = AuditRecord(
            ts_ms=now_ms(),
            command_id=new_id("api-grants"),
            command=command,
            principal=str(principal),
            action=str(action),
            device_id=None,
            resource=str(next(iter(scopes))) if len(scopes) == 1 else None,
            decision=AuditDecision.applied if changes else AuditDecision.unchanged,
            authorization="; ".join(reasons) or "nothing to authorize: no change",
            reason=f"grants of {grantee}: " + (", ".join(changes) or "unchanged"),
        )
        try:
            if changes:
                await asyncio.to_thread(self.backend.put_grants, wanted, audit)
            else:
                await asyncio.to_thread(self.backend.write_audit, audit)
        except HotPathError as exc:
            raise ApiError(504, "timeout", f"grants not written: {exc}") from None
        if changes:
            await self.backend.wait_for(
                lambda: self.backend.grants().get(grantee.key) == wanted, SETTLE_TIMEOUT_S
            )
        return _reply(GrantsResult, {**grants_view(wanted), "audit": audit.to_record()})

    # ------------------------------------------------------------------ alert rules

    def _scope_resource(self, scope_type: ScopeType, scope: str) -> Resource:
        """The resource a rule's scope names: a group's path, or a device's entry."""
        if scope_type is ScopeType.device:
            record = self.backend.device(scope)
            if record is None:
                raise ApiError(404, "not_found", f"unknown device {scope!r}")
            return record.resource
        try:
            resource = Resource.parse(scope)
        except ValueError as exc:
            raise ApiError(400, "bad_request", str(exc)) from None
        if resource.group is None or resource.device is not None:
            raise ApiError(400, "bad_request", f"a group scope names a group, got {scope!r}")
        return resource

    def _rule_resource(self, rule: AlertRule) -> Resource | None:
        try:
            return self._scope_resource(rule.scope_type, rule.scope)
        except ApiError:
            return None  # a rule on a device no longer registered: only admins of nothing see it

    def _known_rule(self, request: web.Request) -> tuple[AlertRule, Resource]:
        rule_id = request.match_info["rule_id"]
        rule = self.backend.rules().get(rule_id)
        resource = None if rule is None else self._rule_resource(rule)
        if rule is None or resource is None:
            raise ApiError(404, "not_found", f"unknown alert rule {rule_id!r}")
        return rule, resource

    def _rule_view(self, rule: AlertRule, resource: Resource) -> dict[str, Any]:
        return {**rule_to_record(rule), "resource": str(resource)}

    async def list_alert_rules(self, request: web.Request) -> web.Response:
        principal, grants = _CALLER.get(), self.backend.grants()
        visible = []
        for _, rule in sorted(self.backend.rules().items()):
            resource = self._rule_resource(rule)
            if resource is not None and authorize(principal, Action.alert_read, resource, grants):
                visible.append(self._rule_view(rule, resource))
        return _reply(RuleList, {"rules": visible})

    async def get_alert_rule(self, request: web.Request) -> web.Response:
        rule, resource = self._known_rule(request)
        await self._authorize(
            _CALLER.get(), Action.alert_read, resource, command="alert_rule.get",
            unknown=f"unknown alert rule {rule.rule_id!r}",
        )  # fmt: skip
        return _reply(AlertRuleModel, self._rule_view(rule, resource))

    async def _write_rule(
        self,
        principal: Principal,
        rule_id: str,
        rule: AlertRule | None,
        reasons: Sequence[str],
        resource: Resource,
        changed: bool,
    ) -> web.Response:
        command = "alert_rule.put" if rule is not None else "alert_rule.delete"
        audit = AuditRecord(
            ts_ms=now_ms(),
            command_id=new_id(f"api-{command}"),
            command=command,
            principal=str(principal),
            action=str(Action.alert_write),
            device_id=None,
            resource=str(resource),
            decision=AuditDecision.applied if changed else AuditDecision.unchanged,
            authorization="; ".join(dict.fromkeys(reasons)),
            reason=f"rule {rule_id} "
            + ("deleted" if rule is None else "stored")
            + ("" if changed else " (unchanged)"),
        )
        try:
            if changed:
                await asyncio.to_thread(self.backend.put_rule, rule_id, rule, audit)
            else:
                await asyncio.to_thread(self.backend.write_audit, audit)
        except HotPathError as exc:
            raise ApiError(504, "timeout", f"rule not written: {exc}") from None
        await self.backend.wait_for(
            lambda: self.backend.rules().get(rule_id) == rule, SETTLE_TIMEOUT_S
        )
        view = None if rule is None else self._rule_view(rule, resource)
        return _reply(RuleResult, {"rule_id": rule_id, "rule": view, "audit": audit.to_record()})

    async def put_alert_rule(self, request: web.Request) -> web.Response:
        principal, rule_id = _CALLER.get(), request.match_info["rule_id"]
        body = (await _body(request, AlertRuleBody)).root
        scope_type, scope = ScopeType(body.scope_type), body.scope
        resource = self._scope_resource(scope_type, scope)
        command = "alert_rule.put"
        hidden = f"unknown device {scope!r}" if scope_type is ScopeType.device else None
        decision = await self._authorize(
            principal, Action.alert_write, resource, command=command, unknown=hidden
        )
        # What the schema cannot say (clear_threshold against threshold) is checked here.
        rule = rule_from_body(rule_id, body.model_dump(mode="json", exclude_none=True))
        reasons = [decision.reason]
        current = self.backend.rules().get(rule_id)
        if current is not None and current != rule:
            # Replacing a rule takes it off its old scope too: that needs the right there as well.
            old = self._rule_resource(current)
            if old is not None and old != resource:
                taken = await self._authorize(principal, Action.alert_write, old, command=command)
                reasons.append(taken.reason)
        return await self._write_rule(
            principal, rule_id, rule, reasons, resource, changed=current != rule
        )

    async def delete_alert_rule(self, request: web.Request) -> web.Response:
        principal = _CALLER.get()
        rule, resource = self._known_rule(request)
        decision = await self._authorize(
            principal, Action.alert_write, resource, command="alert_rule.delete",
            unknown=f"unknown alert rule {rule.rule_id!r}",
        )  # fmt: skip
        return await self._write_rule(
            principal, rule.rule_id, None, [decision.reason], resource, changed=True
        )

    # ------------------------------------------------------------------ OTA rollouts

    def _known_rollout(self, request: web.Request) -> Rollout:
        rollout_id = request.match_info["rollout_id"]
        rollout = self.backend.rollouts().get(rollout_id)
        if rollout is None:
            raise ApiError(404, "not_found", f"unknown rollout {rollout_id!r}")
        return rollout

    async def list_rollouts(self, request: web.Request) -> web.Response:
        principal, grants = _CALLER.get(), self.backend.grants()
        visible = [
            rollout_summary(r)
            for _, r in sorted(self.backend.rollouts().items())
            if authorize(principal, Action.ota_read, r.target, grants)
        ]
        return _reply(RolloutList, {"rollouts": visible})

    async def get_rollout(self, request: web.Request) -> web.Response:
        rollout = self._known_rollout(request)
        await self._authorize(
            _CALLER.get(), Action.ota_read, rollout.target, command="ota.get",
            unknown=f"unknown rollout {rollout.rollout_id!r}",
        )  # fmt: skip
        return _reply(RolloutModel, rollout_summary(rollout))

    async def _ota_answer(
        self, rollout_id: str, kind: str, principal: Principal, **request: Any
    ) -> web.Response:
        """Send one request to the OTA controller; its decision maps to the status."""
        try:
            audit = await asyncio.to_thread(
                self.backend.ota_request, rollout_id, kind, principal, **request
            )
        except HotPathError as exc:
            raise ApiError(504, "timeout", str(exc)) from None
        extra = {"command_id": audit.command_id, "audit": audit.to_record()}
        if audit.decision is AuditDecision.denied:
            raise ApiError(403, "forbidden", audit.reason, **extra)
        if audit.decision is AuditDecision.refused:
            raise ApiError(409, "conflict", audit.reason, **extra)
        if audit.decision is AuditDecision.applied:
            await self.backend.wait_for(
                lambda: self.backend.rollouts().get(rollout_id) is not None, SETTLE_TIMEOUT_S
            )
        rollout = self.backend.rollouts().get(rollout_id)
        body = {
            "rollout_id": rollout_id,
            "rollout": None if rollout is None else rollout_summary(rollout),
            "audit": audit.to_record(),
        }
        created = kind == "create" and audit.decision is AuditDecision.applied
        return _reply(RolloutResult, body, 201 if created else 200)

    async def create_rollout(self, request: web.Request) -> web.Response:
        principal = _CALLER.get()
        body = await _body(request, RolloutCreate)
        artifact_id = body.artifact_id
        rollout_id = body.rollout_id or f"rollout-{uuid.uuid4().hex[:10]}"
        try:
            target = Resource.parse(body.target)
        except ValueError as exc:
            raise ApiError(400, "bad_request", str(exc)) from None
        # Decided here first (a 403 sends nothing), then again by the controller of record.
        await self._authorize(principal, Action.ota_create, target, command="ota.create")
        plan = plan_from_body(body.plan)
        return await self._ota_answer(
            rollout_id, "create", principal, artifact_id=artifact_id, target=str(target),
            plan=plan.to_record(), comment=body.comment,
        )  # fmt: skip

    async def _control(self, request: web.Request, kind: str, action: Action) -> web.Response:
        principal = _CALLER.get()
        rollout = self._known_rollout(request)
        body = await _body(request, RolloutControl)
        await self._authorize(
            principal, action, rollout.target, command=f"ota.{kind}",
            unknown=f"unknown rollout {rollout.rollout_id!r}",
        )  # fmt: skip
        return await self._ota_answer(rollout.rollout_id, kind, principal, comment=body.comment)

    async def approve_rollout(self, request: web.Request) -> web.Response:
        return await self._control(request, "approve", Action.ota_approve)

    async def reject_rollout(self, request: web.Request) -> web.Response:
        return await self._control(request, "reject", Action.ota_approve)

    async def pause_rollout(self, request: web.Request) -> web.Response:
        return await self._control(request, "pause", Action.ota_control)

    async def resume_rollout(self, request: web.Request) -> web.Response:
        return await self._control(request, "resume", Action.ota_control)

    async def abort_rollout(self, request: web.Request) -> web.Response:
        return await self._control(request, "abort", Action.ota_control)

    # ------------------------------------------------------------------ middleware

    @web.middleware
    async def errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """JSON bodies for every error, and a count of answers by status."""
        try:
            response = await handler(request)
        except ApiError as error:
            response = error.response()
        except web.HTTPException as exc:
            error_name = re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__[4:]).lower()
            response = ApiError(exc.status, error_name or "error", exc.reason).response()
            for name in ("Allow",):
                if name in exc.headers:
                    response.headers[name] = exc.headers[name]
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            response = ApiError(500, "internal", "internal error (see the API's log)").response()
        self.responses[response.status] += 1
        return response

    @web.middleware
    async def authenticate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every route but the public ones needs a valid bearer token."""
        if request.path in PUBLIC_PATHS:
            return await handler(request)
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "unauthorized", "a bearer token is required")
        try:
            _CALLER.set(self.tokens.verify(token.strip()))
        except TokenError as exc:
            raise ApiError(401, "unauthorized", str(exc)) from None
        return await handler(request)


API_KEY = web.AppKey("api", FleetApi)


def create_app(backend: Backend, tokens: TokenAuthority) -> web.Application:
    """The aiohttp application: ROUTES served by a FleetApi on ``backend``."""
    api = FleetApi(backend, tokens)
    app = web.Application(
        middlewares=[api.errors, api.authenticate], client_max_size=MAX_BODY_BYTES
    )
    app[API_KEY] = api
    for route in ROUTES:
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]] = getattr(api, route.name)
        app.router.add_route(route.method, route.path, handler, name=route.name)

    async def backend_running(_app: web.Application) -> AsyncIterator[None]:
        await backend.start()
        yield
        await backend.stop()

    app.cleanup_ctx.append(backend_running)
    return app


# --------------------------------------------------------------------------- the process


async def _report(settings: Settings, api: FleetApi, stopping: asyncio.Event) -> None:
    path = settings.run_dir / STATUS_FILE
    while True:
        write_status(
            path,
            {
                "pid": os.getpid(),
                "ready": api.backend.ready() and not stopping.is_set(),
                "address": f"http://{settings.host}:{settings.api_port}",
                "responses": {str(k): v for k, v in sorted(api.responses.items())},
                **api.backend.sizes(),
            },
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), _STATUS_EVERY_S)
        if stopping.is_set():
            return


async def serve(settings: Settings) -> None:
    """Serve on ``settings.host:settings.api_port`` until SIGTERM or SIGINT."""
    tokens = TokenAuthority.for_settings(settings)
    app = create_app(KafkaBackend(settings), tokens)
    runner = web.AppRunner(app, access_log=log)
    await runner.setup()  # the backend starts here: tables read to their end
    site = web.TCPSite(runner, settings.host, settings.api_port)
    await site.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    log.info("API on http://%s:%d", settings.host, settings.api_port)
    reporter = asyncio.create_task(_report(settings, app[API_KEY], stopping))
    await stopping.wait()
    await reporter
    await runner.cleanup()
    write_status(settings.run_dir / STATUS_FILE, {"pid": os.getpid(), "ready": False})


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = load_settings()
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(serve(settings))
    log.info("API stopped")


if __name__ == "__main__":
    main()
