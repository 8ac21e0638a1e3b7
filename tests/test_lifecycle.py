"""The agent over time: reloads, processes that predate it, violations and their actions,
SIGKILL and restarts, escapes and overruns. Real kernel, real cgroups, real namespaces."""
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from agent import cgroups
from agent.actions import MAX_LISTED
from agent.events.spool import CLOSE_GIVES_UP_SECONDS
from agent.daemon import Agent
from agent.events import EventBus, JsonLinesSink
from agent.events.lines import LinesOutput
from agent.kernel.loader import KernelPrograms, attached_warden_programs, remove_pins
from fulldisk import fill, small_filesystem
from agentproc import (REPO, ROUTER, WARDEN, complete_lines, outcome, policy_of, unique_name, workload_entry,
                       workload_policy, write_policy)
from agent.lab.network import Lab

pytestmark = pytest.mark.root
EPERM = 1


def allow_provider(name: str, *, rules: str = f"{{cidr: {Lab.PROVIDER4}/32, ports: [443], protocol: tcp}}",
                   **options: str) -> str:
    return workload_policy(name, rules, **options)


def start_router(lab, argv, **kw):
    return lab.run_in_router(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, bufsize=1, **kw)


def read_json(process) -> dict:
    line = process.stdout.readline()
    assert line, process.stderr.read()
    return json.loads(line)


def send(process, n: int) -> dict:
    process.stdin.write(f"{n}\n")
    process.stdin.flush()
    return read_json(process)


def test_reload_revokes_an_established_connection(lab, start_agent, names):
    wl = names[0]
    provider = lab.serve(Lab.PROVIDER4, 443)
    agent = start_agent(allow_provider(wl), [wl])
    router = start_router(lab, agent.router_cmd(wl, "hold", Lab.PROVIDER4, "443"))
    assert read_json(router)["connected"]
    send(router, 100)
    assert provider.wait_for_bytes(100)

    agent.reload(allow_provider(wl, rules=f"{{cidr: {Lab.OTHER4}/32, ports: [443]}}"))
    agent.wait_for(lambda e: e["kind"] == "policy_loaded" and e["seq"] > 2)
    send(router, 100)  # accepted by the socket buffer; the backstop drops every packet
    event = agent.wait_for(lambda e: e["kind"] == "egress_denied" and e["detail"]["hook"] == "egress")
    assert event["process"]["pid"] == router.pid or event["process"]["comm"].startswith("python")
    assert event["destination"] == {"ip": Lab.PROVIDER4, "port": 443, "protocol": "tcp", "fqdn": None}
    time.sleep(0.5)
    assert provider.received_bytes() == 100
    assert attempt_errno(lab, agent, wl, Lab.PROVIDER4, 443) == EPERM


def attempt_errno(lab, agent, wl, host, port) -> int | None:
    result = outcome(lab.run_in_router(agent.router_cmd(wl, "tcp", host, str(port)), stdout=-1, stderr=-1, text=True))
    return None if result["ok"] else result["errno"]


def test_invalid_reload_is_rejected_and_the_policy_in_force_stays(lab, start_agent, names):
    wl = names[0]
    lab.serve(Lab.PROVIDER4, 443)
    agent = start_agent(allow_provider(wl), [wl])
    agent.reload("version: 1\nworkloads:\n  - name: BAD\n    allow: []\n")
    rejected = agent.wait_for(lambda e: e["kind"] == "policy_rejected")
    assert any("name" in p for p in rejected["detail"]["problems"])
    assert attempt_errno(lab, agent, wl, Lab.PROVIDER4, 443) is None
    assert attempt_errno(lab, agent, wl, Lab.ATTACKER4, 443) == EPERM


@pytest.fixture
def unit_cgroup():
    """A cgroup laid out as systemd lays out a unit's (SLICE.slice/UNIT.service)."""
    root = cgroups.cgroup2_root()
    slice_dir = root / f"{unique_name('ewtest')}.slice"
    unit = slice_dir / f"{unique_name('router')}.service"
    unit.mkdir(parents=True)
    yield unit
    cgroups.remove(slice_dir)


def test_socket_opened_before_the_agent_started_carries_nothing(lab, start_agent, names, unit_cgroup):
    wl = names[0]
    attacker = lab.serve(Lab.ATTACKER4, 443)
    router = start_router(lab, ["sh", "-c", f'echo $$ > {unit_cgroup}/cgroup.procs && exec "$0" "$@"',
                                sys.executable, ROUTER, "hold", Lab.ATTACKER4, "443"])
    assert read_json(router)["connected"]
    agent = start_agent(allow_provider(wl, match=f"{{systemd_unit: {unit_cgroup.name}}}"), [wl])
    send(router, 500)
    event = agent.wait_for(lambda e: e["kind"] == "egress_denied" and e["detail"]["hook"] == "egress")
    assert event["process"]["pid"] == router.pid
    assert event["destination"]["ip"] == Lab.ATTACKER4 and event["destination"]["port"] == 443
    time.sleep(0.5)
    assert attacker.received_bytes() == 0


