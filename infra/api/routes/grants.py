"""Grants: read and replace a principal's grants."""

from __future__ import annotations

import asyncio

from aiohttp import web

from infra.api.client import HotPathError
from infra.api.models import GrantSet as GrantSetModel
from infra.api.models import GrantsPut, GrantsResult
from infra.api.routes.base import (
    CALLER,
    SETTLE_TIMEOUT_S,
    ApiError,
    Handlers,
    Route,
    grants_view,
    new_id,
    now_ms,
    reply,
)
from streams.registry.devices import AuditDecision, AuditRecord
from streams.registry.rbac import Action, Grant, GrantSet, Principal, Resource, Role, authorize

__all__ = ["ROUTES", "GrantRoutes"]


class GrantRoutes(Handlers):
    """Grants: read and replace a principal's grants."""

    @staticmethod
    def _grantee(request: web.Request) -> Principal:
        text = request.match_info["principal"]
        try:
            return Principal.parse(text)
        except ValueError as exc:
            raise ApiError(400, "bad_request", str(exc)) from None

    async def get_grants(self, request: web.Request) -> web.Response:
        principal = CALLER.get()
        grantee = self._grantee(request)
        grants = self.backend.grants()
        held = grants.get(grantee.key)
        if held is None:
            try:
                held = GrantSet(grantee)
            except ValueError as exc:
                raise ApiError(400, "bad_request", str(exc)) from None
        if grantee == principal:
            return reply(GrantSetModel, grants_view(held))
        visible = [
            g for g in held.grants if authorize(principal, Action.grant_read, g.scope, grants)
        ]
        return reply(GrantSetModel, grants_view(held, visible))

    async def put_grants(self, request: web.Request) -> web.Response:
        principal = CALLER.get()
        grantee = self._grantee(request)
        body = await self._body(request, GrantsPut)
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
        return reply(GrantsResult, {**grants_view(wanted), "audit": audit.to_record()})


ROUTES: tuple[Route, ...] = (
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
)  # fmt: skip
