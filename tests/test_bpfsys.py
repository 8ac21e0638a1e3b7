"""The raw bpf(2) calls of agent/kernel/bpfsys.py that no agent test reaches (the benchmarks use them)."""
from __future__ import annotations

from pathlib import Path

import pytest

from agent.kernel import bpfsys

pytestmark = pytest.mark.root

BPF_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")


def test_program_run_totals_count_runs_only_while_bpf_stats_are_on():
    from bcc import BPF

    bpf = BPF(text=b"int f(struct __sk_buff *skb) { return 0; }")
    function = bpf.load_func(b"f", BPF.SOCKET_FILTER)
    before = BPF_STATS.read_text().strip()
    try:
        BPF_STATS.write_text("0")
        bpfsys.test_run(function.fd, repeat=100)
        assert bpfsys.program_run_totals(function.fd) == (0, 0)
        BPF_STATS.write_text("1")
        bpfsys.test_run(function.fd, repeat=100)
        run_ns, runs = bpfsys.program_run_totals(function.fd)
        assert runs == 100 and run_ns > 0
    finally:
        BPF_STATS.write_text(before)
        bpf.cleanup()
