"""The durable event spool: every event, by seq, in SQLite (WAL) under the state directory.

It is the EventBus's first sink. `append` only queues (the agent's loop never waits on the
disk unless the bounded queue is full); one writer thread commits the queue in batches and
only then raises `committed`, the highest seq a subscriber may read. So an event is durable
(against a crash of the agent: WAL with synchronous=NORMAL) before any subscriber sees it.

Subscribers read from the database by seq, never from per-subscriber queues, so a slow
one holds no agent memory and cannot slow anyone else.

The spool is bounded by size and age; what it drops is counted, so a subscriber resuming
from before the oldest event held learns exactly how many it missed. seq numbers come from
agent.events.sequence (blocks reserved on disk); the unused rest of a block after a restart
is recorded as a gap, so gaps are never counted as lost events.
"""
from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from agent.events.model import Event, EventKind

log = logging.getLogger("egress_warden")

SPOOL_FILE = "events.db"
_BATCH = 2048
_QUEUE = 65536
_PRUNE_EVERY_SECONDS = 1.0
_RETRY_SECONDS = 1.0
_PRUNE_TO = 0.9  # a size prune frees down to this share of max_bytes, so it runs seldom
# A stop waits this long for a failing disk; then what is still queued stays unwritten, and the
# next start reports its seqs as a gap (a stop that never ends is killed by systemd anyway).
CLOSE_GIVES_UP_SECONDS = 10.0
_STOP = None

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
  seq INTEGER PRIMARY KEY, time REAL NOT NULL, kind TEXT NOT NULL,
  workload TEXT, pid INTEGER, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS gaps (first INTEGER PRIMARY KEY, last INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class Filters:
    workloads: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()
    pid: int = 0

    def sql(self) -> tuple[str, list]:
        clauses, args = [], []
        for column, values in (("workload", self.workloads), ("kind", self.kinds)):
            if values:
                clauses.append(f"{column} IN ({','.join('?' * len(values))})")
                args.extend(values)
        if self.pid:
            clauses.append("pid = ?")
            args.append(self.pid)
        return "".join(f" AND {c}" for c in clauses), args


@dataclass(frozen=True)
class SpoolFigures:
    path: str
    events: int
    bytes: int
    oldest_seq: int
    newest_seq: int
    max_bytes: int
    max_age_seconds: float
    dropped: int


@dataclass(frozen=True)
class CrashGap:
    """seqs the previous agent may have handed out but had not yet written when it died."""
    first: int
    last: int

    def event(self) -> Event:
        return Event(EventKind.EVENTS_LOST, detail={
            "count": None, "at_most": self.last - self.first + 1, "first_seq": self.first, "last_seq": self.last,
            "where": "the previous agent stopped without a clean shutdown: events it published in its "
                     "last moments may be missing from the spool (the events file has them)"})


@dataclass(frozen=True)
class Page:
    lost: int  # events the bound dropped before the subscriber read them
    last_lost: int
    rows: list[tuple[int, str]]  # (seq, JSON body)


class SpoolAhead(Exception):
    """The spool holds seqs this run would hand out again."""


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    return db


class Spool:
    def __init__(self, state_dir: Path, *, first_seq: int, max_bytes: int, max_age_seconds: float) -> None:
        self.path = Path(state_dir) / SPOOL_FILE
        self.max_bytes = max_bytes
        self.max_age_seconds = max_age_seconds
        self._queue: queue.Queue = queue.Queue(maxsize=_QUEUE)
        self._changed = threading.Condition()
        self._closed = False
        self._give_up_at: float | None = None  # set by close()
        self._gave_up = False
        db = _connect(self.path)
        db.executescript(_SCHEMA)
        self._high = self._meta(db, "high_seq")
        if first_seq <= self._high:
            db.close()
            raise SpoolAhead(f"the spool holds events up to seq {self._high} but this run would start at "
                             f"seq {first_seq}: seq numbers would repeat (was the seq file removed? write "
                             f"{self._high} into it to continue after the spool)")
        self.crash_gap = self._record_restart_gap(db, first_seq)
        self.committed = self._high
        self._count, self._bytes, self._oldest = db.execute(
            "SELECT count(*), coalesce(sum(length(body)), 0), coalesce(min(seq), 0) FROM events").fetchone()
        self._dropped = self._meta(db, "dropped")
        db.execute("DELETE FROM meta WHERE key = 'clean_close'")
        self._writer_db = db
        self._writer = threading.Thread(target=self._write_loop, name="spool-writer", daemon=True)
        self._writer.start()

    @staticmethod
    def _meta(db: sqlite3.Connection, key: str) -> int:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else 0

    def _record_restart_gap(self, db: sqlite3.Connection, first_seq: int) -> CrashGap | None:
        """seqs between the last one written and the first of this run are never events
        the spool will hold. After a clean stop they were never used; after a crash some
        may have been published and not yet written: that is reported, once."""
        if first_seq - 1 <= self._high:
            return None
        clean = db.execute("SELECT value FROM meta WHERE key = 'clean_close'").fetchone() is not None
        db.execute("INSERT OR REPLACE INTO gaps VALUES (?, ?)", (self._high + 1, first_seq - 1))
        if clean or self._high == 0:  # a new spool: the seqs before it are history, not a crash
            return None
        return CrashGap(self._high + 1, first_seq - 1)

    # --- writing (the bus's first sink) ---------------------------------------------------

    def append(self, event: Event) -> None:
        pid = event.process.pid if event.process else None
        self._queue.put((event.seq, event.time, event.kind.value, event.workload, pid, event.to_json()))

    def _write_loop(self) -> None:
        next_prune = 0.0
        while True:
            try:  # wake now and then even when idle: the age bound applies to a quiet agent too
                batch = [self._queue.get(timeout=_PRUNE_EVERY_SECONDS)]
            except queue.Empty:
                batch = []
            while batch and len(batch) < _BATCH and batch[-1] is not _STOP:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stopping = bool(batch) and batch[-1] is _STOP
            rows = batch[:-1] if stopping else batch
            if rows and not self._commit_until_it_works(rows):
                return
            if time.monotonic() >= next_prune or self._bytes > self.max_bytes:
                next_prune = time.monotonic() + _PRUNE_EVERY_SECONDS
                try:
                    self._prune()
                except sqlite3.Error as e:
                    self._rollback()
                    log.error("spool %s: cannot drop old events: %s", self.path, e)
            if stopping:
                return

    def _commit_until_it_works(self, rows: list[tuple]) -> bool:
        """A full or failing disk must not lose events: the batch is retried, and meanwhile
        the bounded queue fills and holds the agent's event loop back (the kernel keeps
        enforcing; what its ring buffer cannot hold is counted and reported as events_lost).
        False once a stop has waited CLOSE_GIVES_UP_SECONDS for it."""
        failures = 0
        while True:
            try:
                self._commit(rows)
                if failures:
                    log.warning("spool %s: writing again after %d failed attempt(s)", self.path, failures)
                return True
            except sqlite3.Error as e:
                self._rollback()
                if not failures:
                    log.error("spool %s: cannot write events (%s); retrying every %.0f s", self.path, e,
                              _RETRY_SECONDS)
                failures += 1
                if self._give_up_at is not None and time.monotonic() >= self._give_up_at:
                    self._gave_up = True
                    log.error("spool %s: stopping with seqs %d-%d and what followed them unwritten (%s); "
                              "the next start reports them as a gap", self.path, rows[0][0], rows[-1][0], e)
                    return False
                time.sleep(_RETRY_SECONDS)

    def _rollback(self) -> None:
        if self._writer_db.in_transaction:
            self._writer_db.execute("ROLLBACK")

    def _commit(self, rows: list[tuple]) -> None:
        db = self._writer_db
        db.execute("BEGIN")
        db.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?)", rows)
        db.execute("INSERT OR REPLACE INTO meta VALUES ('high_seq', ?)", (rows[-1][0],))
        db.execute("COMMIT")
        self._count += len(rows)
        self._bytes += sum(len(r[5]) for r in rows)
        self._oldest = self._oldest or rows[0][0]
        with self._changed:
            self._high = self.committed = rows[-1][0]
            self._changed.notify_all()

    def _prune(self) -> None:
        db = self._writer_db
        upto = self._seq_older_than(db, time.time() - self.max_age_seconds)
        if self._bytes > self.max_bytes:
            upto = max(upto or 0, self._seq_freeing(db, self._bytes - int(self.max_bytes * _PRUNE_TO)))
        if not upto:
            return
        db.execute("BEGIN")
        count, size = db.execute(
            "SELECT count(*), coalesce(sum(length(body)), 0) FROM events WHERE seq <= ?", (upto,)).fetchone()
        db.execute("DELETE FROM events WHERE seq <= ?", (upto,))
        db.execute("INSERT OR REPLACE INTO meta VALUES ('dropped', ?)", (self._dropped + count,))
        db.execute("COMMIT")
        self._dropped += count
        self._count -= count
        self._bytes -= size
        self._oldest = db.execute("SELECT coalesce(min(seq), 0) FROM events").fetchone()[0]
        log.info("spool: dropped %d event(s) up to seq %d (bound: %d bytes, %.0f s)",
                 count, upto, self.max_bytes, self.max_age_seconds)

    @staticmethod
    def _seq_older_than(db: sqlite3.Connection, cutoff: float) -> int:
        """The last seq before the first event at or after `cutoff`. Events are in time order
        by seq, so this reads only the events to drop, never the whole spool (the writer
        commits nothing while it prunes)."""
        oldest = db.execute("SELECT seq, time FROM events ORDER BY seq LIMIT 1").fetchone()
        if oldest is None or oldest[1] >= cutoff:
            return 0
        first_kept = db.execute("SELECT seq FROM events WHERE time >= ? ORDER BY seq LIMIT 1", (cutoff,)).fetchone()
        return first_kept[0] - 1 if first_kept else db.execute("SELECT max(seq) FROM events").fetchone()[0]

    @staticmethod
    def _seq_freeing(db: sqlite3.Connection, excess: int) -> int:
        freed = 0
        for seq, size in db.execute("SELECT seq, length(body) FROM events ORDER BY seq"):
            freed += size
            if freed >= excess:
                return seq
        return 0

    def close(self) -> None:
        """Write everything queued, then mark the stop as clean; on a disk that keeps failing,
        give up after CLOSE_GIVES_UP_SECONDS, unmarked."""
        self._give_up_at = time.monotonic() + CLOSE_GIVES_UP_SECONDS
        while self._writer.is_alive():  # a full queue behind a failing disk takes no more until it gives up
            try:
                self._queue.put(_STOP, timeout=0.5)
                break
            except queue.Full:
                continue
        self._writer.join()
        if not self._gave_up:
            self._writer_db.execute("INSERT OR REPLACE INTO meta VALUES ('clean_close', ?)", (self._high,))
        self._writer_db.close()
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    # --- reading (subscribers) -----------------------------------------------------------

    def wait_beyond(self, seq: int, timeout: float) -> bool:
        """Wait until an event after `seq` is durable; False on timeout or close."""
        with self._changed:
            return self._changed.wait_for(lambda: self.committed > seq or self._closed, timeout) and not self._closed

    @property
    def closed(self) -> bool:
        return self._closed

    def reader(self) -> "SpoolReader":
        return SpoolReader(self)

    def figures(self) -> SpoolFigures:
        return SpoolFigures(str(self.path), self._count, self._bytes, self._oldest if self._count else 0,
                            self.committed, self.max_bytes, self.max_age_seconds, self._dropped)


