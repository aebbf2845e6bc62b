"""The fleet dashboard's routes on the API: a browser page, not part of the JSON API (so not in
its route table or OpenAPI document).

- ``GET /dashboard``: the page (public: it holds no data; it signs in with a platform token);
- ``GET /dashboard/echarts.min.js``: the vendored chart library (public);
- ``GET /dashboard/data``: the data document (:mod:`infra.api.dashboard.shape`), authenticated
  like every API call (bearer token) and authorized with the one RBAC decision function: the
  fleet-wide view needs ``telemetry.read`` on every organization that has devices (the
  platform's own token has it). A denial is audited, like every denied read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from aiohttp import web

from infra.api.backend import Backend
from infra.api.dashboard.collect import DashboardSource
from infra.api.dashboard.page import ECHARTS_PATH, asset, live_page
from infra.api.routes.base import CALLER, ApiError, new_id, now_ms
from infra.settings import Settings
from streams.hot.twin import Twin
from streams.ota.model import Rollout
from streams.registry.devices import AuditDecision, AuditRecord, DeviceRecord
from streams.registry.rbac import (
    Action,
    GrantSet,
    Principal,
    PrincipalKind,
    Resource,
    authorize,
)

__all__ = [
    "DASHBOARD_PUBLIC_PATHS",
    "DATA_PATH",
    "PAGE_PATH",
    "add_dashboard",
    "dashboard_source",
    "may_view",
]

PAGE_PATH = "/dashboard"
DATA_PATH = "/dashboard/data"
DASHBOARD_PUBLIC_PATHS = frozenset({PAGE_PATH, ECHARTS_PATH})
_ACTION = Action.telemetry_read


class Source(Protocol):
    def snapshot(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class _BackendTables:
    """The API's in-memory tables as the dashboard reads them."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def devices(self) -> Sequence[DeviceRecord]:
        return self.backend.devices()

    def twins(self) -> Iterable[Twin]:
        for record in self.backend.devices():
            twin = self.backend.twin(record.device_id)
            if twin is not None:
                yield twin

    def rollouts(self) -> Mapping[str, Rollout]:
        return self.backend.rollouts()


def dashboard_source(settings: Settings, backend: Backend) -> DashboardSource:
    """The live source of the API process: its tables, the warehouse and Kafka."""
    return DashboardSource(settings, _BackendTables(backend))


def may_view(
    principal: Principal, devices: Sequence[DeviceRecord], grants: Mapping[str, GrantSet]
) -> tuple[bool, str]:
    """The fleet-wide view: ``telemetry.read`` on every organization that has devices (and on
    one at least: a caller with no grant sees nothing)."""
    orgs = sorted({d.org for d in devices})
    for org in orgs:
        decision = authorize(principal, _ACTION, Resource(org), grants)
        if not decision.allowed:
            return False, decision.reason
    if not orgs:
        held = grants.get(principal.key)
        scopes = [g.scope for g in held.grants] if held is not None else []
        if principal.kind is not PrincipalKind.orchestrator and not any(
            authorize(principal, _ACTION, scope, grants).allowed for scope in scopes
        ):
            return False, f"{principal} holds no grant with {_ACTION}"
    return True, f"{principal} may read telemetry of every organization"


class _Dashboard:
    def __init__(self, backend: Backend, source: Source) -> None:
        self.backend = backend
        self.source = source
        self.page = live_page()
        self.echarts = asset("echarts.min.js")

    async def page_handler(self, request: web.Request) -> web.Response:
        return web.Response(
            text=self.page,
            content_type="text/html",
            headers={
                "Cache-Control": "no-store",
                "Content-Security-Policy": (
                    "default-src 'none'; script-src 'self' 'unsafe-inline'; "
                    "style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; "
                    "form-action 'none'; frame-ancestors 'none'"
                ),
                "Referrer-Policy": "no-referrer",
            },
        )

    async def echarts_handler(self, request: web.Request) -> web.Response:
        return web.Response(
            text=self.echarts,
            content_type="text/javascript",
            headers={"Cache-Control": "max-age=86400"},
        )

    async def data_handler(self, request: web.Request) -> web.Response:
        principal = CALLER.get()
        allowed, reason = may_view(principal, self.backend.devices(), self.backend.grants())
        if not allowed:
            record = AuditRecord(
                ts_ms=now_ms(),
                command_id=new_id("api-dashboard"),
                command="dashboard",
                principal=str(principal),
                action=str(_ACTION),
                device_id=None,
                resource=None,
                decision=AuditDecision.denied,
                authorization=reason,
                reason=reason,
            )
            await asyncio.to_thread(self.backend.write_audit, record)
            raise ApiError(403, "forbidden", reason)
        document = await asyncio.to_thread(self.source.snapshot)
        return web.json_response(document, headers={"Cache-Control": "no-store"})


def add_dashboard(app: web.Application, backend: Backend, source: Source) -> None:
    """Serve the dashboard on ``app`` (before it starts); ``source`` is closed with it."""
    dashboard = _Dashboard(backend, source)
    app.router.add_get(PAGE_PATH, dashboard.page_handler, name="dashboard")
    app.router.add_get(ECHARTS_PATH, dashboard.echarts_handler, name="dashboard_echarts")
    app.router.add_get(DATA_PATH, dashboard.data_handler, name="dashboard_data")

    async def close(_app: web.Application) -> None:
        await asyncio.to_thread(source.close)

    app.on_cleanup.append(close)
