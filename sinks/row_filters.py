"""Row filters: what part of the tenant tables a caller of the SQL port may see (pure).

A caller's grants of ``telemetry.read`` name scopes (an organization, a project, a group, a
device: :data:`Scope`, its names). Every read of the caller runs on a connection whose
``additional_table_filters`` limits each table of :data:`FILTERED_TABLES` to rows of those
scopes (:func:`table_filters`), set before ``readonly=1``, so no query can lift them; no scope
at all gives ``0``: nothing. The platform itself reads unfiltered (:data:`EVERY_ROW`).

On a ClickHouse server the same scoping is a set of row policies, one per table, for the
caller's ClickHouse user or role (:func:`row_policies`, regenerated when grants change).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias

from sinks.sql_guard import sql_string
from sinks.warehouse_tables import ROLLUP_TABLES, TENANT_TABLES

__all__ = [
    "EVERY_ROW",
    "FILTERED_TABLES",
    "NO_ROW",
    "ReadScope",
    "Scope",
    "row_policies",
    "scope_condition",
    "table_filters",
    "tenant_filter",
]

# The tables whose rows carry a tenant, and the materialized view that reads as its rollup
# (a view over them, such as ota_device_events, is filtered through the table it reads).
FILTERED_TABLES: Final = frozenset(TENANT_TABLES | ROLLUP_TABLES | {"telemetry_1m_mv"})
_COLUMNS: Final = ("org", "project", "`group`", "device_id")


# A node of the hierarchy a grant names, as its names from the organization down: ("acme",),
# ("acme", "plant-1"), ... (streams.registry.rbac.Resource.names).
Scope: TypeAlias = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ReadScope:
    """How a caller's reads run: the scopes it may see (None: every row, the platform's own
    reads) and whether tables are read FINAL (each message once; the default)."""

    scopes: tuple[Scope, ...] | None = None
    final: bool = True


EVERY_ROW: Final = ReadScope()
NO_ROW: Final = ReadScope(scopes=())


def scope_condition(scope: Scope) -> str:
    """The rows of one scope, e.g. ``org = 'acme' AND project = 'plant'``."""
    return " AND ".join(
        f"{column} = {sql_string(name)}" for column, name in zip(_COLUMNS, scope, strict=False)
    )


def tenant_filter(scopes: Sequence[Scope]) -> str:
    """The rows of any of ``scopes`` (``0``: none)."""
    conditions = sorted({f"({scope_condition(scope)})" for scope in scopes})
    return " OR ".join(conditions) if conditions else "0"


def table_filters(scopes: Sequence[Scope], tables: frozenset[str] = FILTERED_TABLES) -> str:
    """The ``additional_table_filters`` value: each table, under its name and qualified by the
    database, limited to ``scopes``."""
    condition = sql_string(tenant_filter(scopes))
    entries = [f"{sql_string(table)}: {condition}" for table in sorted(tables)]
    entries += [f"{sql_string('default.' + table)}: {condition}" for table in sorted(tables)]
    return "{" + ", ".join(entries) + "}"


def row_policies(
    grantee: str,
    scopes: Sequence[Scope],
    database: str = "default",
    tables: frozenset[str] = TENANT_TABLES | ROLLUP_TABLES,
) -> list[str]:
    """The row policies that give ClickHouse user or role ``grantee`` the rows of ``scopes`` in
    each table of ``database`` (a server's equivalent of :func:`table_filters`)."""
    condition = tenant_filter(scopes)
    return [
        f"CREATE ROW POLICY OR REPLACE `fleet_{table}_{grantee}` ON {database}.{table} "
        f"FOR SELECT USING {condition} TO `{grantee}`"
        for table in sorted(tables)
    ]