class SpoolReader:
    """One subscriber's read-only connection (WAL lets readers run beside the writer)."""

    def __init__(self, spool: Spool) -> None:
        self._spool = spool
        self._db = _connect(spool.path)

    def __enter__(self) -> "SpoolReader":
        return self

    def __exit__(self, *_: object) -> None:
        self._db.close()

    page = 512

    def page_after(self, seq: int, filters: Filters, upto: int) -> "Page":
        """What a subscriber that has read up to `seq` gets next: how many events after it the
        bound dropped (reported, then skipped), and up to `page` of the events after those that
        pass `filters`, up to `upto` (at most `committed`: only durable events are read). Both
        come from one snapshot, so a prune between them can neither hide a loss nor count a
        held event as lost."""
        self._db.execute("BEGIN")
        try:
            lost, last_lost = self.lost_after(seq)
            return Page(lost, last_lost, self.after(max(seq, last_lost), filters, upto))
        finally:
            self._db.execute("COMMIT")

    def after(self, seq: int, filters: Filters, upto: int) -> list[tuple[int, str]]:
        """Up to `page` events with `seq` < seq <= `upto` that pass `filters`, in seq order."""
        where, args = filters.sql()
        return self._db.execute(
            f"SELECT seq, body FROM events WHERE seq > ? AND seq <= ?{where} ORDER BY seq LIMIT ?",
            [seq, upto, *args, self.page]).fetchall()

    def lost_after(self, seq: int) -> tuple[int, int]:
        """(how many events after `seq` the bound dropped, the last dropped seq)."""
        last = self._last_dropped()
        if seq >= last:
            return 0, 0
        gap_seqs = sum(
            min(g_last, last) - max(g_first, seq + 1) + 1
            for g_first, g_last in self._db.execute(
                "SELECT first, last FROM gaps WHERE last > ? AND first <= ?", (seq, last)))
        return last - seq - gap_seqs, last

    def _last_dropped(self) -> int:
        """The seq before the oldest event held; with none held, the newest written (all are gone)."""
        oldest = self._db.execute("SELECT min(seq) FROM events").fetchone()[0]
        return oldest - 1 if oldest else Spool._meta(self._db, "high_seq")

    def seq_before_time(self, since: float) -> int:
        row = self._db.execute("SELECT seq FROM events WHERE time >= ? ORDER BY seq LIMIT 1", (since,)).fetchone()
        return row[0] - 1 if row else self._spool.committed

    def seq_before_last(self, count: int, filters: Filters) -> int:
        where, args = filters.sql()
        row = self._db.execute(
            f"SELECT seq FROM events WHERE seq <= ?{where} ORDER BY seq DESC LIMIT 1 OFFSET ?",
            [self._spool.committed, *args, count - 1]).fetchone()
        return row[0] - 1 if row else self._last_dropped()  # fewer held: all of them, nothing lost