def test_an_adopted_process_s_udp_socket_is_reported_as_the_way_out_it_stays(lab, start_agent, names):
    """SOCK_DESTROY only fails a UDP socket's next send: the agent says what it cannot stop
    rather than report it destroyed."""
    wl = names[0]
    tag = unique_name("adoptme")
    lab.serve(Lab.ATTACKER4, 443, "udp")
    router = start_router(lab, [sys.executable, ROUTER, "hold", Lab.ATTACKER4, "443", "--udp", "--tag", tag])
    assert read_json(router)["connected"]
    agent = start_agent(allow_provider(wl, match=f"{{cmdline: ['{tag}']}}"), [wl])
    kept = agent.wait_for(lambda e: e["kind"] == "egress_observed" and e["process"]["pid"] == router.pid)
    assert "UDP socket opened before the process was adopted" in kept["detail"]["reason"]
    assert kept["destination"]["ip"] == Lab.ATTACKER4 and kept["verdict"] == "allow"
    assert not [e for e in agent.events() if e["kind"] == "socket_destroyed"]
    router.kill()


def test_what_an_adopted_process_started_before_comes_with_it(lab, start_agent, names):
    wl = names[0]
    tag = unique_name("adoptme")
    lab.serve(Lab.PROVIDER4, 443)
    # The child (a sleep here, a curl in life) matches nothing itself.
    router = start_router(lab, ["sh", "-c", 'sleep 60 & exec "$0" "$@"', sys.executable, ROUTER, "hold",
                                Lab.PROVIDER4, "443", "--tag", tag])
    assert read_json(router)["connected"]
    [child] = psutil.Process(router.pid).children()
    agent = start_agent(allow_provider(wl, match=f"{{cmdline: ['{tag}']}}"), [wl])
    joined = agent.wait_for(lambda e: e["kind"] == "process_joined" and e["process"]["pid"] == child.pid)
    assert joined["detail"]["reason"] == f"started by {router.pid}, which matched the workload's match"
    assert {router.pid, child.pid} <= set(cgroups.pids(agent.cgroup(wl)))
    child.kill()
    router.kill()


def test_adopted_process_loses_its_disallowed_sockets(lab, start_agent, names):
    wl = names[0]
    tag = unique_name("adoptme")
    attacker = lab.serve(Lab.ATTACKER4, 443)
    router = start_router(lab, [sys.executable, ROUTER, "hold", Lab.ATTACKER4, "443", "--tag", tag])
    assert read_json(router)["connected"]
    agent = start_agent(allow_provider(wl, match=f"{{cmdline: ['{tag}']}}"), [wl])
    destroyed = agent.wait_for(lambda e: e["kind"] == "socket_destroyed")
    assert destroyed["process"]["pid"] == router.pid
    assert destroyed["destination"]["ip"] == Lab.ATTACKER4
    agent.wait_for(lambda e: e["kind"] == "process_joined" and e["process"]["pid"] == router.pid)
    assert router.pid in cgroups.pids(agent.cgroup(wl))
    assert not send(router, 500)["ok"]
    assert attacker.received_bytes() == 0


def test_process_started_later_is_adopted_on_exec(lab, start_agent, names):
    wl = names[0]
    tag = unique_name("adoptme")
    attacker = lab.serve(Lab.ATTACKER4, 443)
    agent = start_agent(allow_provider(wl, match=f"{{cmdline: ['{tag}']}}"), [wl])
    router = start_router(lab, [sys.executable, ROUTER, "tcp", Lab.ATTACKER4, "443", "--tag", tag, "--wait"])
    agent.wait_for(lambda e: e["kind"] == "process_joined" and e["process"]["pid"] == router.pid)
    router.stdin.write("go\n")
    router.stdin.flush()
    result = read_json(router)
    assert not result["ok"] and result["errno"] == EPERM
    assert attacker.connections() == 0


def test_kill_leaves_no_process_of_the_workload(lab, start_agent, names):
    wl = names[0]
    lab.serve(Lab.ATTACKER4, 443)
    agent = start_agent(allow_provider(wl, on_violation="kill"), [wl])
    script = f'sleep 60 & sleep 60 & exec {sys.executable} {ROUTER} tcp {Lab.ATTACKER4} 443'
    router = lab.run_in_router(agent.run_cmd(wl, ["sh", "-c", script]), stdout=-1, stderr=-1)
    kill = agent.wait_for(lambda e: e["kind"] == "action_kill")
    router.wait(timeout=5)
    assert router.returncode == -signal.SIGKILL
    assert len(kill["detail"]["pids"]) >= 3 and kill["detail"]["cause_kind"] == "egress_denied"
    assert cgroups.pids(agent.cgroup(wl)) == []
    assert not [pid for pid in kill["detail"]["pids"] if alive(pid)]


