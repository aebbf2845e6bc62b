"""OTA rollouts: list, read, create, approve, reject, pause, resume, abort."""

from __future__ import annotations

import asyncio
import uuid

from aiohttp import web

from infra.api.client import HotPathError
from infra.api.models import Rollout as RolloutModel
from infra.api.models import (
    RolloutControl,
    RolloutCreate,
    RolloutList,
    RolloutPlanBody,
    RolloutResult,
)
from infra.api.routes.base import CALLER, SETTLE_TIMEOUT_S, ApiError, Handlers, Route, reply
from streams.ota.events import OtaRequest
from streams.ota.model import Rollout
from streams.ota.plan import RolloutPlan
from streams.ota.summary import rollout_summary
from streams.registry.devices import AuditDecision
from streams.registry.rbac import Action, Principal, Resource, authorize

__all__ = ["ROUTES", "OtaRoutes", "plan_from_body"]


def plan_from_body(given: RolloutPlanBody | None) -> RolloutPlan:
    """A rollout plan from a request's `plan` (absent: the default plan)."""
    if given is None:
        return RolloutPlan()
    try:
        return RolloutPlan(**given.model_dump())
    except (TypeError, ValueError) as exc:  # what a schema cannot say (ascending shares...)
        raise ApiError(400, "bad_request", f"invalid plan: {exc}") from None


class OtaRoutes(Handlers):
    """OTA rollouts: list, read, create, approve, reject, pause, resume, abort."""

    def _known_rollout(self, request: web.Request) -> Rollout:
        rollout_id = request.match_info["rollout_id"]
        rollout = self.backend.rollouts().get(rollout_id)
        if rollout is None:
            raise ApiError(404, "not_found", f"unknown rollout {rollout_id!r}")
        return rollout

    async def list_rollouts(self, request: web.Request) -> web.Response:
        principal, grants = CALLER.get(), self.backend.grants()
        visible = [
            rollout_summary(r)
            for _, r in sorted(self.backend.rollouts().items())
            if authorize(principal, Action.ota_read, r.target, grants)
        ]
        return reply(RolloutList, {"rollouts": visible})

    async def get_rollout(self, request: web.Request) -> web.Response:
        rollout = self._known_rollout(request)
        await self._authorize(
            CALLER.get(), Action.ota_read, rollout.target, command="ota.get",
            unknown=f"unknown rollout {rollout.rollout_id!r}",
        )  # fmt: skip
        return reply(RolloutModel, rollout_summary(rollout))

    async def _ota_answer(self, ask: OtaRequest, principal: Principal) -> web.Response:
        """Send one request to the OTA controller; its decision maps to the status."""
        rollout_id, kind = ask.rollout_id, ask.kind
        try:
            audit = await asyncio.to_thread(self.backend.ota_request, ask, principal)
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
        return reply(RolloutResult, body, 201 if created else 200)

    async def create_rollout(self, request: web.Request) -> web.Response:
        principal = CALLER.get()
        body = await self._body(request, RolloutCreate)
        artifact_id = body.artifact_id
        rollout_id = body.rollout_id or f"rollout-{uuid.uuid4().hex[:10]}"
        try:
            target = Resource.parse(body.target)
        except ValueError as exc:
            raise ApiError(400, "bad_request", str(exc)) from None
        # Decided here first (a 403 sends nothing), then again by the controller of record.
        await self._authorize(principal, Action.ota_create, target, command="ota.create")
        plan = plan_from_body(body.plan)
        ask = OtaRequest(
            rollout_id=rollout_id, kind="create", artifact_id=artifact_id, target=str(target),
            plan=plan.to_record(), comment=body.comment,
        )  # fmt: skip
        return await self._ota_answer(ask, principal)

    async def _control(self, request: web.Request, kind: str, action: Action) -> web.Response:
        principal = CALLER.get()
        rollout = self._known_rollout(request)
        body = await self._body(request, RolloutControl)
        await self._authorize(
            principal, action, rollout.target, command=f"ota.{kind}",
            unknown=f"unknown rollout {rollout.rollout_id!r}",
        )  # fmt: skip
        ask = OtaRequest(rollout_id=rollout.rollout_id, kind=kind, comment=body.comment)
        return await self._ota_answer(ask, principal)

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


ROUTES: tuple[Route, ...] = (
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
