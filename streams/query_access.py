"""Who may use the SQL port: platform tokens, decided by the ``rbac.grants`` table.

The cold worker, which owns the embedded warehouse, serves the query port
(:mod:`sinks.query_server`); this module gives it its :class:`~sinks.query_server.Authenticator`:

- a bearer token signed by the platform (:mod:`streams.tokens`, the API's tokens) names a user
  or service principal; it may query when it holds a grant whose role allows
  ``telemetry.read`` (:func:`streams.registry.rbac.authorize` on that grant's scope): deny by
  default, decided on the grants of the moment (``rbac.grants`` followed from Kafka, so a grant or a
  revocation applies within a second or so);
- the platform's own secret (:data:`sinks.query_server.PLATFORM_SECRET_FILE`, written at each
  start in the run folder, mode 0600) is the orchestrator: the platform's counts (`fleet demo`)
  and the operator's `fleet sql` on the machine that holds the platform's keys anyway.

Until the grants are read to their end the port answers 503 to token holders, rather than a
403 that a grant would contradict a moment later.

Rows are not yet limited to the grant's scope (the warehouse tables carry no organization yet):
any ``telemetry.read`` grant reads every row. Issue 14 adds the tenant columns and row filters.
"""

from __future__ import annotations

import hmac
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus

from confluent_kafka import Message
from confluent_kafka.schema_registry import SchemaRegistryClient

from infra.settings import Settings
from schemas.codec import CodecRegistry, Decoded, load_schema
from sinks.clickhouse import ClickHouseSink, ReadLimits
from sinks.query_server import (
    AccessDenied,
    Caller,
    QueryServer,
    start_query_server,
    write_platform_secret,
)
from streams.registry.rbac import (
    GRANT_SET_SCHEMA,
    ROLE_ACTIONS,
    Action,
    Decision,
    GrantSet,
    Principal,
    authorize,
)
from streams.tables import GlobalTable, key_text
from streams.tokens import TokenAuthority, TokenError

__all__ = [
    "GrantsFollower",
    "TokenAccess",
    "may_read_telemetry",
    "serve_warehouse_queries",
]

log = logging.getLogger("fleetstream.query_access")

GRANTS = "rbac.grants"
FOLLOW_IDLE_S = 0.2


def may_read_telemetry(principal: Principal, grants: Mapping[str, GrantSet]) -> Decision:
    """May ``principal`` use the SQL port? When a grant it holds allows ``telemetry.read`` on
    that grant's scope (the orchestrator always may). Pure; deny by default."""
    if principal.kind.value == "orchestrator":
        return Decision(True, "the orchestrator reads everything")
    held = grants.get(principal.key)
    for grant in held.grants if held is not None else ():
        if Action.telemetry_read in ROLE_ACTIONS[grant.role]:
            decision = authorize(principal, Action.telemetry_read, grant.scope, grants)
            if decision:
                return decision
    return Decision(False, f"{principal} holds no grant of telemetry.read")


@dataclass(frozen=True)
class TokenAccess:
    """The query port's authenticator (:class:`sinks.query_server.Authenticator`)."""

    tokens: TokenAuthority
    grants: Callable[[], Mapping[str, GrantSet] | None]  # None until read to the end
    platform_secret: str | None = None

    def authenticate(self, token: str | None) -> Caller:
        if token is None:
            raise AccessDenied(HTTPStatus.UNAUTHORIZED, "a bearer token is required")
        if self.platform_secret is not None and hmac.compare_digest(
            token.encode(), self.platform_secret.encode()
        ):
            return Caller("orchestrator", "the platform's own secret")
        try:
            principal = self.tokens.verify(token)
        except TokenError as exc:
            raise AccessDenied(HTTPStatus.UNAUTHORIZED, str(exc)) from None
        grants = self.grants()
        if grants is None:
            raise AccessDenied(
                HTTPStatus.SERVICE_UNAVAILABLE, "grants are still loading", str(principal)
            )
        decision = may_read_telemetry(principal, grants)
        if not decision:
            raise AccessDenied(HTTPStatus.FORBIDDEN, decision.reason, str(principal))
        return Caller(str(principal), decision.reason)


class GrantsFollower:
    """``rbac.grants`` read to its end, then followed, from a daemon thread."""

    def __init__(self, settings: Settings) -> None:
        registry = CodecRegistry(SchemaRegistryClient({"url": settings.registry_url}))
        self._codec = registry.codec(GRANTS, load_schema(GRANT_SET_SCHEMA))
        self._table = GlobalTable(settings, GRANTS, self._apply)
        self._lock = threading.Lock()
        self._grants: dict[str, GrantSet] = {}
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="query-grants", daemon=True)

    def start(self) -> GrantsFollower:
        self._thread.start()
        return self

    def grants(self) -> Mapping[str, GrantSet] | None:
        if not self._ready.is_set():
            return None
        with self._lock:
            return dict(self._grants)

    def _apply(self, msg: Message) -> None:
        key, value = key_text(msg), msg.value()
        decoded = self._codec.decode(value) if value is not None else None
        try:
            grants = GrantSet.from_record(decoded.record) if isinstance(decoded, Decoded) else None
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("%s %s at offset %d ignored: %s", GRANTS, key, msg.offset(), exc)
            grants = None
        with self._lock:
            if grants is None:
                self._grants.pop(key, None)
            else:
                self._grants[key] = grants

    def _follow(self) -> None:
        while not self._stopping.is_set():
            try:
                if not self._ready.is_set():
                    applied = self._table.catch_up()
                    self._ready.set()
                    log.info("%s read to its end: %d records", GRANTS, applied)
                if not self._table.poll():
                    self._stopping.wait(FOLLOW_IDLE_S)
            except Exception:  # Kafka away, a timeout: keep the last grants, try again
                log.exception("following %s failed; retrying", GRANTS)
                self._stopping.wait(2.0)

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)
        self._table.close()


def serve_warehouse_queries(settings: Settings) -> QueryServer:
    """The stack's query port on ``settings.host:settings.query_port``: reads of the warehouse
    with the configured limits, for callers holding ``telemetry.read`` (and the platform)."""
    limits = ReadLimits(
        timeout_s=settings.query_timeout_s, max_memory_bytes=settings.query_max_memory_bytes
    )
    reader = ClickHouseSink(settings.warehouse_dsn, limits=limits)
    follower = GrantsFollower(settings).start()
    access = TokenAccess(
        TokenAuthority.for_settings(settings),
        follower.grants,
        write_platform_secret(settings.run_dir),
    )

    def close() -> None:
        follower.close()
        reader.close()

    try:
        return start_query_server(reader, settings.host, settings.query_port, access, close)
    except OSError:
        close()
        raise
