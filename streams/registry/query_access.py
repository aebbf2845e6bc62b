"""Who may use the SQL port: platform tokens, decided by the ``rbac.grants`` table.

The cold worker, which owns the embedded warehouse, serves the query port
(:mod:`sinks.query_server`); this module gives it its :class:`~sinks.query_server.Authenticator`:

- a bearer token signed by the platform (:mod:`streams.registry.tokens`, the API's tokens)
  names a user or service principal; it may query when it holds a grant whose role allows
  ``telemetry.read`` (:func:`streams.registry.rbac.authorize` on that grant's scope): deny by
  default, decided on the grants of the moment (``rbac.grants`` followed from Kafka, so a grant or a
  revocation applies within a second or so);
- the platform's own secret (:data:`sinks.query_server.PLATFORM_SECRET_FILE`, written at each
  start in the run folder, mode 0600) is the orchestrator: the platform's counts (`fleet demo`)
  and the operator's `fleet sql` on the machine that holds the platform's keys anyway.

Until the grants are read to their end the port answers 503 to token holders, rather than a
403 that a grant would contradict a moment later.

The composition root (``infra/process.py``) builds the :class:`QueryPortConfig` from the
settings: endpoints, limits and paths, never the settings themselves.

Rows are limited to the caller's granted scopes: each request's :class:`Caller` carries the
scopes of its ``telemetry.read`` grants (:func:`telemetry_scopes`), which the warehouse applies
as row filters on every tenant table (:mod:`sinks.row_filters`); the platform reads every row.
"""

from __future__ import annotations

import hmac
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

from confluent_kafka import Message
from confluent_kafka.schema_registry import SchemaRegistryClient

from schemas.codec import CodecRegistry, Decoded, load_schema
from sinks.clickhouse import ClickHouseSink, ReadLimits
from sinks.query_server import (
    AccessDenied,
    Caller,
    QueryServer,
    start_query_server,
    write_platform_secret,
)
from sinks.row_filters import EVERY_ROW, ReadScope, Scope
from streams.registry.rbac import (
    GRANT_SET_SCHEMA,
    ROLE_ACTIONS,
    Action,
    Decision,
    GrantSet,
    Principal,
    authorize,
)
from streams.registry.tokens import TokenAuthority, TokenError
from streams.runtime.clients import KafkaConfig
from streams.runtime.tables import FOLLOW_WAIT_S, GlobalTable, key_text

__all__ = [
    "GrantsFollower",
    "QueryPortConfig",
    "TokenAccess",
    "may_read_telemetry",
    "serve_warehouse_queries",
    "telemetry_scopes",
]

log = logging.getLogger("fleetstream.query_access")

GRANTS = "rbac.grants"


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


def telemetry_scopes(principal: Principal, grants: Mapping[str, GrantSet]) -> tuple[Scope, ...]:
    """The scopes whose rows ``principal`` may read: those of its grants that allow
    ``telemetry.read`` there (none: it sees no row). Pure."""
    held = grants.get(principal.key)
    scopes: list[Scope] = []
    for grant in held.grants if held is not None else ():
        if Action.telemetry_read not in ROLE_ACTIONS[grant.role]:
            continue
        if authorize(principal, Action.telemetry_read, grant.scope, grants):
            scopes.append(grant.scope.names)
    return tuple(scopes)


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
            return Caller("orchestrator", "the platform's own secret", EVERY_ROW)
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
        # The rows of its granted scopes only, decided on the grants of this request.
        scope = ReadScope(telemetry_scopes(principal, grants))
        return Caller(str(principal), decision.reason, scope)


class GrantsFollower:
    """``rbac.grants`` read to its end, then followed, from a daemon thread."""

    def __init__(self, kafka: KafkaConfig) -> None:
        registry = CodecRegistry(SchemaRegistryClient({"url": kafka.registry_url}))
        self._codec = registry.codec(GRANTS, load_schema(GRANT_SET_SCHEMA))
        self._table = GlobalTable(kafka, GRANTS, self._apply)
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
                self._table.poll(FOLLOW_WAIT_S)  # a record ends the wait at once
            except Exception:  # Kafka away, a timeout: keep the last grants, try again
                log.exception("following %s failed; retrying", GRANTS)
                self._stopping.wait(2.0)

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)
        self._table.close()


@dataclass(frozen=True)
class QueryPortConfig:
    """What the query port needs; ``infra/process.py`` builds it from the settings."""

    kafka: KafkaConfig  # where ``rbac.grants`` is followed from (and its schema registry)
    host: str
    port: int
    warehouse_dsn: str
    limits: ReadLimits
    token_dir: Path  # the platform's token-signing key (:meth:`TokenAuthority.load_or_create`)
    run_dir: Path  # where the platform's secret is written at each start


def serve_warehouse_queries(config: QueryPortConfig) -> QueryServer:
    """The stack's query port on ``config.host:config.port``: reads of the warehouse with the
    configured limits, for callers holding ``telemetry.read`` (and the platform)."""
    reader = ClickHouseSink(config.warehouse_dsn, limits=config.limits)
    follower = GrantsFollower(config.kafka).start()
    access = TokenAccess(
        TokenAuthority.load_or_create(config.token_dir),
        follower.grants,
        write_platform_secret(config.run_dir),
    )

    def close() -> None:
        follower.close()
        reader.close()

    try:
        return start_query_server(reader, config.host, config.port, access, close)
    except OSError:
        close()
        raise
