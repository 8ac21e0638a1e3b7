"""agent.traffic without a kernel: rates, per-process totals, names, budget windows, spikes.

The kernel side is tested in test_traffic.py; here counters are given as the kernel would
report them, so windows and baselines can be stepped through exactly."""
from __future__ import annotations

import socket
import time

import pytest

from agent.kernel.loader import TrafficCounter
from agent.policy import Budget, parse_policy
from agent.traffic import BudgetWatch, SpikeWatch, TrafficWatch
from agent.traffic.record import RECORD_FILE, TrafficRecord
from agent.traffic.meter import DestinationTraffic

TCP = socket.IPPROTO_TCP
PROVIDER, OTHER = "198.18.1.10", "198.18.3.20"


def counter(tgid: int, address: str | None, sent: int, port: int = 443, workload: int = 0) -> TrafficCounter:
    return TrafficCounter(workload=workload, tgid=tgid, address=address, port=port, protocol=TCP,
                          listen=address is None, bytes=sent, packets=max(sent // 1000, 1))


def destination(address: str, sent: int, rate: float = 0.0, fqdn: str | None = None) -> DestinationTraffic:
    return DestinationTraffic(address, 443, "tcp", fqdn, False, sent, 1, rate)


def spec(extra: str = "", name: str = "app"):
    return parse_policy(f"""
version: 1
workloads:
  - name: {name}
    allow:
      - cidr: 198.18.0.0/16
{extra}""").workloads[0]


def test_rates_are_growth_between_ticks_and_processes_are_apart():
    watch = TrafficWatch(names=lambda address: "api.provider.test" if address == PROVIDER else None)
    workloads = {0: spec()}
    watch.tick([counter(10, PROVIDER, 1000), counter(11, OTHER, 500)], workloads, now=100.0)
    watch.tick([counter(10, PROVIDER, 5000), counter(11, OTHER, 500), counter(12, PROVIDER, 300)], workloads, now=102.0)
    processes = {p.pid: p for p in watch.processes()}
    assert set(processes) == {10, 11, 12}
    (first,) = processes[10].destinations
    assert (first.address, first.fqdn, first.label, first.bytes, first.rate) == (
        PROVIDER, "api.provider.test", "api.provider.test", 5000, 2000.0)
    assert processes[11].destinations[0].rate == 0.0
    assert processes[12].destinations[0].rate == 150.0  # new since the last tick: all of it is growth
    by_destination = {d.label: d for d in watch.destinations("app")}
    assert by_destination["api.provider.test"].bytes == 5300
    assert by_destination[OTHER].bytes == 500


def test_a_tick_takes_what_changed_keeps_the_rest_and_forgets_what_the_kernel_evicted():
    watch = TrafficWatch()
    workloads = {0: spec()}
    watch.tick([counter(10, PROVIDER, 1000), counter(11, PROVIDER, 500)], workloads, now=100.0)
    watch.tick([counter(10, PROVIDER, 3000)], workloads, now=101.0)  # 11 did not change
    (both,) = watch.destinations("app")
    assert (both.bytes, both.rate) == (3500, 2000.0)
    watch.tick([], workloads, now=102.0)  # nothing grew: every rate is 0 again
    (both,) = watch.destinations("app")
    assert (both.bytes, both.rate) == (3500, 0.0)
    assert [d.rate for p in watch.processes() for d in p.destinations] == [0.0, 0.0]
    watch.tick([], workloads, now=103.0, gone=[counter(10, PROVIDER, 3000)])
    (left,) = watch.destinations("app")
    assert left.bytes == 500 and [p.pid for p in watch.processes()] == [11]
    watch.tick([counter(11, PROVIDER, 200)], workloads, now=104.0)  # evicted and counted afresh between reads
    (again,) = watch.destinations("app")
    assert (again.bytes, again.rate) == (200, 200.0)  # all of the new counter was sent since the last read
    watch.tick([], workloads, now=105.0, gone=[counter(11, PROVIDER, 200)])
    assert watch.destinations("app") == [] and watch.processes() == []


def test_counters_of_workloads_not_in_the_policy_are_left_out():
    watch = TrafficWatch()
    watch.tick([counter(10, PROVIDER, 1000, workload=7)], {0: spec()}, now=1.0)
    assert watch.processes() == []


def test_budget_counts_only_the_window_and_reports_a_crossing_once():
    budget = Budget(fqdn=None, cidr="198.18.1.0/24", bytes_per_minute=10_000, action="alert")
    watch = BudgetWatch(window_seconds=60)
    assert watch.check("app", (budget,), [destination(PROVIDER, 50_000)], now=0.0) == []  # the baseline
    assert watch.check("app", (budget,), [destination(PROVIDER, 58_000), destination(OTHER, 10**9)], now=30.0) == []
    (crossing,) = watch.check("app", (budget,), [destination(PROVIDER, 61_000)], now=50.0)
    assert (crossing.window_bytes, crossing.destinations) == (11_000, (PROVIDER,))
    assert watch.check("app", (budget,), [destination(PROVIDER, 62_000)], now=55.0) == []  # still over: once
    # 61 s after the baseline, the window starts at the 30 s sample: 62000 - 58000 is under.
    assert watch.check("app", (budget,), [destination(PROVIDER, 62_000)], now=91.0) == []
    assert len(watch.check("app", (budget,), [destination(PROVIDER, 75_000)], now=95.0)) == 1  # again


@pytest.mark.parametrize("eviction", ["gone", "counted_afresh"])
def test_an_evicted_counter_keeps_the_budget_window_it_was_part_of(eviction):
    """An idle counter toward the provider (sent long before the window) is evicted from the
    kernel's LRU map at 30 s; the busy one's 11 KB in the window still cross 10 KB."""
    watch = TrafficWatch()
    workloads = {0: spec("""    budgets:
      - cidr: 198.18.1.0/24
        bytes_per_minute: 10KB
        action: alert""")}
    assert watch.tick([counter(10, PROVIDER, 50_000), counter(11, PROVIDER, 0)], workloads, now=0.0) == ([], [])
    watch.tick([counter(11, PROVIDER, 4000)], workloads, now=20.0)
    if eviction == "gone":
        watch.tick([counter(11, PROVIDER, 6000)], workloads, now=30.0, gone=[counter(10, PROVIDER, 50_000)])
    else:  # evicted and made again by one packet of 100 bytes between two reads
        watch.tick([counter(10, PROVIDER, 100), counter(11, PROVIDER, 6000)], workloads, now=30.0)
    crossings, _ = watch.tick([counter(11, PROVIDER, 11_000)], workloads, now=50.0)
    assert [c.window_bytes for c in crossings] == [11_000 + (100 if eviction == "counted_afresh" else 0)]


def test_fqdn_budget_matches_the_names_the_dns_proxy_gave():
    budget = Budget(fqdn="*.provider.test", cidr=None, bytes_per_minute=100, action="kill")
    watch = BudgetWatch()
    named = [destination(PROVIDER, 0, fqdn="api.provider.test"), destination(OTHER, 0, fqdn="deep.api.provider.test")]
    watch.check("app", (budget,), named, now=0.0)
    grown = [destination(PROVIDER, 500, fqdn="api.provider.test"), destination(OTHER, 10**6, fqdn="deep.api.provider.test")]
    (crossing,) = watch.check("app", (budget,), grown, now=1.0)
    assert (crossing.window_bytes, crossing.destinations) == (500, ("api.provider.test",))


def test_spike_needs_a_warm_baseline_and_a_multiple_of_it():
    workload = spec("    spike:\n      factor: 4\n      baseline_seconds: 10\n      min_rate: 1000\n")
    watch = SpikeWatch()
    for second in range(0, 11):
        assert watch.check("app", workload.spike, [destination(PROVIDER, 0, rate=2000)], now=float(second)) == []
    assert watch.check("app", workload.spike, [destination(PROVIDER, 0, rate=7000)], now=11.0) == []  # < 4x
    (anomaly,) = watch.check("app", workload.spike, [destination(PROVIDER, 0, rate=30_000)], now=12.0)
    assert anomaly.rate == 30_000 and anomaly.baseline < 30_000 / 4
    assert watch.check("app", workload.spike, [destination(PROVIDER, 0, rate=30_000)], now=13.0) == []  # once


def test_spike_on_a_new_destination_waits_for_its_baseline():
    workload = spec("    spike:\n      factor: 2\n      baseline_seconds: 5\n      min_rate: 10\n")
    watch = SpikeWatch()
    assert watch.check("app", workload.spike, [destination(OTHER, 0, rate=0)], now=0.0) == []
    assert watch.check("app", workload.spike, [destination(OTHER, 0, rate=10**6)], now=1.0) == []


def test_a_reload_that_changes_only_a_limit_keeps_the_window():
    watch = BudgetWatch(window_seconds=60)
    loose = Budget(fqdn=None, cidr="198.18.1.0/24", bytes_per_minute=100_000, action="alert")
    watch.check("app", (loose,), [destination(PROVIDER, 0)], now=0.0)
    watch.check("app", (loose,), [destination(PROVIDER, 30_000)], now=10.0)
    tight = Budget(fqdn=None, cidr="198.18.1.0/24", bytes_per_minute=20_000, action="kill")
    (crossing,) = watch.check("app", (tight,), [destination(PROVIDER, 30_000)], now=11.0)
    assert crossing.window_bytes == 30_000 and crossing.budget == tight


def test_a_gap_longer_than_the_window_is_charged_the_least_one_window_of_it_carried():
    """150 s unwatched are three windows: 250 KB in them proves no window above 100 KB (the
    agent cannot tell 83 KB a minute from all of it at once), 350 KB does."""
    budget = Budget(fqdn=None, cidr="198.18.1.0/24", bytes_per_minute=100_000, action="kill")
    watch = BudgetWatch(window_seconds=60)
    watch.check("app", (budget,), [destination(PROVIDER, 0)], now=0.0)
    assert watch.check("app", (budget,), [destination(PROVIDER, 250_000)], now=150.0) == []
    assert watch.check("app", (budget,), [destination(PROVIDER, 250_000)], now=151.0) == []  # from now on afresh
    (crossing,) = watch.check("app", (budget,), [destination(PROVIDER, 600_000)], now=301.0)
    assert (crossing.window_bytes, crossing.unwatched_seconds, crossing.unwatched_bytes) == (116_667, 150.0, 350_000)


def test_budget_windows_outlast_the_agent_where_the_workload_keeps_its_index(tmp_path):
    kill_past_100kb = "    budgets:\n      - cidr: 198.18.1.0/24\n        bytes_per_minute: 100000\n        action: kill\n"
    app, other = spec(kill_past_100kb), spec(kill_past_100kb, name="other")
    now = time.monotonic()
    before = TrafficWatch()
    before.tick([counter(10, PROVIDER, 50_000), counter(20, PROVIDER, 50_000, workload=1)], {0: app, 1: other},
                now=now - 30)
    (first,), _ = before.tick([counter(10, PROVIDER, 200_000)], {0: app, 1: other}, now=now - 20)
    TrafficRecord(tmp_path).save(TrafficRecord.kept_of(before), {"app": 0, "other": 1})

    after = TrafficWatch()
    TrafficRecord(tmp_path).restore_into(after, {"app": 0, "other": 2})
    # Still over since before the restart: reported once, by the agent before.
    assert after.tick([counter(10, PROVIDER, 210_000)], {0: app}, now=now) == ([], [])
    assert after.tick([], {0: app}, now=now + 45) == ([], [])  # back under
    (again,), _ = after.tick([counter(10, PROVIDER, 320_000)], {0: app}, now=now + 46)
    assert again.window_bytes == 120_000  # since the sample the agent before took 66 s ago
    # "other" came back under another index: another workload's counters, so no window of its.
    assert after.tick([counter(30, PROVIDER, 10**6, workload=2)], {0: app, 2: other}, now=now + 47) == ([], [])


def test_spike_baselines_outlast_the_agent(tmp_path):
    """A restarted agent judges a spike against the baseline the agent before learned; one that
    began baselines again would need spike.baseline_seconds before it saw any."""
    app = spec("    spike:\n      factor: 4\n      baseline_seconds: 10\n      min_rate: 1000\n")
    now = time.monotonic()
    before = TrafficWatch()
    for second in range(16):  # 2000 bytes a second
        assert before.tick([counter(10, PROVIDER, 2000 * second)], {0: app}, now=now - 40 + second) == ([], [])
    TrafficRecord(tmp_path).save(TrafficRecord.kept_of(before), {"app": 0})

    restored, fresh = TrafficWatch(), TrafficWatch()
    TrafficRecord(tmp_path).restore_into(restored, {"app": 0})
    for watch in (restored, fresh):
        assert watch.tick([counter(10, PROVIDER, 30_000)], {0: app}, now=now) == ([], [])  # totals, no rates yet
    spiking = [counter(10, PROVIDER, 60_000)]
    assert fresh.tick(spiking, {0: app}, now=now + 1) == ([], [])
    _, (anomaly,) = restored.tick(spiking, {0: app}, now=now + 1)
    assert anomaly.rate == 30_000 and 1500 < anomaly.baseline < 2500


def test_an_unreadable_traffic_record_starts_the_watch_afresh_and_says_so(tmp_path, caplog):
    (tmp_path / RECORD_FILE).write_text(
        '{"workloads": {"app": {"index": 0, "budgets": {"windows": [], "over": []}, "spikes": [{"rate": 1}]}}}')
    watch = TrafficWatch()
    TrafficRecord(tmp_path).restore_into(watch, {"app": 0})
    assert watch.kept(0.0) == {}
    assert f"{tmp_path / RECORD_FILE}: not a readable record of budget windows and spike baselines" in caplog.text


def test_a_workload_gone_from_the_policy_loses_its_budget_windows():
    watch = TrafficWatch()
    app = spec("    budgets:\n      - cidr: 198.18.1.0/24\n        bytes_per_minute: 1000\n")
    watch.tick([counter(10, PROVIDER, 500)], {0: app}, now=0.0)
    watch.tick([], {}, now=1.0)  # a reload took it out
    # Back under index 1, whose counters were another workload's: judged from here on.
    assert watch.tick([counter(10, PROVIDER, 10**6, workload=1)], {1: app}, now=2.0) == ([], [])
    assert watch.budgets.kept(0.0)["app"]["windows"][0]["samples"] == [[2.0, 10**6]]
