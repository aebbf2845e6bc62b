"""What the routes of every resource share: the route table's entry (:class:`Route`), the
error answer (:class:`ApiError`), the caller of the request (:data:`CALLER`), the views, and
:class:`Handlers`, the steps every handler takes (authorize first, audit, wait until the
API's own table shows a change)."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from infra.api.backend import Backend
from infra.api.client import HotPathError, TwinAnswer
from infra.api.models import BodyError, CommandResult, M, parse_body
from streams.registry.devices import AuditDecision, AuditRecord, DeviceRecord, RegistryCommand
from streams.registry.rbac import (
    Action,
    Decision,
    Grant,
    GrantSet,
    Principal,
    PrincipalKind,
    Resource,
    authorize,
)
from streams.registry.tokens import TokenAuthority

__all__ = [
    "CALLER",
    "COMMAND_ERRORS",
    "SETTLE_TIMEOUT_S",
    "ApiError",
    "Handlers",
    "Route",
    "answer_view",
    "device_view",
    "grants_view",
    "member_of",
    "new_id",
    "now_ms",
    "reply",
]

SETTLE_TIMEOUT_S = 10.0  # how long an answer waits for the API's table to show its change

# Who calls: set by the authentication middleware in the request's own task, read by handlers.
CALLER: ContextVar[Principal] = ContextVar("caller")


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


def member_of(principal: Principal, org: str, grants: Mapping[str, GrantSet]) -> bool:
    """The principal holds some grant in organization ``org`` (the orchestrator: in all)."""
    if principal.kind is PrincipalKind.orchestrator:
        return True
    held = grants.get(principal.key)
    return held is not None and any(g.scope.org == org for g in held.grants)


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


COMMAND_ERRORS = (400, 404, 409, 503, 504)


def reply(model: type[BaseModel], payload: Mapping[str, Any], status: int = 200) -> web.Response:
    """``payload`` sent as its documented ``model``: what is served is what is documented."""
    document = model.model_validate(payload).model_dump(mode="json")
    return web.json_response(document, status=status)


class Handlers:
    """What every resource's handlers share: the backend, the token authority, the routes, and
    the steps of a call (authorize, audit, refuse, send a registry command, wait until the
    change shows). :class:`infra.api.app.FleetApi` is the handlers of every resource."""

    def __init__(self, backend: Backend, tokens: TokenAuthority, routes: Sequence[Route]) -> None:
        self.backend = backend
        self.tokens = tokens
        self.routes = {route.name: route for route in routes}
        self.responses: Counter[int] = Counter()

    async def _body(self, request: web.Request, model: type[M]) -> M:
        """The request's body as ``model``, which must be the route's documented body (whether it
        is required too), or a 400."""
        route = self.routes[request.match_info.route.name or ""]
        if route.body is not model:  # a programming error, caught by any test of the route
            raise TypeError(f"{route.name} documents {route.body}, validates with {model}")
        try:
            return parse_body(await request.read(), model, required=route.body_required)
        except BodyError as exc:
            raise ApiError(400, "bad_request", str(exc)) from None

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
            forbidden = await self._refuse(
                principal, 403, "forbidden", decision.reason, command=command, action=action,
                resource=resource, device_id=device_id, decision=decision,
                audited=AuditDecision.denied,
            )  # fmt: skip
            if unknown is not None and not member_of(principal, resource.org, grants):
                raise ApiError(404, "not_found", unknown)
            raise forbidden
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
        audited: AuditDecision = AuditDecision.refused,
    ) -> ApiError:
        """An allowed change refused by the API itself (bad CSR, id taken...), audited as
        ``audited`` (:meth:`_authorize` audits its denials here too)."""
        audit = await self._audit(
            principal,
            command=command,
            action=action,
            resource=resource,
            device_id=device_id,
            decision=audited,
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
        return reply(
            CommandResult,
            {
                "device": None if record is None else device_view(record),
                "audit": audit.to_record(),
            },
        )
