"""The OpenAPI 3.1 document of the API, generated from its route table (:data:`ROUTES`) and
its pydantic models (:func:`infra.api.models.component_schemas`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from infra.api.models import MAX_JSON_DEPTH, PRINCIPAL_PATTERN, component_schemas
from infra.api.routes import ROUTES
from infra.api.routes.base import Route

__all__ = ["API_VERSION", "OPENAPI_VERSION", "openapi_document"]

OPENAPI_VERSION = "3.1.0"
API_VERSION = "1.0.0"

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
        description += f" Needs `{route.action}` (streams.registry.rbac.authorize)."
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
