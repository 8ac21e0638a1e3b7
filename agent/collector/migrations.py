"""The store's schema, as ordered migrations the collector applies itself.

`schema_version` records every migration applied; a store opened by an older collector
than the schema it finds refuses to run rather than write rows it does not understand.
Append new migrations at the end; never edit one that has shipped."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class SchemaError(RuntimeError):
    pass


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    sqlite: tuple[str, ...]
    postgres: tuple[str, ...]


# The primary key (agent, seq) makes inserts idempotent and answers both "the resume
# point of an agent" (max seq) and queries by agent. Queries by workload and kind come
# with a time window or order, so those indexes lead with the filter and end with time.
# The body is the agent's JSON line as text, not JSONB: measured here, parsing it into
# JSONB on insert costs a third of PostgreSQL's insert rate; `body::jsonb` in a query
# still reaches inside.
_INDEXES = (
    "CREATE INDEX events_time ON events (time)",
    "CREATE INDEX events_workload_time ON events (workload, time)",
    "CREATE INDEX events_kind_time ON events (kind, time)",
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1, "events keyed by (agent, seq), indexed by time, workload and kind",
        sqlite=(
            """CREATE TABLE events (
                 agent TEXT NOT NULL, seq INTEGER NOT NULL, time REAL NOT NULL, kind TEXT NOT NULL,
                 workload TEXT, pid INTEGER, body TEXT NOT NULL,
                 PRIMARY KEY (agent, seq)) WITHOUT ROWID""",
            *_INDEXES),
        postgres=(
            """CREATE TABLE events (
                 agent TEXT NOT NULL, seq BIGINT NOT NULL, time DOUBLE PRECISION NOT NULL,
                 kind TEXT NOT NULL, workload TEXT, pid INTEGER, body TEXT NOT NULL,
                 PRIMARY KEY (agent, seq))""",
            *_INDEXES),
    ),
)

LATEST = MIGRATIONS[-1].version


def migrate(cursor: Any, dialect: str, placeholder: str, apply: bool = True) -> list[int]:
    """Brings the schema up to LATEST inside the caller's (locked) transaction; returns the versions
    applied. With apply=False (a reader) it only checks that the schema is the one this code knows."""
    if apply:
        cursor.execute("CREATE TABLE IF NOT EXISTS schema_version ("
                       "version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at TEXT NOT NULL)")
    cursor.execute("SELECT max(version) FROM schema_version")
    current = cursor.fetchone()[0] or 0
    if current > LATEST:
        raise SchemaError(f"the store's schema is version {current}, newer than this collector knows "
                          f"({LATEST}): upgrade Egress Warden before writing to it")
    if not apply:
        if current < LATEST:
            raise SchemaError(f"the store's schema is version {current}, older than this version of Egress "
                              f"Warden reads ({LATEST}): run `warden collector` on it once to migrate it")
        return []
    applied = []
    for migration in MIGRATIONS:
        if migration.version <= current:
            continue
        for statement in getattr(migration, dialect):
            cursor.execute(statement)
        cursor.execute(f"INSERT INTO schema_version VALUES ({placeholder}, {placeholder}, CURRENT_TIMESTAMP)",
                       (migration.version, migration.description))
        applied.append(migration.version)
    return applied
