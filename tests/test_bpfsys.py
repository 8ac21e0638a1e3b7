"""The raw bpf(2) calls of agent/kernel/bpfsys.py, where no agent test reaches them: the ones
only the benchmarks use, and a call a signal interrupts."""
from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from agent.kernel import bpfsys

pytestmark = pytest.mark.root

BPF_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")


@pytest.fixture
def socket_filter():
    from bcc import BPF

    bpf = BPF(text=b"int f(struct __sk_buff *skb) { return 0; }")
    try:
        yield bpf.load_func(b"f", BPF.SOCKET_FILTER)
    finally:
        bpf.cleanup()


def test_a_test_run_a_signal_interrupts_is_made_again(socket_filter):
    """The kernel stops a repeated BPF_PROG_TEST_RUN at a pending signal (EINTR): the agent's
    fold runs that way once a second, and its SIGHUP (reload) or SIGTERM must not fail it."""
    handled = []
    previous = signal.signal(signal.SIGALRM, lambda *_: handled.append(time.monotonic()))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.01)  # once, 10 ms into runs that take longer
        started = time.monotonic()
        bpfsys.test_run(socket_filter.fd, repeat=5_000_000)
        finished = time.monotonic()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert any(started < when < finished for when in handled), "no signal arrived while the program ran"


def test_program_run_totals_count_runs_only_while_bpf_stats_are_on(socket_filter):
    before = BPF_STATS.read_text().strip()
    try:
        BPF_STATS.write_text("0")
        bpfsys.test_run(socket_filter.fd, repeat=100)
        assert bpfsys.program_run_totals(socket_filter.fd) == (0, 0)
        BPF_STATS.write_text("1")
        bpfsys.test_run(socket_filter.fd, repeat=100)
        run_ns, runs = bpfsys.program_run_totals(socket_filter.fd)
        assert runs == 100 and run_ns > 0
    finally:
        BPF_STATS.write_text(before)
