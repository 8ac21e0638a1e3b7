"""`warden demo` end to end, as a newcomer runs it: the story it tells, and that it leaves
nothing behind, also when interrupted with Ctrl-C."""
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent import cgroups
from agentproc import REPO

pytestmark = pytest.mark.root

DEMO = [sys.executable, "-m", "agent.cli", "demo"]


def what_it_made(output: str) -> tuple[list[str], str, Path]:
    namespaces = re.search(r"network namespaces (\S+) \(router\) and (\S+) \(", output).groups()
    workload = re.search(r"for workload (\S+) \.\.\.", output).group(1)
    files = Path(re.search(r"files in (\S+)", output).group(1))
    return list(namespaces), workload, files


def assert_nothing_left(output: str) -> None:
    namespaces, workload, files = what_it_made(output)
    for name in namespaces:
        assert not Path("/run/netns", name).exists(), f"namespace {name} left behind"
    assert not (cgroups.warden_parent() / workload).exists(), f"cgroup of {workload} left behind"
    assert not Path(f"/sys/fs/bpf/ew-{workload}").exists(), f"pinned maps of {workload} left behind"
    assert not files.exists(), f"{files} left behind"
    agents = subprocess.run(["pgrep", "-f", str(files)], capture_output=True, text=True).stdout
    assert agents == "", f"processes of the demo still run: {agents}"


@pytest.mark.parametrize("action,acted", [("kill", "action_kill"), ("quarantine", "action_quarantine")])
def test_demo_tells_the_story_and_cleans_up(action, acted):
    done = subprocess.run([*DEMO, "--action", action], cwd=REPO, capture_output=True, text=True, timeout=120)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert re.search(r"router \| call api\.provider\.test:443 +ok", out)
    assert re.search(r"router \| exfiltrate: connect straight to \S+ +FAILED: .*Operation not permitted", out)
    assert re.search(r"router \| exfiltrate: DNS tunnel .* FAILED", out)
    assert re.search(r"router \| exfiltrate: child process .* FAILED: .*Operation not permitted", out)
    for kind in ("egress_denied", "dns_denied", acted):
        assert f"  {kind}  " in out, kind
    assert "attacker received 0 bytes" in out and "reached any server: 0" in out
    assert_nothing_left(out)


def interrupt_after_the_first_call(before_ctrl_c=lambda output: None) -> str:
    """Run the demo and press Ctrl-C once the router called its provider; its whole output."""
    # As in a terminal, whatever the test run's own SIGINT: a shell ignores it in the jobs it
    # starts in the background, and Python (the demo) then keeps ignoring it.
    demo = subprocess.Popen(DEMO, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    for line in demo.stdout:
        seen.append(line)
        if "router | call api.provider.test" in line:
            break
    before_ctrl_c("".join(seen))
    # A terminal's Ctrl-C reaches the whole foreground process group: demo, agent, router.
    os.killpg(demo.pid, signal.SIGINT)
    rest, _ = demo.communicate(timeout=60)
    output = "".join(seen) + rest
    assert demo.returncode == 130, output
    assert "cleaned up" in output
    assert_nothing_left(output)
    return output


def test_ctrl_c_cleans_up_everything():
    assert "did not stop" not in interrupt_after_the_first_call()


def test_an_agent_that_does_not_stop_is_killed_and_everything_still_cleaned_up():
    def wedge_the_agent(output: str) -> None:
        _, _, files = what_it_made(output)
        agents = subprocess.run(["pgrep", "-f", f"agent.cli agent --policy {files}"], capture_output=True,
                                text=True).stdout.split()
        assert len(agents) == 1, agents
        os.kill(int(agents[0]), signal.SIGSTOP)  # deaf to SIGTERM; SIGKILL still ends it

    output = interrupt_after_the_first_call(wedge_the_agent)
    assert "the agent did not stop within 15 s of SIGTERM: killed it" in output
