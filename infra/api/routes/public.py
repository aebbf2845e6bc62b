"""The public routes: the OpenAPI document and the health check (no token)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from infra.api.models import Health
from infra.api.routes.base import Handlers, Route, reply

__all__ = ["ROUTES", "PublicRoutes"]


class PublicRoutes(Handlers):
    """The public routes: the OpenAPI document and the health check (no token)."""

    document: dict[str, Any]  # the OpenAPI document, set by FleetApi

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(self.document)

    async def healthz(self, request: web.Request) -> web.Response:
        ready = self.backend.ready()
        return reply(
            Health, {"status": "ok" if ready else "starting", "ready": ready}, 200 if ready else 503
        )


ROUTES: tuple[Route, ...] = (
    Route("GET", "/openapi.json", "openapi", "This OpenAPI document", public=True),
    Route("GET", "/healthz", "healthz", "Liveness and readiness", public=True, result=Health),
)  # fmt: skip