def alive(pid: int) -> bool:
    """A process that can still run: zombies wait only for a parent to reap them."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def in_process_agent(tmp_path):
    """An Agent inside the test process, for its Python API (quarantine, release)."""
    made = []

    def make(policy_text: str, workloads: list[str]) -> tuple[Agent, Path]:
        events = tmp_path / "events.jsonl"
        bus = EventBus("test-agent", tmp_path)
        bus.subscribe(JsonLinesSink(LinesOutput(events)))
        agent = Agent(write_policy(tmp_path / "policy.yaml", policy_text), tmp_path, bus,
                      pin_dir=Path("/sys/fs/bpf") / f"ew-test-{unique_name('inproc')}")
        agent.start()
        thread = threading.Thread(target=agent.run, daemon=True)
        thread.start()
        made.append((agent, thread, workloads))
        return agent, events

    yield make
    for agent, thread, workloads in made:
        agent.stop()
        thread.join(timeout=5)
        agent.kernel.close()
        remove_pins(agent.pin_dir)
        for name in workloads:
            cgroups.remove(cgroups.warden_parent() / name)


def wait_for_event(events: Path, predicate, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in complete_lines(events):
            if predicate(event):
                return event
        time.sleep(0.02)
    raise AssertionError(f"no matching event in {events.read_text()}")


class HeldTraffic:
    """The agent's TrafficWatch, with its tick held until the test lets it go: a stand-in for
    a tick over a full counter map (65,536 new counters take 0.14-0.3 s), made to last as long
    as the test needs so that what the test shows does not depend on timing."""

    def __init__(self, watch):
        self._watch = watch
        self.entered, self.release = threading.Event(), threading.Event()

    def tick(self, *args, **kwargs):
        self.entered.set()
        self.release.wait(timeout=30)
        return self._watch.tick(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._watch, name)


def test_a_long_traffic_tick_does_not_hold_back_a_kill(lab, in_process_agent, names):
    wl = names[0]
    lab.serve(Lab.ATTACKER4, 443)
    agent, events = in_process_agent(allow_provider(wl, on_violation="kill"), [wl])
    held = agent.traffic = HeldTraffic(agent.traffic)
    try:
        assert held.entered.wait(timeout=5), "the accounting thread did not tick"
        router = lab.run_in_router([*WARDEN, "run", wl, "--", sys.executable, ROUTER, "tcp", Lab.ATTACKER4, "443"],
                                   stdout=-1, stderr=-1, cwd=REPO)
        kill = wait_for_event(events, lambda e: e["kind"] == "action_kill")
        assert not held.release.is_set()  # the kill came while the tick was still running
        assert router.wait(timeout=5) == -signal.SIGKILL
        assert router.pid in kill["detail"]["pids"]
    finally:
        held.release.set()


def test_a_bug_in_a_record_handler_stops_the_agent_rather_than_losing_the_record(lab, in_process_agent, names,
                                                                                 monkeypatch):
    wl = names[0]
    agent, _ = in_process_agent(allow_provider(wl), [wl])
    raised = []
    monkeypatch.setattr(threading, "excepthook", raised.append)

    def broken_handler(record):
        raise RuntimeError("a bug in a handler")

    agent._on_verdict = broken_handler
    lab.run_in_router([*WARDEN, "run", wl, "--", sys.executable, ROUTER, "tcp", Lab.ATTACKER4, "443"],
                      stdout=-1, stderr=-1, cwd=REPO).wait(timeout=10)
    deadline = time.monotonic() + 5
    while not raised and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [str(failure.exc_value) for failure in raised] == ["a bug in a handler"]  # run() raised it


def test_a_full_state_disk_does_not_stop_a_quarantine(lab, start_agent, names, tmp_path):
    wl = names[0]
    with small_filesystem(tmp_path / "small-state", "1m") as state:
        agent = start_agent(allow_provider(wl, on_violation="quarantine"), [wl], agent_args=["--state-dir", str(state)])
        fill(state / "filler")
        router = start_router(lab, agent.router_cmd(wl, "probe", Lab.ATTACKER4, "443", "--seconds", "10"))
        quarantine = agent.wait_for(lambda e: e["kind"] == "action_quarantine")
        assert router.pid in quarantine["detail"]["frozen_pids"] and cgroups.is_frozen(agent.cgroup(wl))
        assert "cannot save the quarantines" in agent.log.read_text()
        router.kill()
        (state / "filler").unlink()  # the spool, which waits for room to write every event, can stop
        assert agent.stop() == 0


def test_a_stop_on_a_full_state_disk_ends_and_the_next_start_reports_what_the_spool_lost(lab, start_agent, names,
                                                                                          tmp_path):
    wl = names[0]
    with small_filesystem(tmp_path / "small-state", "1m") as state:
        agent = start_agent(allow_provider(wl), [wl], agent_args=["--state-dir", str(state)])
        fill(state / "filler")
        denied = outcome(lab.run_in_router(agent.router_cmd(wl, "tcp", Lab.ATTACKER4, "443"), stdout=-1, stderr=-1,
                                           text=True))
        assert denied["errno"] == EPERM
        unwritten = agent.wait_for(lambda e: e["kind"] == "egress_denied")["seq"]  # in the events file only
        agent.process.terminate()
        assert agent.process.wait(timeout=CLOSE_GIVES_UP_SECONDS + 10) == 0
        assert "the next start reports them as a gap" in agent.log.read_text()
        (state / "filler").unlink()
        before = len(agent.events())
        agent.start()
        gap = agent.wait_for(lambda e: e["kind"] == "events_lost", after=before)["detail"]
        assert gap["first_seq"] <= unwritten <= gap["last_seq"]
        assert agent.stop() == 0


def test_quarantine_freezes_keeps_evidence_and_release_restores(lab, in_process_agent, names):
    wl = names[0]
    provider = lab.serve(Lab.PROVIDER4, 443)
    agent, events = in_process_agent(allow_provider(wl, on_violation="quarantine"), [wl])
    fillers = {f"ZZ_FILLER_{i}": "x" for i in range(MAX_LISTED)}  # more names than evidence lists
    env = {**os.environ, "OPENAI_API_KEY": "sk-never-in-evidence", **fillers}
    router = start_router(lab, [*WARDEN, "run", wl, "--", sys.executable, ROUTER, "hold", Lab.PROVIDER4, "443"],
                          env=env, cwd=REPO)
    assert read_json(router)["connected"]
    send(router, 100)
    assert provider.wait_for_bytes(100)

    intruder = lab.run_in_router([*WARDEN, "run", wl, "--", sys.executable, ROUTER, "tcp", Lab.ATTACKER4, "443"],
                                 stdout=-1, stderr=-1, cwd=REPO)
    quarantine = wait_for_event(events, lambda e: e["kind"] == "action_quarantine")
    assert cgroups.is_frozen(cgroups.warden_parent() / wl)
    assert router.pid in quarantine["detail"]["frozen_pids"]
    evidence = next(e for e in quarantine["detail"]["evidence"] if e["pid"] == router.pid)
    assert "OPENAI_API_KEY" in evidence["environment_names"] and len(evidence["environment_names"]) == MAX_LISTED
    assert evidence["environment_names_not_listed"] > 0
    assert len(evidence["exe_sha256"]) == 64
    assert any(s["remote"] == f"{Lab.PROVIDER4}:443" for s in evidence["sockets"])
    assert "sk-never-in-evidence" not in events.read_text()

    router.stdin.write("100\n")  # a frozen process cannot act on it
    router.stdin.flush()
    time.sleep(0.5)
    assert provider.received_bytes() == 100

    agent.release(wl)
    assert json.loads(router.stdout.readline())["ok"]
    assert provider.wait_for_bytes(200)
    assert not cgroups.is_frozen(cgroups.warden_parent() / wl)
    intruder.wait(timeout=5)
    wait_for_event(events, lambda e: e["kind"] == "action_release")


_PIDFD_GETFD = 438  # the same number on every architecture


def take_socket(pid: int, fd: int, kind: int) -> socket.socket:
    """A duplicate of another process's socket (pidfd_getfd), sendable from here while that
    process is frozen: it stays its workload's socket, judged by the workload's policy."""
    pidfd = os.pidfd_open(pid)
    try:
        taken = ctypes.CDLL(None, use_errno=True).syscall(_PIDFD_GETFD, pidfd, fd, 0)
        if taken < 0:
            raise OSError(ctypes.get_errno(), "pidfd_getfd")
    finally:
        os.close(pidfd)
    return socket.socket(fileno=taken, type=kind)


def datagram_arrives(router_socket: socket.socket, provider) -> bool:
    before = provider.connections()
    try:
        router_socket.send(b"x")
    except PermissionError:  # the backstop's verdict, returned to the sender
        return False
    deadline = time.monotonic() + 1
    while time.monotonic() < deadline:
        if provider.connections() > before:
            return True
        time.sleep(0.02)
    return False


def warden(agent, *args: str) -> str:
    """A `warden` command against the agent, as an operator runs it; its output."""
    return subprocess.run([*WARDEN, *args], env={**os.environ, "WARDEN_SOCKET": str(agent.socket)}, cwd=REPO,
                          capture_output=True, text=True, check=True).stdout


def workload_listed(agent, wl: str) -> dict:
    return next(w for w in json.loads(warden(agent, "workloads", "-o", "json")) if w["name"] == wl)


def test_a_quarantine_outlasts_an_agent_restart(lab, start_agent, names):
    """The restarted agent loads programs of its own: they must deny all from the moment they
    are attached, not give the frozen router its allowances back until someone releases it."""
    wl = names[0]
    provider = lab.serve(Lab.PROVIDER4, 443, "udp")
    agent = start_agent(allow_provider(wl, rules=f"{{cidr: {Lab.PROVIDER4}/32, ports: [443], protocol: udp}}"), [wl])
    router = start_router(lab, agent.router_cmd(wl, "hold", Lab.PROVIDER4, "443", "--udp"))
    held = read_json(router)
    router_socket = take_socket(held["pid"], held["fd"], socket.SOCK_DGRAM)
    assert datagram_arrives(router_socket, provider)

    warden(agent, "quarantine", wl)
    assert not datagram_arrives(router_socket, provider)
    since = workload_listed(agent, wl)["quarantined_since"]
    assert time.time() - 10 < since <= time.time()

    agent.kill9()
    already = len(agent.events())
    agent.start()
    kept = agent.wait_for(lambda e: e["kind"] == "action_quarantine", after=already)
    assert kept["detail"]["cause"] == "agent_restart" and kept["detail"]["frozen_pids"] == [held["pid"]]
    assert not datagram_arrives(router_socket, provider)
    assert cgroups.is_frozen(agent.cgroup(wl))
    assert workload_listed(agent, wl)["state"] == "quarantined" and kept["detail"]["quarantined_since"] == since
    assert f"quarantined since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(since))}" in warden(agent, "workloads")

    cgroups.thaw(agent.cgroup(wl))  # by hand, around the agent: a restart freezes it again
    agent.stop()
    agent.start()
    assert cgroups.is_frozen(agent.cgroup(wl)) and not datagram_arrives(router_socket, provider)

    warden(agent, "release", wl)
    assert datagram_arrives(router_socket, provider)
    agent.stop()
    agent.start()
    listed = workload_listed(agent, wl)
    assert datagram_arrives(router_socket, provider) and listed["state"] == "guarded" and listed["quarantined_since"] == 0


def test_a_match_never_takes_a_process_of_another_workload(lab, start_agent, names, tmp_path):
    started, matching = names[0], names[1]
    tag = unique_name("both")
    (tmp_path / "tag").write_text(tag)  # read by the shell: only the router's own cmdline holds the tag
    rules = f"{{cidr: {Lab.PROVIDER4}/32, ports: [443], protocol: tcp}}"
    policy = policy_of(workload_entry(started, rules, on_violation="kill"),
                       workload_entry(matching, rules, match=f"{{cmdline: ['{tag}']}}"))
    agent = start_agent(policy, [started, matching])
    lab.serve(Lab.PROVIDER4, 443)
    router = start_router(lab, ["sh", "-c", f'echo $$ > {agent.cgroup(started)}/cgroup.procs && exec "$0" "$@" '
                                f'--tag "$(cat {tmp_path / "tag"})"', sys.executable, ROUTER, "hold", Lab.PROVIDER4, "443"])
    assert read_json(router)["connected"]
    before = len(agent.events())
    agent.reload(policy)  # adoption scans every process again
    agent.wait_for(lambda e: e["kind"] == "policy_loaded", after=before)
    time.sleep(0.3)
    assert router.poll() is None and router.pid in cgroups.pids(agent.cgroup(started))
    assert not [e["kind"] for e in agent.events() if e["kind"] in ("cgroup_escape", "action_kill")]
    router.kill()


def test_warden_run_into_one_workload_is_not_adopted_by_another_whose_match_its_command_fits(lab, start_agent,
                                                                                             names):
    """The launcher's own command line names COMMAND; it execs before it joins its workload."""
    started, matching = names[0], names[1]
    tag = unique_name("both")
    rules = f"{{cidr: {Lab.PROVIDER4}/32, ports: [443], protocol: tcp}}"
    agent = start_agent(policy_of(workload_entry(started, rules, on_violation="kill"),
                                  workload_entry(matching, rules, on_violation="kill",
                                                 match=f"{{cmdline: ['{tag}']}}")), [started, matching])
    lab.serve(Lab.PROVIDER4, 443)
    router = start_router(lab, [*WARDEN, "run", started, "--", sys.executable, ROUTER, "hold", Lab.PROVIDER4, "443",
                                "--tag", tag], cwd=REPO)
    assert read_json(router)["connected"]
    time.sleep(0.3)
    assert router.poll() is None and router.pid in cgroups.pids(agent.cgroup(started))
    assert not [e["kind"] for e in agent.events() if e["kind"] in ("cgroup_escape", "action_kill")]
    router.kill()


