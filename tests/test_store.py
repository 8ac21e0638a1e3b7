"""The collector's stores, SQLite and a real PostgreSQL server: schema, idempotency, resume, queries."""
import threading

import psycopg
import pytest

from agent.collector import migrations
from agent.collector.jsonl import JsonLinesOutput
from agent.collector.postgres_store import redact
from agent.collector.query import EventQuery, parse_since
from agent.collector.rows import row_from_event
from agent.collector.store import open_store


def event(agent: str, seq: int, *, kind: str = "egress_denied", workload: str | None = "wa",
          pid: int | None = 100, time: float | None = None) -> dict:
    return {"agent": agent, "seq": seq, "time": 1_700_000_000.0 + seq if time is None else time,
            "kind": kind, "workload": workload, "process": {"pid": pid} if pid else None,
            "destination": {"ip": "198.18.2.66", "port": 443, "protocol": "tcp", "fqdn": None},
            "verdict": "deny", "action": None, "bytes": None, "detail": {"note": "ünïcode"}}


def rows(agent: str, seqs, **fields):
    return [row_from_event(event(agent, seq, **fields)) for seq in seqs]


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "events.db")
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(store_url):
    opened = open_store(store_url)
    yield opened
    opened.close()


def test_schema_is_created_from_empty_and_not_reapplied(store_url):
    first = open_store(store_url)
    assert first.migrations_applied == [m.version for m in migrations.MIGRATIONS]
    first.close()
    second = open_store(store_url)
    assert second.migrations_applied == []
    assert second.count() == 0
    second.close()


def test_a_schema_newer_than_the_collector_is_refused(store_url):
    open_store(store_url).close()
    bump = f"INSERT INTO schema_version VALUES ({migrations.LATEST + 1}, 'from the future', 'now')"
    if store_url.startswith("postgresql://"):
        with psycopg.connect(store_url, autocommit=True) as conn:
            conn.execute(bump)
    else:
        import sqlite3
        with sqlite3.connect(store_url) as conn:
            conn.execute(bump)
    with pytest.raises(migrations.SchemaError, match=f"version {migrations.LATEST + 1}, newer"):
        open_store(store_url)


def test_insert_is_idempotent_by_agent_and_seq(store):
    assert [r.seq for r in store.insert(rows("a1", range(1, 101)))] == list(range(1, 101))
    again = store.insert(rows("a1", range(50, 151)))
    assert [r.seq for r in again] == list(range(101, 151))
    assert store.insert(rows("a2", range(1, 11))) != []
    assert store.count() == 160
    assert store.resume_point("a1") == 150
    assert store.resume_point("a2") == 10
    assert store.resume_point("never-seen") == 0
    stored = store.query(EventQuery(agent="a1"))
    assert [e["seq"] for e in stored] == list(range(1, 151))
    assert stored[0] == event("a1", 1)  # the whole event round-trips, unicode included


def test_what_runs_before_the_commit_sees_only_new_rows_and_can_undo_the_insert(store):
    store.insert(rows("a1", range(1, 6)))
    seen = []
    store.insert(rows("a1", range(1, 11)), before_commit=lambda new: seen.extend(r.seq for r in new))
    assert seen == [6, 7, 8, 9, 10]

    def disk_full(new):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        store.insert(rows("a1", range(11, 21)), before_commit=disk_full)
    assert store.resume_point("a1") == 10  # rolled back: the next session fetches them again


