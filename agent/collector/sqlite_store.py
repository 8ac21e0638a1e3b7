"""The embedded store: one SQLite file in WAL mode (readers never block the writer)."""
from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterable

from agent.collector import migrations
from agent.collector.query import EventQuery, select_sql
from agent.collector.rows import COLUMNS, EventRow, NewRows

_INSERT = (f"INSERT INTO events ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))}) "
           "ON CONFLICT (agent, seq) DO NOTHING")


class SqliteStore:
    """Thread-safe: one connection behind a lock, since SQLite has one writer at a time anyway."""

    def __init__(self, path: Path, create: bool = True) -> None:
        self.description = f"sqlite:{path}"
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        elif not path.is_file():
            raise FileNotFoundError(f"{self.description}: no such store (a collector creates it)")
        self._lock = threading.Lock()
        try:
            self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
            self._conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode loses at most the last commits on power loss, never consistency;
            # the collector resumes from what is stored, so the agent's spool resends them.
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self.migrations_applied = self._migrate(create)
        except sqlite3.Error as e:
            raise sqlite3.Error(f"{self.description}: {e}") from None

    def _migrate(self, apply: bool) -> list[int]:
        with self._lock, self._transaction() as cursor:
            return migrations.migrate(cursor, "sqlite", "?", apply)

    def _transaction(self) -> "_Transaction":
        return _Transaction(self._conn)

    def insert(self, rows: Iterable[EventRow], before_commit: NewRows | None = None) -> list[EventRow]:
        """Stores the rows not stored yet, in one transaction; returns those that were new."""
        new = []
        with self._lock, self._transaction() as cursor:
            for row in rows:
                cursor.execute(_INSERT, row)
                if cursor.rowcount == 1:
                    new.append(row)
            if before_commit is not None and new:
                before_commit(new)
        return new

    def resume_point(self, agent: str) -> int:
        with self._lock:
            value = self._conn.execute("SELECT max(seq) FROM events WHERE agent = ?", (agent,)).fetchone()[0]
        return value or 0

    def query(self, query: EventQuery) -> list[dict[str, Any]]:
        sql, params = select_sql(query, "?")
        with self._lock:
            return [json.loads(body) for (body,) in self._conn.execute(sql, params)]

    def count(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT count(*) FROM events").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class _Transaction:
    """BEGIN IMMEDIATE takes the write lock up front, so a second writer waits instead of failing mid-way."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._cursor = conn.cursor()

    def __enter__(self) -> sqlite3.Cursor:
        self._cursor.execute("BEGIN IMMEDIATE")
        return self._cursor

    def __exit__(self, kind, *_) -> None:
        self._cursor.execute("COMMIT" if kind is None else "ROLLBACK")
        self._cursor.close()
