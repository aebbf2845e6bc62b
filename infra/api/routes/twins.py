"""Twins: read a device's twin, patch its desired state."""

from __future__ import annotations

import asyncio

from aiohttp import web

from infra.api.client import HotPathError
from infra.api.models import Twin as TwinModel
from infra.api.models import TwinAnswer as TwinAnswerModel
from infra.api.models import TwinPatch
from infra.api.routes.base import (
    CALLER,
    COMMAND_ERRORS,
    SETTLE_TIMEOUT_S,
    ApiError,
    Handlers,
    Route,
    answer_view,
    reply,
)
from streams.registry.devices import AuditDecision, DeviceStatus
from streams.registry.rbac import Action
from streams.twin import Twin, twin_view

__all__ = ["ROUTES", "TwinRoutes"]


class TwinRoutes(Handlers):
    """Twins: read a device's twin, patch its desired state."""

    async def get_twin(self, request: web.Request) -> web.Response:
        principal = CALLER.get()
        record = self._known_device(request)
        await self._authorize(
            principal, Action.twin_read, record.resource,
            command="twin.get", device_id=record.device_id,
        )  # fmt: skip
        twin = self.backend.twin(record.device_id) or Twin(record.device_id)
        return reply(TwinModel, twin_view(twin))

    async def patch_twin(self, request: web.Request) -> web.Response:
        principal = CALLER.get()
        record = self._known_device(request)
        body = await self._body(request, TwinPatch)
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
        return reply(TwinAnswerModel, {**view, "twin": twin_view(twin)})


ROUTES: tuple[Route, ...] = (
    Route(
        "GET", "/v1/devices/{device_id}/twin", "get_twin",
        "A device's twin: desired, reported, delta, version",
        Action.twin_read, result=TwinModel, errors=(404,),
    ),
    Route(
        "PATCH", "/v1/devices/{device_id}/twin", "patch_twin",
        "Merge a patch into the desired state (optimistic concurrency with `version`)",
        Action.twin_write, body=TwinPatch, result=TwinAnswerModel, errors=COMMAND_ERRORS,
    ),
)  # fmt: skip