def test_a_restarted_unit_is_guarded_again_and_a_stopped_one_breaks_no_reload(lab, start_agent, names, unit_cgroup):
    """systemd removes a unit's cgroup when the unit stops, and makes a new one (a new id at
    the same path) when it starts again: the programs went with the old one."""
    wl = names[0]
    lab.serve(Lab.ATTACKER4, 443)
    policy = allow_provider(wl, match=f"{{systemd_unit: {unit_cgroup.name}}}")
    agent = start_agent(policy, [wl])
    unit_cgroup.rmdir()  # the unit stops
    before = len(agent.events())
    agent.reload(policy)
    agent.wait_for(lambda e: e["kind"] == "policy_loaded", after=before)
    unit_cgroup.mkdir()  # and starts again, its router trying the attacker from the first moment
    router = start_router(lab, ["sh", "-c", f'echo $$ > {unit_cgroup}/cgroup.procs && exec "$0" "$@"',
                                sys.executable, ROUTER, "probe", Lab.ATTACKER4, "443", "--seconds", "2",
                                "--interval", "0.02"])
    probed = read_json(router)
    assert probed["refused"] > probed["connected"]  # guarded again within 0.1 s of the start
    agent.wait_for(lambda e: e["kind"] == "egress_denied" and e["process"]["pid"] == router.pid)
    reloads = sum(e["kind"] == "policy_loaded" for e in agent.events())
    assert reloads == 2 and agent.process.poll() is None


