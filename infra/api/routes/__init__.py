"""The API's routes, one module per resource; :data:`ROUTES` is the route table, in the order
the OpenAPI document lists them. Each module holds its routes and the handlers that serve them
(a :class:`~infra.api.routes.base.Handlers` subclass); :class:`infra.api.app.FleetApi` is all
of them."""

from __future__ import annotations

from infra.api.routes import alert_rules, devices, grants, ota, public, twins
from infra.api.routes.base import Route

__all__ = ["ROUTES"]

ROUTES: tuple[Route, ...] = (
    *public.ROUTES,
    *devices.ROUTES,
    *twins.ROUTES,
    *grants.ROUTES,
    *alert_rules.ROUTES,
    *ota.ROUTES,
)
