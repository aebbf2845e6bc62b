"""Alert rules: list, read, add or replace, delete."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from aiohttp import web

from infra.api.client import HotPathError
from infra.api.models import AlertRule as AlertRuleModel
from infra.api.models import AlertRuleBody, RuleList, RuleResult
from infra.api.routes.base import (
    CALLER,
    SETTLE_TIMEOUT_S,
    ApiError,
    Handlers,
    Route,
    new_id,
    now_ms,
    reply,
)
from streams.alerts import AlertRule, ScopeType, rule_from_record, rule_to_record
from streams.registry.devices import AuditDecision, AuditRecord
from streams.registry.rbac import Action, Principal, Resource, authorize

__all__ = ["ROUTES", "AlertRuleRoutes", "rule_from_body"]


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


class AlertRuleRoutes(Handlers):
    """Alert rules: list, read, add or replace, delete."""

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
        principal, grants = CALLER.get(), self.backend.grants()
        visible = []
        for _, rule in sorted(self.backend.rules().items()):
            resource = self._rule_resource(rule)
            if resource is not None and authorize(principal, Action.alert_read, resource, grants):
                visible.append(self._rule_view(rule, resource))
        return reply(RuleList, {"rules": visible})

    async def get_alert_rule(self, request: web.Request) -> web.Response:
        rule, resource = self._known_rule(request)
        await self._authorize(
            CALLER.get(), Action.alert_read, resource, command="alert_rule.get",
            unknown=f"unknown alert rule {rule.rule_id!r}",
        )  # fmt: skip
        return reply(AlertRuleModel, self._rule_view(rule, resource))

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
        return reply(RuleResult, {"rule_id": rule_id, "rule": view, "audit": audit.to_record()})

    async def put_alert_rule(self, request: web.Request) -> web.Response:
        principal, rule_id = CALLER.get(), request.match_info["rule_id"]
        body = (await self._body(request, AlertRuleBody)).root
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
        principal = CALLER.get()
        rule, resource = self._known_rule(request)
        decision = await self._authorize(
            principal, Action.alert_write, resource, command="alert_rule.delete",
            unknown=f"unknown alert rule {rule.rule_id!r}",
        )  # fmt: skip
        return await self._write_rule(
            principal, rule.rule_id, None, [decision.reason], resource, changed=True
        )


ROUTES: tuple[Route, ...] = (
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
)  # fmt: skip
