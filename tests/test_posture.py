"""Posture warnings from real processes in a real cgroup, started with real credentials."""
import os
import subprocess
import time

import pytest

from agent import cgroups
from agent.cgroups.posture import workload_posture
from agentproc import unique_name

pytestmark = pytest.mark.root

NOBODY = 65534


@pytest.fixture
def workload_cgroup():
    outer = cgroups.warden_parent() / unique_name("posture")
    inner = outer / "router"
    inner.mkdir(parents=True)
    started: list[subprocess.Popen] = []

    def start(*prefix: str) -> int:
        # The child moves itself into the cgroup, then becomes `sleep` under `prefix`.
        proc = subprocess.Popen(["sh", "-c", f'echo $$ > {inner}/cgroup.procs && exec "$@"', "sh",
                                 *prefix, "sleep", "60"])
        started.append(proc)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if proc.pid in cgroups.pids(inner) and _comm(proc.pid) == "sleep":
                return proc.pid
            time.sleep(0.01)
        raise AssertionError("process did not reach the cgroup")

    yield inner, start
    for proc in started:
        proc.kill()
        proc.wait()
    cgroups.remove(outer)


def _comm(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/comm").read().strip()
    except FileNotFoundError:
        return ""


def _codes(cgroup, pid):
    return {w.code for w in workload_posture([cgroup]) if w.pid == pid}


def test_root_process_gets_every_warning(workload_cgroup):
    cgroup, start = workload_cgroup
    pid = start()
    assert _codes(cgroup, pid) == {"runs_as_root", "escape_capabilities", "can_leave_cgroup"}
    (warning,) = [w for w in workload_posture([cgroup]) if w.code == "escape_capabilities"]
    for cap in ("CAP_NET_RAW", "CAP_NET_ADMIN", "CAP_SYS_ADMIN"):
        assert cap in warning.detail


def test_unprivileged_process_that_can_exec_file_capabilities_is_warned(workload_cgroup):
    # Without no_new_privs, a full bounding set lets it gain cap_net_raw by exec of ping.
    cgroup, start = workload_cgroup
    pid = start("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
    assert _codes(cgroup, pid) == {"escape_capabilities"}


def test_locked_down_process_has_no_warning(workload_cgroup):
    cgroup, start = workload_cgroup
    pid = start("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                "--no-new-privs", "--bounding-set=-all")
    assert _codes(cgroup, pid) == set()


def test_cgroup_procs_writable_by_the_router_user_is_warned(workload_cgroup):
    cgroup, start = workload_cgroup
    os.chown(cgroup.parent / "cgroup.procs", NOBODY, NOBODY)
    pid = start("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                "--no-new-privs", "--bounding-set=-all")
    (warning,) = [w for w in workload_posture([cgroup]) if w.pid == pid]
    assert warning.code == "can_leave_cgroup" and str(cgroup.parent) in warning.detail
