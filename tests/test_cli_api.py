"""The SRE commands against a real agent: through click's runner (in process, real gRPC)
and as subprocesses, the way people and scripts run them."""
import json
import os
import subprocess
import time

import pytest
from click.testing import CliRunner

from agent.cli import main
from agentproc import REPO, WARDEN, workload_policy, write_policy
from apiclient import free_port, settle
from certs import Authority
from agent.lab.network import Lab

pytestmark = pytest.mark.root


def policy(name: str) -> str:
    return workload_policy(name, f"{{cidr: {Lab.PROVIDER4}/32, ports: [443]}}")


@pytest.fixture
def agent(start_agent, names):
    started = start_agent(policy(names[0]), [names[0]])
    settle(started)  # its first events are in the spool
    return started


def warden(agent, *args: str):
    result = CliRunner().invoke(main, list(args), env={"WARDEN_SOCKET": str(agent.socket)})
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_status_workloads_and_ps_as_tables_and_json(agent, names):
    wl = names[0]
    table = warden(agent, "status")
    assert table.exit_code == 0 and "test-agent" in table.output and wl in table.output
    status = json.loads(warden(agent, "status", "-o", "json").output)
    assert status["workloads"][0]["name"] == wl and int(status["spool"]["newest_seq"]) >= 2
    listed = warden(agent, "workloads")
    assert listed.output.splitlines()[0].split()[:3] == ["WORKLOAD", "MODE", "ON_VIOLATION"]
    assert f"cidr {Lab.PROVIDER4}/32" in listed.output
    assert json.loads(warden(agent, "ps", wl, "-o", "json").output) == []
    missing = warden(agent, "ps", "no-such-workload")
    assert missing.exit_code == 1 and missing.output.strip().startswith("warden: no workload named")


def test_events_as_json_lines_with_filters_and_resume(agent, names):
    wl = names[0]
    assert warden(agent, "quarantine", wl).exit_code == 0
    assert warden(agent, "release", wl).exit_code == 0
    lines = [json.loads(line) for line in warden(agent, "events", "--since", "0", "-o", "json").output.splitlines()]
    assert lines == agent.events()[: len(lines)] and [e["kind"] for e in lines][-2:] == ["action_quarantine",
                                                                                          "action_release"]
    only = warden(agent, "events", "--since", "0", "--kind", "action_release", "--workload", wl, "-o", "json")
    assert [json.loads(line)["kind"] for line in only.output.splitlines()] == ["action_release"]
    resumed = warden(agent, "events", "--since", str(lines[-2]["seq"]), "-o", "json").output.splitlines()
    assert [json.loads(line)["seq"] for line in resumed] == [lines[-1]["seq"]]
    recent = warden(agent, "events", "--since", "10m")
    assert recent.exit_code == 0 and "action_release" in recent.output
    assert warden(agent, "events", "--since", "soon").exit_code == 2


def test_control_commands_and_policy_reload(agent, names):
    wl = names[0]
    killed = warden(agent, "kill", wl, "-o", "json")
    assert killed.exit_code == 0 and json.loads(killed.output)["kind"] == "action_kill"
    unknown = warden(agent, "kill", "no-such")
    assert unknown.exit_code == 1 and len(unknown.output.strip().splitlines()) == 1
    reloaded = warden(agent, "policy", "reload")
    assert reloaded.exit_code == 0 and reloaded.output.startswith("reloaded:")
    write_policy(agent.policy, "version: 1\nworkloads:\n  - name: Bad!\n")
    refused = warden(agent, "policy", "reload")
    assert refused.exit_code == 1 and "the policy in force stays" in refused.output
    assert json.loads(warden(agent, "workloads", "-o", "json").output)[0]["name"] == wl


def test_no_agent_is_one_line_that_says_how_to_start_it(tmp_path):
    done = subprocess.run([*WARDEN, "status", "--socket", str(tmp_path / "none.sock")], capture_output=True,
                          text=True, cwd=REPO)
    assert done.returncode == 3
    assert done.stderr.count("\n") == 1 and "warden agent --policy" in done.stderr and not done.stdout
    assert "3  no agent answers" in subprocess.run([*WARDEN, "status", "--help"], capture_output=True, text=True,
                                                   cwd=REPO).stdout


def test_events_follow_as_a_subprocess(agent, names):
    wl = names[0]
    env = {**os.environ, "WARDEN_SOCKET": str(agent.socket)}
    follower = subprocess.Popen([*WARDEN, "events", "-f", "--kind", "action_quarantine", "-o", "json"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    try:
        time.sleep(1.0)  # let it subscribe; what it missed it would get anyway (--last)
        assert subprocess.run([*WARDEN, "quarantine", wl], env=env, cwd=REPO, capture_output=True).returncode == 0
        event = json.loads(follower.stdout.readline())
        assert event["kind"] == "action_quarantine" and event["workload"] == wl
    finally:
        follower.terminate()
        follower.wait(timeout=10)


def test_a_remote_agent_over_mtls_answers_reads_and_refuses_control(start_agent, names, tmp_path):
    wl = names[0]
    server_ca, client_ca = Authority(tmp_path, "server-ca"), Authority(tmp_path, "client-ca")
    server, client = server_ca.issue("agent", server=True), client_ca.issue("sre")
    port = free_port()
    start_agent(policy(wl), [wl], agent_args=["--listen", f"127.0.0.1:{port}", "--tls-cert", str(server.cert),
                                              "--tls-key", str(server.key), "--tls-client-ca", str(client_ca.cert)])
    remote = ["--server", f"127.0.0.1:{port}", "--tls-ca", str(server_ca.cert), "--tls-cert", str(client.cert),
              "--tls-key", str(client.key)]
    runner = CliRunner()
    assert wl in runner.invoke(main, ["workloads", *remote]).output
    refused = runner.invoke(main, ["kill", wl, *remote])
    assert refused.exit_code == 4 and "Unix socket only" in refused.output
    assert runner.invoke(main, ["status", "--server", f"127.0.0.1:{port}"]).exit_code == 2  # no --tls-ca


@pytest.mark.parametrize("command", [["agent", "--policy", "{pem}", "--listen", "127.0.0.1:1", "--tls-cert", "{pem}",
                                      "--tls-client-ca", "{pem}", "--tls-key", "{key}"],
                                     ["status", "--server", "127.0.0.1:1", "--tls-ca", "{pem}", "--tls-cert", "{pem}",
                                      "--tls-key", "{key}"]])
def test_a_private_key_others_can_read_is_refused_before_anything_starts(tmp_path, command):
    """As ssh refuses it: whoever reads the agent's key can pose as the agent to its collectors."""
    pem, key = tmp_path / "c.pem", tmp_path / "c.key"
    pem.write_text("x")
    key.write_text("x")
    key.chmod(0o644)
    result = CliRunner().invoke(main, [arg.format(pem=pem, key=key) for arg in command])
    assert result.exit_code == 2
    assert f"{key} can be read by group/others (mode 0644): run chmod 600 {key}" in result.output