def test_a_unit_that_starts_while_its_workload_is_quarantined_is_frozen_too(lab, start_agent, names, unit_cgroup):
    """After a reboot systemd starts the router's unit again, in a cgroup the agent finds later."""
    wl = names[0]
    unit = unit_cgroup.name
    unit_cgroup.rmdir()
    agent = start_agent(allow_provider(wl, match=f"{{systemd_unit: {unit}}}"), [wl])
    warden(agent, "quarantine", wl)
    unit_cgroup.mkdir()
    # Busy, so that being frozen shows; it may join before the agent finds the cgroup or after.
    router = subprocess.Popen(["sh", "-c", f'echo $$ > {unit_cgroup}/cgroup.procs && while :; do :; done'])
    agent.wait_for(lambda e: e["kind"] == "action_quarantine" and e["detail"].get("cause") == "unit_started")
    assert cgroups.is_frozen(unit_cgroup)
    while router.pid not in cgroups.pids(unit_cgroup):
        time.sleep(0.01)
    cpu = psutil.Process(router.pid).cpu_times()
    time.sleep(0.3)
    assert psutil.Process(router.pid).cpu_times() == cpu
    router.kill()
    router.wait()


def agent_with_state_dir(tmp_path: Path, state: Path, workload: str, *options: str) -> subprocess.CompletedProcess:
    """`warden agent` with its state in `state`, expected to refuse to start."""
    policy = write_policy(tmp_path / "policy.yaml", allow_provider(workload))
    return subprocess.run([*WARDEN, "agent", "--policy", str(policy), "--state-dir", str(state),
                           "--pin-dir", str(tmp_path / "pins"), "--socket", str(tmp_path / "agent.sock"),
                           "--metrics-listen", "off", *options], cwd=REPO, capture_output=True, text=True, timeout=60)


