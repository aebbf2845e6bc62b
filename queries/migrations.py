"""Versioned warehouse DDL: ``queries/ddl/NNN_name.sql``, applied in order, each once.

The sink applies what is missing on start and records it in ``schema_migrations``
(version, name, applied_at). Statements use ``IF NOT EXISTS``, so a migration interrupted
between its DDL and its record, or applied by two processes at once, is harmless to re-run.
A recorded version is immutable: a file renamed under an applied version is an error.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from queries.sqltext import split_statements

__all__ = [
    "APPLIED_SQL",
    "DDL_DIR",
    "MIGRATIONS_DDL",
    "MIGRATIONS_TABLE",
    "RECORD_SQL",
    "Migration",
    "MigrationError",
    "load_migrations",
    "pending_migrations",
]

DDL_DIR = Path(__file__).resolve().parent / "ddl"
MIGRATIONS_TABLE = "schema_migrations"
MIGRATIONS_DDL = f"""
CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE}
(
    version    UInt32,
    name       String,
    applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
ORDER BY version
""".strip()

APPLIED_SQL = "SELECT version, name FROM schema_migrations FINAL"
RECORD_SQL = (
    "INSERT INTO schema_migrations (version, name) VALUES ({version:UInt32}, {name:String})"
)

_FILE_NAME = re.compile(r"^(\d{3,})_([a-z0-9_]+)\.sql$")


class MigrationError(RuntimeError):
    """The DDL folder or the recorded migrations are inconsistent."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


def parse_migration(path: Path) -> Migration:
    """One ``NNN_name.sql`` file as its version, name and statements."""
    match = _FILE_NAME.match(path.name)
    if not match:
        raise MigrationError(f"{path.name}: DDL files are named NNN_name.sql (lower case)")
    statements = tuple(split_statements(path.read_text(encoding="utf-8")))
    if not statements:
        raise MigrationError(f"{path.name}: no statement")
    return Migration(int(match.group(1)), match.group(2), statements)


def load_migrations(folder: Path = DDL_DIR) -> tuple[Migration, ...]:
    """Every migration in ``folder``, by version; versions must be unique."""
    migrations = sorted((parse_migration(p) for p in folder.glob("*.sql")), key=lambda m: m.version)
    versions = [m.version for m in migrations]
    duplicated = sorted({v for v in versions if versions.count(v) > 1})
    if duplicated:
        raise MigrationError(f"duplicate migration version(s) {duplicated} in {folder}")
    return tuple(migrations)


def pending_migrations(
    migrations: Iterable[Migration], applied: dict[int, str]
) -> tuple[Migration, ...]:
    """The migrations not yet applied, in order; ``applied`` maps version to recorded name."""
    pending = []
    for migration in migrations:
        recorded = applied.get(migration.version)
        if recorded is None:
            pending.append(migration)
        elif recorded != migration.name:
            raise MigrationError(
                f"migration {migration.version} was applied as {recorded!r} but the file "
                f"is now {migration.name!r}: applied versions are immutable, add a new one"
            )
    return tuple(pending)
