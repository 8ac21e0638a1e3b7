"""The spool on its own (no kernel needed): restarts, the seq gaps they leave, and exact
loss counts across those gaps. The agent-level tests (test_api.py) cover it end to end."""
import time

import pytest

from agent.events import Event, EventKind
from agent.events.spool import Filters, Spool, SpoolAhead


def publish(spool: Spool, seqs: range) -> None:
    for seq in seqs:
        event = Event(EventKind.POLICY_LOADED, workload="w", detail={"pad": "x" * 100})
        event.seq, event.time, event.agent = seq, time.time(), "a"
        spool.append(event)


def wait_committed(spool: Spool, seq: int) -> None:
    deadline = time.monotonic() + 10
    while spool.committed < seq:
        assert time.monotonic() < deadline, f"spool stuck at {spool.committed}"
        spool.wait_beyond(spool.committed, 0.1)


def open_spool(tmp_path, first_seq: int, max_bytes: int = 1 << 30) -> Spool:
    return Spool(tmp_path, first_seq=first_seq, max_bytes=max_bytes, max_age_seconds=3600)


def test_a_clean_restart_leaves_a_gap_that_is_not_a_loss(tmp_path):
    spool = open_spool(tmp_path, 1)
    publish(spool, range(1, 11))
    spool.close()
    spool = open_spool(tmp_path, 1001)  # the seq allocator's next block
    assert spool.crash_gap is None
    publish(spool, range(1001, 1011))
    wait_committed(spool, 1010)
    with spool.reader() as reader:
        assert [s for s, _ in reader.after(0, Filters(), spool.committed)] == [*range(1, 11), *range(1001, 1011)]
        assert reader.lost_after(0) == (0, 0)
    spool.close()


def test_a_crash_is_reported_once_with_the_seqs_it_may_have_lost(tmp_path):
    spool = open_spool(tmp_path, 1)
    publish(spool, range(1, 6))
    wait_committed(spool, 5)  # then the agent dies: no close()
    crashed = open_spool(tmp_path, 1001)
    assert (crashed.crash_gap.first, crashed.crash_gap.last) == (6, 1000)
    crashed.close()
    assert open_spool(tmp_path, 2001).crash_gap is None


def test_losses_are_counted_exactly_across_restart_gaps(tmp_path):
    spool = open_spool(tmp_path, 1)
    publish(spool, range(1, 101))
    spool.close()
    # Each event is about 300 bytes: the bound keeps the newest few dozen of the next run.
    spool = open_spool(tmp_path, 1001, max_bytes=10_000)
    publish(spool, range(1001, 1201))
    wait_committed(spool, 1200)
    deadline = time.monotonic() + 10
    while spool.figures().bytes > 10_000:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    figures = spool.figures()
    oldest = figures.oldest_seq
    assert 1001 < oldest <= 1200
    with spool.reader() as reader:
        assert reader.lost_after(0) == (100 + oldest - 1001, oldest - 1)  # the 101..1000 gap is no loss
        assert reader.lost_after(50) == (50 + oldest - 1001, oldest - 1)
        assert reader.lost_after(1005) == (oldest - 1006, oldest - 1)
        assert reader.lost_after(oldest - 1) == (0, 0)
    assert figures.dropped == 100 + oldest - 1001
    spool.close()


def test_a_seq_that_would_repeat_is_refused(tmp_path):
    spool = open_spool(tmp_path, 1)
    publish(spool, range(1, 6))
    spool.close()
    with pytest.raises(SpoolAhead, match="up to seq 5"):
        open_spool(tmp_path, 3)  # the seq file was lost or rolled back