def test_an_unreadable_quarantine_record_stops_the_agent_before_it_changes_anything(tmp_path, names):
    state = tmp_path / "state"
    state.mkdir()
    (state / "quarantined.json").write_text("{not json")
    result = agent_with_state_dir(tmp_path, state, names[0])
    assert result.returncode == 1
    assert f"{state / 'quarantined.json'}: not a quarantine record" in result.stderr
    assert "move it aside" in result.stderr
    assert not (cgroups.warden_parent() / names[0]).exists()


@pytest.mark.parametrize("loose", ["state", "parent", "file"])
def test_a_state_directory_others_could_change_is_refused(tmp_path, names, loose):
    """Whoever can write there could lift a quarantine at the next restart, or have a DNS answer
    allow an address of theirs: refused as a loose policy file is, before anything changes. So
    is a file in it that others can write (planted before the directory was closed)."""
    state = tmp_path / "parent" / "state"
    state.mkdir(parents=True)
    named = {"state": state, "parent": tmp_path / "parent", "file": state / "dns_answers.json"}[loose]
    if loose == "file":
        named.write_text('{"answers": []}')
    named.chmod(0o777 if loose != "file" else 0o666)
    result = agent_with_state_dir(tmp_path, state, names[0])
    assert result.returncode == 1
    assert f"refusing the state directory {state}" in result.stderr
    mode = "mode 0666" if loose == "file" else "mode 0777 without the sticky bit"
    assert f"{named} is writable by group/others ({mode}): run chmod go-w" in result.stderr
    assert not (cgroups.warden_parent() / names[0]).exists() and not (tmp_path / "pins").exists()


@pytest.mark.parametrize("option, file", [("--events-file", "events.jsonl"), ("--socket", "agent.sock")])
def test_an_events_file_or_socket_in_a_directory_others_could_change_is_refused(tmp_path, names, option, file):
    """There anyone could put a link to any file in its place, and the agent, as root, would
    append events to what it points to, or give it to the socket's group (chown, chmod)."""
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    result = agent_with_state_dir(tmp_path, tmp_path / "state", names[0], option, str(loose / file))
    assert result.returncode == 1
    assert f"refusing {option} {loose / file}: whoever can change {loose}" in result.stderr
    assert f"directory {loose} is writable by group/others (mode 0777 without the sticky bit)" in result.stderr
    assert not (cgroups.warden_parent() / names[0]).exists()


def test_sigkilled_agent_leaves_enforcement_on(lab, start_agent, names):
    wl = names[0]
    attacker = lab.serve(Lab.ATTACKER4, 443)
    lab.serve(Lab.PROVIDER4, 443)
    agent = start_agent(allow_provider(wl), [wl])
    agent.kill9()
    assert attempt_errno(lab, agent, wl, Lab.ATTACKER4, 443) == EPERM
    assert attempt_errno(lab, agent, wl, Lab.PROVIDER4, 443) is None
    assert attacker.connections() == 0


def test_a_restarted_agent_drops_the_event_line_a_kill_cut_off(start_agent, names):
    wl = names[0]
    agent = start_agent(allow_provider(wl), [wl])
    agent.kill9()
    torn = b'{"agent":"test-agent","kind":"egress_de'
    with open(agent.events_file, "ab") as file:
        file.write(torn)
    agent.start()
    events = [json.loads(line) for line in agent.events_file.read_text().splitlines()]  # each line stands alone
    assert [e["kind"] for e in events].count("agent_started") == 2
    assert f"{len(torn)} bytes of an event line cut off" in agent.log.read_text()


@pytest.mark.parametrize("stop", ["sigkill", "sigterm"])
def test_restart_takes_over_without_a_window_or_duplicates(lab, start_agent, names, stop):
    wl = names[0]
    attacker = lab.serve(Lab.ATTACKER4, 443)
    agent = start_agent(allow_provider(wl), [wl])
    before = attached_warden_programs(agent.cgroup(wl))
    assert len(before) == 10  # connect, sendmsg, recvmsg, getpeername (4 and 6), sock_create, egress
    probe = lab.run_in_router(agent.router_cmd(wl, "probe", Lab.ATTACKER4, "443", "--seconds", "6"),
                              stdout=-1, stderr=-1, text=True)
    time.sleep(0.5)
    if stop == "sigkill":
        agent.kill9()
    else:
        assert agent.stop() == 0
    agent.start()
    after = attached_warden_programs(agent.cgroup(wl))
    result = outcome(probe)
    assert result["connected"] == 0 and result["refused"] > 100
    assert attacker.connections() == 0
    assert sorted(t for t, _ in after) == sorted(t for t, _ in before)
    assert not {p.id for _, p in after} & {p.id for _, p in before}


