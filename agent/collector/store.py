"""Opens the event store a URL names: SQLite (a path or sqlite:PATH) or PostgreSQL (postgresql://...)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Protocol

from agent.collector.query import EventQuery
from agent.collector.rows import EventRow, NewRows


class EventStore(Protocol):
    description: str

    def insert(self, rows: Iterable[EventRow], before_commit: NewRows | None = None) -> list[EventRow]:
        """Stores rows idempotently by (agent, seq) in one transaction; returns the rows that were
        not stored before, after handing them to `before_commit` (if given) inside the transaction."""

    def resume_point(self, agent: str) -> int:
        """The highest seq stored for `agent` (0 if none): read from the store, which several collectors may share."""

    def query(self, query: EventQuery) -> list[dict[str, Any]]:
        """The stored events matching `query`, oldest first."""

    def count(self) -> int: ...

    def close(self) -> None: ...


def open_store(url: str, create: bool = True) -> EventStore:
    """The store at `url`, its schema created or migrated; with create=False (a reader) an
    absent or outdated store is refused instead."""
    if url.startswith(("postgresql://", "postgres://")):
        from agent.collector.postgres_store import PostgresStore
        return PostgresStore(url, create)
    if "://" in url and not url.startswith("sqlite://"):
        raise ValueError(f"store URL {url.split('://')[0]}://...: use a file path, sqlite:PATH or postgresql://...")
    from agent.collector.sqlite_store import SqliteStore
    path = url.removeprefix("sqlite://") if url.startswith("sqlite://") else url.removeprefix("sqlite:")
    return SqliteStore(Path(path), create)
