"""The fleet store: PostgreSQL, where several collectors may write to one database.

Inserts COPY a batch into a per-connection temporary table and move it with one
INSERT ... SELECT ... ON CONFLICT DO NOTHING: one round trip per batch, and the primary
key (agent, seq) keeps every event once whichever collector stores it first. Rows are
moved in key order so two collectors inserting overlapping batches lock in the same
order and never deadlock."""
from __future__ import annotations

import json
import threading
from typing import Any, Iterable

import psycopg

from agent.collector import migrations
from agent.collector.query import EventQuery, select_sql
from agent.collector.rows import COLUMNS, EventRow, NewRows

# Any constant both collectors agree on: it serialises schema migrations across them.
_MIGRATION_LOCK = 0x65775F6D  # "ew_m"
_COLUMN_LIST = ", ".join(COLUMNS)
_INCOMING = ("CREATE TEMP TABLE incoming (agent TEXT, seq BIGINT, time DOUBLE PRECISION, kind TEXT, "
             "workload TEXT, pid INTEGER, body TEXT) ON COMMIT DELETE ROWS")
_MOVE = (f"INSERT INTO events ({_COLUMN_LIST}) SELECT {_COLUMN_LIST} "
         "FROM incoming ORDER BY agent, seq "
         "ON CONFLICT (agent, seq) DO NOTHING RETURNING agent, seq")


class PostgresStore:
    """Thread-safe: each thread gets its own connection, made again after the server drops it."""

    def __init__(self, url: str, create: bool = True) -> None:
        self._url = url
        self.description = redact(url)
        self._local = threading.local()
        self._connections: list[psycopg.Connection] = []
        self._connections_lock = threading.Lock()
        self.migrations_applied = self._migrate(create)

    def _connect(self) -> psycopg.Connection:
        try:
            return psycopg.connect(self._url, connect_timeout=10)
        except psycopg.OperationalError as error:
            raise psycopg.OperationalError(f"{self.description}: {str(error).strip()}") from None
        except psycopg.ProgrammingError:
            # Its message quotes the URL's bad part, which may be the password.
            raise psycopg.ProgrammingError(
                f"{self.description}: the store URL cannot be read; a user or password holding % @ : / "
                "must be percent-encoded (%25 %40 %3A %2F)") from None

    def _migrate(self, apply: bool) -> list[int]:
        with self._connect() as conn, conn.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            try:
                return migrations.migrate(cursor, "postgres", "%s", apply)
            except psycopg.errors.UndefinedTable:
                raise migrations.SchemaError(f"{self.description}: no events store here (a collector creates it)") from None

    def _connection(self) -> psycopg.Connection:
        old = getattr(self._local, "conn", None)
        if old is not None and not old.closed and not old.broken:
            return old
        conn = self._connect()
        conn.execute(_INCOMING)
        conn.commit()
        self._local.conn = conn
        with self._connections_lock:
            if old is not None:
                self._connections.remove(old)
                old.close()
            self._connections.append(conn)
        return conn

    def insert(self, rows: Iterable[EventRow], before_commit: NewRows | None = None) -> list[EventRow]:
        """Stores the rows not stored yet, in one transaction; returns those that were new."""
        rows = list(rows)
        if not rows:
            return []
        conn = self._connection()
        with conn.transaction(), conn.cursor() as cursor:
            with cursor.copy(f"COPY incoming ({_COLUMN_LIST}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            cursor.execute(_MOVE)
            stored = set(cursor.fetchall())
            new = [row for row in rows if (row.agent, row.seq) in stored]
            if before_commit is not None and new:
                before_commit(new)
        return new

    def resume_point(self, agent: str) -> int:
        conn = self._connection()
        with conn.transaction():
            value = conn.execute("SELECT max(seq) FROM events WHERE agent = %s", (agent,)).fetchone()[0]
        return value or 0

    def query(self, query: EventQuery) -> list[dict[str, Any]]:
        sql, params = select_sql(query, "%s")
        conn = self._connection()
        with conn.transaction():
            return [json.loads(body) for (body,) in conn.execute(sql, params)]

    def count(self) -> int:
        conn = self._connection()
        with conn.transaction():
            return conn.execute("SELECT count(*) FROM events").fetchone()[0]

    def close(self) -> None:
        with self._connections_lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unparsable URL)"
    host = info.get("host", "localhost")
    port = f":{info['port']}" if "port" in info else ""
    user = f"{info['user']}@" if "user" in info else ""
    return f"postgresql://{user}{host}{port}/{info.get('dbname', '')}"