def test_a_workload_dropped_while_no_agent_ran_is_detached_at_start(lab, start_agent, names):
    """As a reload would have: the earlier agent's programs must not go on enforcing the old
    policy there, unseen. Another agent's workload (its own pin directory) is not touched."""
    kept, dropped = names
    other = unique_name("wo")
    neighbour = start_agent(allow_provider(other), [other])
    provider_only = f"{{cidr: {Lab.PROVIDER4}/32, ports: [443]}}"
    agent = start_agent(policy_of(workload_entry(kept, provider_only),
                                  workload_entry(dropped, provider_only, on_violation="quarantine")), [kept, dropped])
    warden(agent, "quarantine", dropped)
    agent.kill9()
    write_policy(agent.policy, allow_provider(kept))
    already = len(agent.events())
    agent.start()
    started = agent.wait_for(lambda e: e["kind"] == "agent_started", after=already)
    assert started["detail"]["detached_left_behind"] == [str(agent.cgroup(dropped))]
    assert attached_warden_programs(agent.cgroup(dropped)) == []
    assert not cgroups.is_frozen(agent.cgroup(dropped))
    assert len(attached_warden_programs(agent.cgroup(kept))) == 10
    assert len(attached_warden_programs(neighbour.cgroup(other))) == 10


def test_seq_keeps_increasing_across_restarts(lab, start_agent, names):
    wl = names[0]
    agent = start_agent(allow_provider(wl), [wl])
    agent.kill9()
    agent.start()
    seqs = [e["seq"] for e in agent.events()]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


@pytest.mark.parametrize("on_violation", ["kill", "deny"])
def test_leaving_the_cgroup_is_an_escape(lab, start_agent, names, on_violation):
    wl = names[0]
    agent = start_agent(allow_provider(wl, on_violation=on_violation), [wl])
    root_procs = cgroups.cgroup2_root() / "cgroup.procs"
    router = start_router(lab, agent.router_cmd(wl, "escape", str(root_procs)))
    # No waiting for the router to say it escaped: with `kill` it may be dead before it can.
    escape = agent.wait_for(lambda e: e["kind"] == "cgroup_escape")
    assert escape["process"]["pid"] == router.pid and escape["verdict"] == "deny"
    if on_violation == "kill":
        agent.wait_for(lambda e: e["kind"] == "action_kill")
        router.wait(timeout=5)
    else:
        assert read_json(router)["escaped"]
        assert escape["detail"]["returned_to_workload"]
        assert router.pid in cgroups.pids(agent.cgroup(wl))
        router.kill()


def test_what_an_escaped_process_forks_before_it_is_returned_is_returned_too(lab, start_agent, names):
    wl = names[0]
    attacker = lab.serve(Lab.ATTACKER4, 443)
    agent = start_agent(allow_provider(wl), [wl])
    root_procs = cgroups.cgroup2_root() / "cgroup.procs"
    agent.process.send_signal(signal.SIGSTOP)  # so that the fork surely comes before the return
    try:
        router = start_router(lab, agent.router_cmd(wl, "escape-fork", Lab.ATTACKER4, "443", str(root_procs)))
        forked = read_json(router)
        assert str(forked["child"]) in root_procs.read_text().split()  # outside every program
    finally:
        agent.process.send_signal(signal.SIGCONT)
    escape = agent.wait_for(lambda e: e["kind"] == "cgroup_escape")
    assert escape["detail"]["forked_there_and_returned"] == [forked["child"]]
    child = read_json(router)
    assert child["errno"] == EPERM and attacker.received_bytes() == 0


def test_ring_buffer_overrun_is_reported(lab, start_agent, names):
    wl = names[0]
    agent = start_agent(allow_provider(wl), [wl])
    agent.process.send_signal(signal.SIGSTOP)
    try:
        flood = lab.run_in_router(agent.router_cmd(wl, "probe", Lab.ATTACKER4, "443",
                                                      "--seconds", "5", "--interval", "0"),
                                  stdout=-1, stderr=-1, text=True)
        flooded = outcome(flood)
    finally:
        agent.process.send_signal(signal.SIGCONT)
    agent.wait_for(lambda e: e["kind"] == "events_lost", timeout=30)
    # Every refusal is either an event or counted as lost; the one extra loss allowed is
    # the router's own exit record, written while the ring buffer was still full.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        events = agent.events()
        lost = sum(e["detail"]["count"] for e in events if e["kind"] == "events_lost")
        # Identical refusals are folded into one event that carries their count.
        denied = sum(e["detail"].get("count", 1) for e in events if e["kind"] == "egress_denied")
        if lost + denied >= flooded["refused"]:
            break
        time.sleep(0.2)
    assert lost > 0
    assert flooded["refused"] <= lost + denied <= flooded["refused"] + 1


