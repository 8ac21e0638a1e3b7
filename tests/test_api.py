"""The gRPC API end to end: a real agent, real gRPC over its Unix socket and over mutual
TLS, real kernel denials as the events (agent/lab/network.py), certificates made here."""
import grp
import json
import os
import random
import subprocess
import sys
import time

import grpc
import pytest

from agent.events.redact import MAX_CMDLINE_CHARS
from agentproc import workload_policy, write_policy
from fulldisk import fill, small_filesystem
from apiclient import flood, free_port, pb, read_all, read_batches, tls_stub, unix_stub, settle
from certs import Authority
from agent.lab.network import Lab

pytestmark = pytest.mark.root


def policy(name: str, on_violation: str = "deny") -> str:
    return workload_policy(name, f"{{cidr: {Lab.PROVIDER4}/32, ports: [443], protocol: tcp}}",
                           on_violation=on_violation)


def hold_connection(lab, agent, workload):
    """A router in `workload` holding an allowed connection to the provider; returns (process, pid)."""
    router = lab.run_in_router(agent.router_cmd(workload, "hold", Lab.PROVIDER4, "443"),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    hello = json.loads(router.stdout.readline())
    assert hello["connected"], hello
    return router, hello["pid"]


def test_the_whole_api_on_the_unix_socket(lab, start_agent, names, tmp_path):
    wl = names[0]
    lab.serve(Lab.PROVIDER4, 443)
    agent = start_agent(policy(wl), [wl])
    assert os.stat(agent.socket).st_mode & 0o777 == 0o660
    router, pid = hold_connection(lab, agent, wl)
    with unix_stub(agent) as api:
        status = api.GetStatus(pb.GetStatusRequest(), timeout=10)
        assert status.agent == "test-agent" and status.uptime_seconds > 0
        assert "ew_connect4" in status.kernel_features
        assert [(w.name, w.mode, w.state, w.processes) for w in status.workloads] == [(wl, "enforce", "guarded", 1)]
        assert status.event_counts["policy_loaded"] == 1 and status.spool.newest_seq >= 2

        assert [w.name for w in api.ListWorkloads(pb.ListWorkloadsRequest(), timeout=10).workloads] == [wl]
        [process] = api.ListProcesses(pb.ListProcessesRequest(workload=wl), timeout=10).processes
        assert process.process.pid == pid and process.workload == wl and "hold" in process.process.cmdline
        assert [(d.ip, d.port, d.protocol, d.state) for d in process.destinations] == \
            [(Lab.PROVIDER4, 443, "tcp", "established")]

        in_force = api.GetPolicy(pb.GetPolicyRequest(), timeout=10)
        assert in_force.path == str(agent.policy) and json.loads(in_force.policy_json)["workloads"][0]["name"] == wl
        checked = api.CheckPolicy(pb.CheckPolicyRequest(text="version: 1\nworkloads:\n  - name: Bad!\n"), timeout=10)
        assert not checked.ok and checked.problems[0].line == 3 and "name" in checked.problems[0].key
        assert api.CheckPolicy(pb.CheckPolicyRequest(text=policy("other")), timeout=10).workloads == ["other"]

        quarantined = api.Quarantine(pb.WorkloadRequest(workload=wl), timeout=10).event
        assert quarantined.kind == "action_quarantine" and json.loads(quarantined.detail_json)["frozen_pids"] == [pid]
        assert api.ListWorkloads(pb.ListWorkloadsRequest(), timeout=10).workloads[0].state == "quarantined"
        assert api.Release(pb.WorkloadRequest(workload=wl), timeout=10).event.kind == "action_release"
        assert api.Kill(pb.WorkloadRequest(workload=wl), timeout=10).event.kind == "action_kill"
        router.wait(timeout=10)
        with pytest.raises(grpc.RpcError) as unknown:
            api.Kill(pb.WorkloadRequest(workload="no-such"), timeout=10)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

        reloaded = api.ReloadPolicy(pb.ReloadPolicyRequest(), timeout=10)
        assert reloaded.ok and reloaded.event.kind == "policy_loaded"
        write_policy(agent.policy, "version: 1\nworkloads: nope\n")
        refused = api.ReloadPolicy(pb.ReloadPolicyRequest(), timeout=10)
        assert not refused.ok and refused.event.kind == "policy_rejected" and refused.problems

        settle(agent)
        every = read_all(api, since_seq=0)
        assert [e.seq for e in every] == [e["seq"] for e in agent.events()][: len(every)]
        assert [json.loads(e.json) for e in every] == agent.events()[: len(every)]
        kills = read_all(api, since_seq=0, kinds=["action_kill"], workloads=[wl])
        assert [e.kind for e in kills] == ["action_kill"]
        assert {e.process.pid for e in read_all(api, since_seq=0, pid=pid)} == {pid}
        assert [e.seq for e in read_all(api, last=2)] == [e.seq for e in every[-2:]]


@pytest.fixture
def pki(tmp_path):
    return {"server_ca": Authority(tmp_path, "server-ca"), "client_ca": Authority(tmp_path, "client-ca"),
            "rogue_ca": Authority(tmp_path, "rogue-ca")}


def test_mtls_serves_read_only_calls_and_refuses_strangers(start_agent, names, tmp_path, pki):
    wl = names[0]
    server = pki["server_ca"].issue("agent-server", server=True)
    port = free_port()
    agent = start_agent(policy(wl), [wl], agent_args=[
        "--listen", f"127.0.0.1:{port}", "--tls-cert", str(server.cert), "--tls-key", str(server.key),
        "--tls-client-ca", str(pki["client_ca"].cert)])
    collector = pki["client_ca"].issue("collector")
    settle(agent)
    with tls_stub(port, pki["server_ca"].cert, collector) as api:
        assert [w.name for w in api.GetStatus(pb.GetStatusRequest(), timeout=10).workloads] == [wl]
        assert any(e.kind == "agent_started" for e in read_all(api, since_seq=0))
        assert read_all(api, batched=True, since_seq=0) == read_all(api, since_seq=0)
        for call, request in (("Kill", pb.WorkloadRequest(workload=wl)), ("Quarantine", pb.WorkloadRequest(workload=wl)),
                              ("Release", pb.WorkloadRequest(workload=wl)), ("ReloadPolicy", pb.ReloadPolicyRequest())):
            with pytest.raises(grpc.RpcError) as refused:
                getattr(api, call)(request, timeout=10)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, call
    assert not [e for e in agent.events() if e["kind"].startswith("action_")]

    for stranger in (pki["rogue_ca"].issue("intruder"), None):  # signed by another CA; no certificate at all
        with tls_stub(port, pki["server_ca"].cert, stranger) as api:
            with pytest.raises(grpc.RpcError) as refused:
                api.GetStatus(pb.GetStatusRequest(), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, stranger
    with unix_stub(agent) as api:  # and the agent is none the worse for it
        assert api.GetStatus(pb.GetStatusRequest(), timeout=10).agent == "test-agent"


def test_malformed_and_oversized_requests_get_grpc_errors(start_agent, names):
    wl = names[0]
    agent = start_agent(policy(wl), [wl])
    with grpc.insecure_channel(f"unix:{agent.socket}") as channel:
        raw = channel.unary_unary("/egress_warden.v1.Agent/CheckPolicy")
        with pytest.raises(grpc.RpcError) as garbage:
            raw(b"\xff\xff\xff\xff\x0f", timeout=10)
        assert garbage.value.code() == grpc.StatusCode.INTERNAL
        with pytest.raises(grpc.RpcError) as unknown:
            channel.unary_unary("/egress_warden.v1.Agent/Explode")(b"", timeout=10)
        assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with unix_stub(agent) as api:
        with pytest.raises(grpc.RpcError) as oversized:
            api.CheckPolicy(pb.CheckPolicyRequest(text="#" * (2 << 20)), timeout=10)
        assert oversized.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as bad_kind:
            read_all(api, kinds=["egress_maybe"])
        assert bad_kind.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as no_name:
            api.Quarantine(pb.WorkloadRequest(), timeout=10)
        assert no_name.value.code() == grpc.StatusCode.NOT_FOUND
        assert api.GetStatus(pb.GetStatusRequest(), timeout=10).agent == "test-agent"
    assert agent.process.poll() is None


CONNECT_AS_NOBODY = """
import os, socket, sys
os.setgroups([]); os.setgid(65534); os.setuid(65534)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
    print("connected")
except OSError as e:
    print(e.errno)
"""


@pytest.mark.parametrize("group,outcome", [("root", "13"), ("nogroup", "connected")])
def test_only_root_and_the_socket_group_may_connect(start_agent, names, group, outcome):
    """nobody (uid and gid 65534) is refused by the socket's mode 0660 unless the socket's
    group is nobody's own: the second case proves the first fails for the mode, not the path."""
    wl = names[0]
    agent = start_agent(policy(wl), [wl], agent_args=["--socket-group", grp.getgrgid(65534).gr_name]
                        if group == "nogroup" else [])
    os.chmod(agent.socket_dir, 0o755)  # the directory may be searched by anyone; the socket decides
    done = subprocess.run([sys.executable, "-c", CONNECT_AS_NOBODY, str(agent.socket)],
                          capture_output=True, text=True, timeout=30)
    assert done.stdout.strip() == outcome, done.stderr


@pytest.mark.parametrize("batched", [False, True], ids=["WatchEvents", "WatchEventBatches"])
def test_a_subscriber_that_keeps_disconnecting_gets_every_event_once_in_order(lab, start_agent, names, batched):
    wl = names[0]
    agent = start_agent(policy(wl), [wl])
    router = flood(lab, agent, wl, seconds=4)
    seen: list[int] = []
    reconnects = 0
    with unix_stub(agent) as api:
        while router.poll() is None:
            seen += take_some(api, seen[-1] if seen else 0, random.randint(1, 400), batched)
            reconnects += 1
        settle(agent)
        seen += [e.seq for e in read_all(api, batched, since_seq=seen[-1])]
    published = [e["seq"] for e in agent.events()]
    denials = sum(e["kind"] == "egress_denied" for e in agent.events())
    assert denials > 500 and reconnects > 5, (denials, reconnects)
    assert seen == published


def take_some(api, since: int, count: int, batched: bool = False) -> list[int]:
    """Follow from `since`, read `count` events (or what comes within a second; batched: the
    batches that hold at least `count`), hang up."""
    request = pb.WatchEventsRequest(since_seq=since, follow=True)
    stream = api.WatchEventBatches(request, timeout=1.0) if batched else api.WatchEvents(request, timeout=1.0)
    got = []
    try:
        for message in stream:
            got += [e.seq for e in message.events] if batched else [message.seq]
            if len(got) >= count:
                break
    except grpc.RpcError as e:
        assert e.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE), e
    finally:
        stream.cancel()
    return got


def test_a_resume_from_beyond_what_the_agent_ever_published_is_refused_not_answered_with_nothing(
        lab, start_agent, names):
    """As a collector sees an agent whose state directory was wiped: the seqs it stored are
    beyond all the agent has, and the agent's new events would take seqs already stored."""
    wl = names[0]
    agent = start_agent(policy(wl), [wl])
    newest = settle(agent)[-1]["seq"]
    with unix_stub(agent) as api:
        assert read_all(api, since_seq=newest) == []  # caught up: nothing yet, no error
        with pytest.raises(grpc.RpcError) as beyond:
            read_all(api, since_seq=newest + 5000)
    assert beyond.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "another --agent-id" in beyond.value.details()


def test_resume_across_an_agent_killed_and_restarted(lab, start_agent, names):
    wl = names[0]
    agent = start_agent(policy(wl), [wl])
    router = flood(lab, agent, wl, seconds=6)
    seen: list[int] = []
    with unix_stub(agent) as api:
        while len(seen) < 300:
            seen += take_some(api, seen[-1] if seen else 0, 100)
    agent.kill9()  # in the middle of the flood: some published events may not be durable yet
    agent.start()
    with unix_stub(agent) as api:
        while router.poll() is None:
            seen += take_some(api, seen[-1], 200)
        settle(agent)
        seen += [e.seq for e in read_all(api, since_seq=seen[-1])]
        spooled = [e.seq for e in read_all(api, since_seq=0)]
    assert seen == spooled and len(seen) == len(set(seen))
    published = agent.events()
    # What the killed agent published but had not yet made durable lies in the seq range an
    # events_lost event of the new agent names; everything else arrived exactly once.
    gaps = [e["detail"] for e in published if e["kind"] == "events_lost" and e["detail"].get("at_most")]
    missing = [e["seq"] for e in published if e["seq"] not in set(seen)]
    assert all(any(g["first_seq"] <= s <= g["last_seq"] for g in gaps) for s in missing), (missing, gaps)
    assert seen == sorted(seen) and seen[-1] == published[-1]["seq"]
    assert sum(e["kind"] == "agent_started" for e in published) == 2


@pytest.mark.parametrize("batched", [False, True], ids=["WatchEvents", "WatchEventBatches"])
def test_the_spool_bound_drops_the_oldest_and_a_resume_learns_how_many(lab, start_agent, names, batched):
    wl = names[0]
    agent = start_agent(policy(wl), [wl], agent_args=["--spool-max-bytes", "40000"])
    flood(lab, agent, wl, seconds=1.5).wait(timeout=30)
    published = [e["seq"] for e in settle(agent)]
    with unix_stub(agent) as api:
        spool = api.GetStatus(pb.GetStatusRequest(), timeout=10).spool
        assert 0 < spool.bytes <= 40000 and spool.dropped > 0
        lost, *kept = read_all(api, batched, since_seq=0)
        assert lost.kind == "events_lost"
        assert kept[0].seq == spool.oldest_seq and [e.seq for e in kept] == published[-len(kept):]
        assert json.loads(lost.detail_json)["count"] == published.index(spool.oldest_seq) == spool.dropped
        assert lost.seq == spool.oldest_seq - 1
        middle = published[published.index(spool.oldest_seq) // 2]
        lost_after_middle, first_kept = read_all(api, batched, since_seq=middle)[:2]
        assert json.loads(lost_after_middle.detail_json)["count"] == len([s for s in published if middle < s < spool.oldest_seq])
        assert first_kept.seq == spool.oldest_seq
        # Resuming from the events_lost event's own seq never repeats it.
        assert read_all(api, batched, since_seq=lost.seq)[0].seq == spool.oldest_seq


def test_a_subscriber_the_bound_overtakes_while_it_streams_learns_exactly_what_it_missed(lab, start_agent, names):
    wl = names[0]
    agent = start_agent(policy(wl), [wl], agent_args=["--spool-max-bytes", "40000"])
    with unix_stub(agent) as api:
        stream = api.WatchEvents(pb.WatchEventsRequest(since_seq=0, follow=True), timeout=120)
        first = next(stream)  # the stream is open and has read its first page; now it stalls
        flood(lab, agent, wl, seconds=3).wait(timeout=30)
        published = [e["seq"] for e in settle(agent)]
        assert api.GetStatus(pb.GetStatusRequest(), timeout=10).spool.oldest_seq > 1000  # far beyond the cursor
        seen, lost = [first.seq], []
        for event in stream:
            detail = json.loads(event.detail_json)
            if event.kind == "events_lost" and detail["where"].startswith("spool bound"):
                lost.append((detail["first_seq"], detail["last_seq"], detail["count"]))
            else:
                seen.append(event.seq)
            if event.seq >= published[-1]:
                break
        stream.cancel()
    assert lost and seen == sorted(seen)
    # Every seq published is either delivered or in a range an events_lost names, with its count right.
    missing = sorted(set(published) - set(seen))
    assert missing == [s for s in published if any(first <= s <= last for first, last, _ in lost)]
    assert sum(count for _, _, count in lost) == len(missing)


def test_a_router_with_a_huge_command_line_cannot_stop_a_subscriber(lab, start_agent, names):
    wl = names[0]
    agent = start_agent(policy(wl), [wl])
    # 15 of the longest arguments Linux takes, of bytes that are not UTF-8: each becomes U+FFFD,
    # six bytes in JSON. Whole, the event would be larger than a gRPC message may be.
    junk = os.fsdecode(b"\xff" * (128 * 1024 - 1))
    probe = ["probe", Lab.ATTACKER4, "443", "--seconds", "1", "--interval", "0.1"]  # alive while the agent reads it
    router = lab.run_in_router(agent.router_cmd(wl, *probe, *["--tag", junk] * 15),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert json.loads(router.communicate(timeout=30)[0])["refused"] > 0
    published = settle(agent)
    with unix_stub(agent) as api:
        streamed = read_all(api, since_seq=0)
    assert [e.seq for e in streamed] == [e["seq"] for e in published]
    denied = next(e for e in streamed if e.kind == "egress_denied")
    *kept, cut = denied.process.cmdline
    assert sum(map(len, kept)) == MAX_CMDLINE_CHARS and cut.endswith("more characters not kept>")


def test_a_full_events_file_disk_stops_no_kill_and_the_spool_keeps_every_event(lab, start_agent, names, tmp_path):
    wl = names[0]
    with small_filesystem(tmp_path / "small", "256k") as small:
        agent = start_agent(policy(wl, on_violation="kill"), [wl], events_file=small / "events.jsonl")
        fill(small / "filler")
        fill(agent.events_file, b"\n")  # the last page of the events file too
        router = lab.run_in_router(agent.router_cmd(wl, "tcp", Lab.ATTACKER4, "443"), stdout=-1, stderr=-1)
        assert router.wait(timeout=10) == -9
        with unix_stub(agent) as api:
            deadline = time.monotonic() + 10
            while not [e for e in read_all(api, since_seq=0) if e.kind == "action_kill"]:
                assert time.monotonic() < deadline, "no action_kill in the spool"
                time.sleep(0.1)
        assert "events file: cannot write" in agent.log.read_text()
        agent.stop()


def test_the_events_file_rotates_by_size_and_the_spool_keeps_every_event(lab, start_agent, names):
    wl = names[0]
    agent = start_agent(policy(wl), [wl], agent_args=["--events-max-bytes", "20000", "--events-keep", "2"])
    flood(lab, agent, wl, seconds=10, count=400).wait(timeout=30)
    settle(agent)
    path = agent.events_file
    files = [path.with_name(f"{path.name}.2"), path.with_name(f"{path.name}.1"), path]
    assert all(f.exists() and f.stat().st_size <= 20000 for f in files)
    assert not path.with_name(f"{path.name}.3").exists()  # beyond --events-keep: deleted
    seqs = [json.loads(line)["seq"] for f in files for line in f.read_text().splitlines()]  # whole lines only
    assert seqs[0] > 1 and seqs == list(range(seqs[0], seqs[-1] + 1))  # the newest, in order, none missing
    with unix_stub(agent) as api:
        assert [e.seq for e in read_all(api, since_seq=0)] == list(range(1, seqs[-1] + 1))  # the spool: all


def test_event_batches_carry_what_watch_events_does_filters_included(lab, start_agent, names):
    wl = names[0]
    agent = start_agent(policy(wl), [wl])
    flood(lab, agent, wl, seconds=2).wait(timeout=30)
    published = settle(agent)
    pid = next(e["process"]["pid"] for e in published if e["kind"] == "egress_denied")
    middle = published[len(published) // 2]
    requests = [{"since_seq": 0}, {"since_seq": middle["seq"]}, {"since_time": middle["time"]}, {"last": 300},
                {"workloads": [wl], "kinds": ["egress_denied"]}, {"kinds": ["agent_started", "policy_loaded"]},
                {"pid": pid}, {"workloads": [names[1]]}]
    with unix_stub(agent) as api:
        for request in requests:
            batches = read_batches(api, **request)
            seqs = [e.seq for b in batches for e in b.events]
            assert [e.seq for e in read_all(api, **request)] == seqs, request
            assert seqs == sorted(set(seqs)) and all(0 < len(b.events) <= 512 for b in batches), request
        assert [e.seq for e in read_all(api, batched=True, since_seq=0)] == [e["seq"] for e in published]
        assert len(published) > 600 and 512 in [len(b.events) for b in read_batches(api, since_seq=0)]
        assert {e.kind for e in read_all(api, batched=True, kinds=["egress_denied"])} == {"egress_denied"}
        assert read_all(api, batched=True, workloads=[names[1]]) == []
        assert len(read_all(api, batched=True, last=300)) == 300


def test_a_batch_follower_gets_each_event_at_once_when_the_agent_is_idle(start_agent, names):
    """No waiting to fill a batch: on an idle agent each control action's event comes alone,
    while the stream stays open (a batch held back for more would never arrive here)."""
    wl = names[0]
    agent = start_agent(policy(wl), [wl])
    newest = settle(agent)[-1]["seq"]
    with unix_stub(agent) as api:
        stream = api.WatchEventBatches(pb.WatchEventsRequest(since_seq=newest, follow=True), timeout=30)
        try:
            for act in (api.Quarantine, api.Release):
                event = act(pb.WorkloadRequest(workload=wl), timeout=10).event
                assert [e.seq for e in next(stream).events] == [event.seq]
        finally:
            stream.cancel()


def test_the_spool_forgets_events_older_than_its_age_bound(start_agent, names):
    wl = names[0]
    agent = start_agent(policy(wl), [wl], agent_args=["--spool-max-age", "1s"])
    newest = settle(agent)[-1]["seq"]
    with unix_stub(agent) as api:
        deadline = time.monotonic() + 15
        while api.GetStatus(pb.GetStatusRequest(), timeout=10).spool.events:
            assert time.monotonic() < deadline, "the age bound never dropped anything"
            time.sleep(0.2)
        [lost] = read_all(api, since_seq=0)
        assert lost.kind == "events_lost" and json.loads(lost.detail_json)["count"] == newest


def test_status_reports_posture_of_workload_processes(lab, start_agent, names):
    """`warden run` drops the escape capabilities, so a router it starts as root is warned
    for root and its cgroup.procs access only; one started as nobody is not warned."""
    wl = names[0]
    lab.serve(Lab.PROVIDER4, 443)
    agent = start_agent(policy(wl), [wl])
    router, root_pid = hold_connection(lab, agent, wl)
    with unix_stub(agent) as api:
        [workload] = api.GetStatus(pb.GetStatusRequest(), timeout=10).workloads
        assert {(w.pid, w.code) for w in workload.posture} == {(root_pid, "runs_as_root"),
                                                               (root_pid, "can_leave_cgroup")}
        shown = subprocess.run([sys.executable, "-m", "agent.cli", "status", "--socket", str(agent.socket)],
                               capture_output=True, text=True, timeout=30)
        assert shown.returncode == 0 and f"{wl}: pid {root_pid} runs as root" in shown.stdout, shown.stdout
        router.kill()
        router.wait()
        nobody = lab.run_in_router(agent.run_cmd(wl, [sys.executable, "-c", "import time; time.sleep(60)"],
                                                 "--user", "nobody"))
        try:
            deadline = time.monotonic() + 10
            while True:
                [workload] = api.ListWorkloads(pb.ListWorkloadsRequest(), timeout=10).workloads
                # Until `warden run` has switched user, the process is still root.
                if (workload.processes == 1 and not workload.posture) or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert workload.processes == 1 and list(workload.posture) == []
        finally:
            nobody.kill()
            nobody.wait()


def test_identical_refusals_are_folded_with_exact_counts(lab, start_agent, names):
    wl = names[0]
    agent = start_agent(policy(wl), [wl])
    router = lab.run_in_router(agent.router_cmd(wl, "probe", Lab.ATTACKER4, "443", "--seconds", "2", "--interval", "0"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    refused = json.loads(router.communicate(timeout=60)[0].splitlines()[-1])["refused"]
    settle(agent, quiet=1.0)  # longer than the fold window: every count is published
    with unix_stub(agent) as api:
        denials = read_all(api, since_seq=0, workloads=[wl], kinds=["egress_denied"])
        lost = api.GetStatus(pb.GetStatusRequest(), timeout=10).kernel_records_lost
    counts = [json.loads(e.detail_json).get("count", 1) for e in denials]
    assert refused > 1000 and len(denials) < refused / 10, (refused, len(denials))
    assert sum(counts) + lost == refused
    folded = [json.loads(e.detail_json) for e in denials if "repeat_of" in json.loads(e.detail_json)]
    assert folded and all(d["repeat_of"] in {e.seq for e in denials} for d in folded)