def test_two_stores_on_one_database_store_each_event_once(store_url):
    """Two collectors writing the same overlapping batches at once: every event stored by exactly one."""
    first, second = open_store(store_url), open_store(store_url)
    batches = [rows("a1", range(start, start + 500)) for start in range(1, 10_001, 250)]
    new_counts = {id(first): 0, id(second): 0}

    def write(store, order):
        for batch in order:
            new_counts[id(store)] += len(store.insert(batch))

    threads = [threading.Thread(target=write, args=(first, batches)),
               threading.Thread(target=write, args=(second, list(reversed(batches))))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert first.count() == 10_250
    assert sum(new_counts.values()) == 10_250
    assert first.resume_point("a1") == second.resume_point("a1") == 10_250
    first.close()
    second.close()


def test_queries_filter_like_warden_events(store):
    store.insert(rows("a1", range(1, 11), workload="wa", pid=100, kind="egress_denied"))
    store.insert(rows("a1", range(11, 21), workload="wb", pid=200, kind="process_exited"))
    store.insert(rows("a2", range(1, 6), workload="wa", pid=300, kind="egress_denied", time=1_800_000_000.0))

    def seqs(**filters):
        return [(e["agent"], e["seq"]) for e in store.query(EventQuery(**filters))]

    assert len(seqs()) == 25
    assert seqs(workloads=("wb",)) == [("a1", s) for s in range(11, 21)]
    assert len(seqs(workloads=("wa", "wb"))) == 25
    assert seqs(kinds=("egress_denied",), agent="a1") == [("a1", s) for s in range(1, 11)]
    assert len(seqs(kinds=("egress_denied", "process_exited"), agent="a1")) == 20
    assert seqs(pid=300) == [("a2", s) for s in range(1, 6)]
    assert seqs(agent="a1", since_seq=15) == [("a1", s) for s in range(16, 21)]
    assert seqs(since_time=1_799_999_999.0) == [("a2", s) for s in range(1, 6)]
    assert seqs(workloads=("wa",), last=3) == [("a2", 3), ("a2", 4), ("a2", 5)]
    assert seqs(agent="a1", last=2) == [("a1", 19), ("a1", 20)]
    assert seqs(workloads=("nobody",)) == []


def test_the_query_filters_are_served_by_indexes(tmp_path):
    store = open_store(str(tmp_path / "events.db"))
    plans = {}
    for column in ("workload", "kind", "time"):
        conn = store._conn
        op = ">=" if column == "time" else "="
        plans[column] = " ".join(str(r) for r in conn.execute(
            f"EXPLAIN QUERY PLAN SELECT body FROM events WHERE {column} {op} ? ORDER BY time", ("x",)))
    assert "events_workload_time" in plans["workload"]
    assert "events_kind_time" in plans["kind"]
    assert "events_time" in plans["time"]
    store.close()


def test_events_without_agent_or_seq_are_refused():
    with pytest.raises(ValueError, match="agent and a positive seq"):
        row_from_event({"kind": "egress_denied", "seq": 1})
    with pytest.raises(ValueError, match="agent and a positive seq"):
        row_from_event({"kind": "egress_denied", "seq": 0, "agent": "a"})


def test_postgres_store_reconnects_after_the_server_drops_it(postgres_url):
    store = open_store(postgres_url)
    store.insert(rows("a1", range(1, 11)))
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE datname = current_database() AND pid <> pg_backend_pid()")
    with pytest.raises(psycopg.OperationalError):
        store.insert(rows("a1", range(11, 21)))
    assert len(store.insert(rows("a1", range(11, 21)))) == 10
    assert store.resume_point("a1") == 20
    store.close()


def test_store_urls():
    assert redact("postgresql://ew:s3cret@db.example:5433/events") == "postgresql://ew@db.example:5433/events"
    assert "s3cret" not in redact("host=db password=s3cret dbname=e")
    with pytest.raises(ValueError, match="use a file path, sqlite:PATH or postgresql://"):
        open_store("mysql://db/events")
    with pytest.raises(psycopg.ProgrammingError, match="must be percent-encoded") as unreadable:
        open_store("postgresql://ew:hunter%zz2@127.0.0.1:1/events")  # psycopg's own message quotes it
    assert "hunter" not in str(unreadable.value)


def test_since_is_a_seq_or_a_duration():
    assert parse_since("1234") == (1234, None)
    assert parse_since("90s", now=1000.0) == (0, 910.0)
    assert parse_since("5m", now=1000.0) == (0, 700.0)
    assert parse_since("2h", now=10_000.0) == (0, 2800.0)
    with pytest.raises(ValueError, match="a seq number .* or a duration"):
        parse_since("yesterday")


def test_json_lines_rotate_by_size_and_keep_whole_lines(tmp_path):
    path = tmp_path / "out" / "events.jsonl"
    output = JsonLinesOutput(str(path), max_bytes=4000, keep=2)
    written = rows("a1", range(1, 201))
    for start in range(0, 200, 10):
        output.write(written[start:start + 10])
    output.close()
    files = [path, path.with_name("events.jsonl.1"), path.with_name("events.jsonl.2")]
    assert all(f.exists() for f in files)
    assert not path.with_name("events.jsonl.3").exists()
    kept = []
    for f in reversed(files):
        assert f.stat().st_size <= 4000
        kept += [line for line in f.read_text().splitlines()]
    seqs = [row_from_event(__import__("json").loads(line)).seq for line in kept]
    assert seqs == list(range(seqs[0], 201))  # the newest, contiguous, nothing torn
    assert seqs[0] > 1  # older files were dropped beyond `keep`