def test_run_as_another_user(lab, start_agent, names):
    wl = names[0]
    agent = start_agent(allow_provider(wl), [wl])
    out = subprocess.run(agent.run_cmd(wl, ["id", "-u"], "--user", "nobody"), capture_output=True, text=True, cwd=REPO)
    assert out.stdout.strip() == "65534", out.stderr


def test_run_refuses_a_workload_the_agent_does_not_guard():
    out = subprocess.run([*WARDEN, "run", unique_name("unguarded"), "--", "true"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 1 and "not enforced" in out.stderr


SOCK_CREATE = "int ew_sock_create(struct bpf_sock *sk) {"


@pytest.mark.parametrize("breakage, error", [
    (lambda source: source + "\nthis is not C;\n", "[Cc]ompile"),
    # compiles, and bcc pins the maps, but the verifier refuses a read past struct bpf_sock
    (lambda source: source.replace(SOCK_CREATE, SOCK_CREATE + " if (*((volatile u32 *)sk + 1024)) return 0;"),
     "ew_sock_create"),
], ids=["compile", "verifier"])
def test_a_program_set_that_fails_to_load_leaves_no_pin_directory(tmp_path, breakage, error):
    source = (REPO / "bpf" / "warden.bpf.c").read_text()
    assert SOCK_CREATE in source
    broken = tmp_path / "warden.bpf.c"
    broken.write_text(breakage(source))
    pin_dir = Path("/sys/fs/bpf") / f"ew-test-{unique_name('broken')}"
    with pytest.raises(Exception, match=error):
        KernelPrograms(source=broken, pin_dir=pin_dir)
    assert not pin_dir.exists()


def test_startup_duration_is_logged(start_agent, names):
    wl = names[0]
    agent = start_agent(allow_provider(wl), [wl])
    assert "enforcing 1 workload(s) after" in agent.log.read_text()
    started = next(e for e in agent.events() if e["kind"] == "agent_started")
    assert 0 < started["detail"]["startup_seconds"] < 30


def test_exe_glob_matches_the_path_a_venv_python_was_started_by(lab, start_agent, names, tmp_path):
    wl = names[0]
    venv_python = tmp_path / "venv" / "bin" / "python3"
    venv_python.parent.mkdir(parents=True)
    venv_python.symlink_to(sys.executable)  # as `python -m venv` makes it
    agent = start_agent(allow_provider(wl, match=f"{{exe: ['{tmp_path}/venv/bin/python3*']}}"), [wl])
    router = start_router(lab, [str(venv_python), ROUTER, "tcp", Lab.ATTACKER4, "443", "--wait"])
    agent.wait_for(lambda e: e["kind"] == "process_joined" and e["process"]["pid"] == router.pid)
    router.stdin.write("go\n")
    router.stdin.flush()
    assert read_json(router)["errno"] == EPERM


def test_detach_ends_enforcement_on_purpose(lab, start_agent, names):
    wl = names[0]
    lab.serve(Lab.ATTACKER4, 443)
    agent = start_agent(allow_provider(wl), [wl])
    agent.kill9()
    hold = start_router(lab, agent.router_cmd(wl, "hold", Lab.ATTACKER4, "443"))
    assert not read_json(hold)["connected"]
    out = subprocess.run([*WARDEN, "detach", wl], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "detached" in out.stdout
    assert attached_warden_programs(agent.cgroup(wl)) == []
    # The cgroup still exists, but nothing guards it any more.
    cgroup = agent.cgroup(wl)
    probe = start_router(lab, ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$0" "$@"',
                               sys.executable, ROUTER, "tcp", Lab.ATTACKER4, "443"])
    assert read_json(probe)["ok"]
    # An uninstall also takes the cgroup away, killing what still runs in it, and frees the
    # kernel memory the byte counters keep pinned after the agent is gone.
    left = subprocess.Popen(["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && echo in && exec sleep 60'],
                            stdout=subprocess.PIPE, text=True)
    assert left.stdout.readline() == "in\n"
    assert sorted(p.name for p in agent.pin_dir.iterdir()) == ["sock_owners", "sock_slots", "traffic"]
    out = subprocess.run([*WARDEN, "detach", "--remove-cgroups", "--remove-pins", "--pin-dir", str(agent.pin_dir), wl],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and f"{cgroup}: removed" in out.stdout
    assert f"{agent.pin_dir}: removed 3 pinned map(s)" in out.stdout
    assert not cgroup.exists()
    assert left.wait(timeout=5) == -signal.SIGKILL
    assert not agent.pin_dir.exists()


def test_a_storm_of_signals_never_wedges_the_agent(start_agent, names):
    # A signal can arrive while the handler of the one before still runs (`systemctl reload`
    # in a loop; Ctrl-C and SIGTERM together): a handler that took a lock then waited forever
    # on the lock its own thread held.
    wl = names[0]
    agent = start_agent(allow_provider(wl), [wl])
    sent = 0
    end = time.monotonic() + 2
    while time.monotonic() < end:
        agent.process.send_signal(signal.SIGHUP)
        sent += 1
    assert agent.stop() == 0, f"the agent did not stop after {sent} SIGHUPs:\n{agent.log.read_text()}"
    kinds = [e["kind"] for e in agent.events()]
    assert kinds[-1] == "agent_stopped"
    assert kinds.count("policy_loaded") >= 2  # the requests were acted on, not lost
