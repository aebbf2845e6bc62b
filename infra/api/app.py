"""`python -m infra.api.app`: the platform's HTTP API for devices, grants, twins, alert rules
and OTA rollouts: the aiohttp application and the process.

Every call but ``GET /openapi.json`` and ``GET /healthz`` carries a bearer token signed by the
platform (:mod:`streams.registry.tokens`); a missing or invalid one is a 401. The handler then asks
:func:`streams.registry.rbac.authorize` (the one decision function) whether the caller may do
the route's action on the resource concerned, *before* doing anything (a 403 otherwise). Errors
are JSON:
``{"error": "unauthorized|forbidden|bad_request|not_found|conflict|timeout|...", "reason": ...}``.

State is read from the compacted topics, followed in memory (``registry.devices``,
``rbac.grants``, ``twin.state``, ``alerts.rules``, ``ota.rollouts``:
:class:`streams.runtime.tables.GlobalTables`, one reader); changes go through Kafka
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
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Handler

from infra.api.backend import Backend, KafkaBackend
from infra.api.dashboard.routes import DASHBOARD_PUBLIC_PATHS, add_dashboard, dashboard_source
from infra.api.metrics import ApiMetrics
from infra.api.openapi import openapi_document
from infra.api.routes import ROUTES
from infra.api.routes.alert_rules import AlertRuleRoutes
from infra.api.routes.base import CALLER, ApiError
from infra.api.routes.devices import DeviceRoutes
from infra.api.routes.grants import GrantRoutes
from infra.api.routes.ota import OtaRoutes
from infra.api.routes.public import PublicRoutes
from infra.api.routes.twins import TwinRoutes
from infra.keys import token_authority
from infra.lag import LagProbe
from infra.metrics import serve_process_metrics
from infra.settings import Settings, load_settings
from streams.registry.tokens import TokenAuthority, TokenError
from streams.runtime.status import write_status

__all__ = ["API_KEY", "FleetApi", "create_app", "main", "serve"]

log = logging.getLogger("fleetstream.api")

STATUS_FILE = "api.json"
PUBLIC_PATHS = frozenset({"/openapi.json", "/healthz", *DASHBOARD_PUBLIC_PATHS})
MAX_BODY_BYTES = 256 * 1024
_STATUS_EVERY_S = 1.0


class FleetApi(PublicRoutes, DeviceRoutes, TwinRoutes, GrantRoutes, AlertRuleRoutes, OtaRoutes):
    """The route handlers of every resource; each authenticates (middleware) then authorizes
    first."""

    def __init__(self, backend: Backend, tokens: TokenAuthority) -> None:
        super().__init__(backend, tokens, ROUTES)
        self.document = openapi_document()
        self.metrics = ApiMetrics()

    # ------------------------------------------------------------------ middleware

    @web.middleware
    async def errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """JSON bodies for every error, and a count of answers by status."""
        started = time.perf_counter()
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
        self.metrics.observe(request, response.status, time.perf_counter() - started)
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
            CALLER.set(self.tokens.verify(token.strip()))
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
    tokens = token_authority(settings)
    backend = KafkaBackend(settings)
    app = create_app(backend, tokens)
    add_dashboard(app, backend, dashboard_source(settings, backend))  # GET /dashboard
    runner = web.AppRunner(app, access_log=log)
    await runner.setup()  # the backend starts here: tables read to their end
    site = web.TCPSite(runner, settings.host, settings.api_port)
    await site.start()
    # The stack's consumer lag for the metrics, one probe per stack: here, not in the
    # supervisor, so a Kafka client that crashes takes down a process the supervisor restarts.
    from infra.stack import LAG_GROUPS  # the stack's services import the API's settings

    lag = LagProbe(settings.bootstrap_servers, LAG_GROUPS)
    probing = threading.Event()
    if settings.process_metrics_port:
        lag.start(probing)
    serve_process_metrics(settings, app[API_KEY].metrics.metrics, lag.metrics)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    log.info("API on http://%s:%d", settings.host, settings.api_port)
    reporter = asyncio.create_task(_report(settings, app[API_KEY], stopping))
    await stopping.wait()
    await reporter
    probing.set()
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
