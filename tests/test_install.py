"""scripts/install.sh into a temporary root where systemd is not running, the units checked
by systemd-analyze, and the agent run with exactly the unit's capabilities and readiness
protocol."""
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agentproc import REPO, ROUTER, workload_policy
from agent.lab.network import Lab

pytestmark = pytest.mark.root

INSTALL = str(REPO / "scripts" / "install.sh")
UNIT = REPO / "systemd" / "egress-warden.service"


def seed_os(root: Path) -> None:
    """What the operating system of a real root provides and the units rely on: systemd's
    own targets and /bin/kill (ExecReload). systemd-analyze --root looks for them there."""
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "usr/bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2("/usr/bin/kill", root / "usr/bin/kill")
    (root / "bin").symlink_to("usr/bin")


def install(root: Path, *args: str) -> str:
    done = subprocess.run([INSTALL, "--root", str(root), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root with its type, mode, owner, size, mtime and link target."""
    seen = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        target = os.readlink(path) if path.is_symlink() else None
        seen[str(path.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, target)
    return seen


@pytest.fixture(scope="module")
def installed_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    seed_os(root)
    install(root)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def verify(root: Path, *units: str) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", f"--root={root}", *[str(root / u) for u in units]],
                          capture_output=True, text=True, timeout=60)


def test_units_pass_systemd_analyze_verify(installed_root):
    done = verify(installed_root, "etc/systemd/system/egress-warden.service",
                  "etc/systemd/system/egress-warden-collector.service")
    # verify exits 0 even for unknown keys or bad values; it only prints them.
    assert done.returncode == 0 and done.stdout + done.stderr == "", done.stdout + done.stderr


def test_router_drop_in_passes_verify_and_removes_escape_routes(installed_root):
    unit_dir = installed_root / "etc/systemd/system"
    router = installed_root / "opt/litellm/bin/litellm"
    router.parent.mkdir(parents=True, exist_ok=True)
    router.write_text("#!/bin/sh\nexec sleep infinity\n")
    router.chmod(0o755)
    (unit_dir / "litellm.service").write_text("[Service]\nExecStart=/opt/litellm/bin/litellm --port 4000\n")
    drop_in = unit_dir / "litellm.service.d"
    drop_in.mkdir()
    shutil.copy(installed_root / "usr/share/doc/egress-warden/examples/litellm.service.d/egress-warden.conf", drop_in)
    done = verify(installed_root, "etc/systemd/system/litellm.service")
    assert done.returncode == 0 and done.stdout + done.stderr == "", done.stdout + done.stderr
    text = (drop_in / "egress-warden.conf").read_text()
    families = re.search(r"^RestrictAddressFamilies=(.*)$", text, re.M).group(1).split()
    assert "AF_PACKET" not in families and families
    assert re.search(r"^CapabilityBoundingSet=$", text, re.M)
    assert re.search(r"^User=(?!root)\w+", text, re.M)


def test_install_lays_out_what_it_promises(installed_root):
    r = installed_root
    warden = r / "opt/egress-warden/venv/bin/warden"
    assert subprocess.run([str(warden), "--help"], capture_output=True, timeout=60).returncode == 0
    policy = r / "etc/egress-warden/policy.yaml"
    assert policy.read_text() == (REPO / "examples/policy.yaml").read_text()
    assert policy.stat().st_mode & 0o777 == 0o600
    check = subprocess.run([str(warden), "policy", "check", str(policy)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert (r / "var/lib/egress-warden").stat().st_mode & 0o777 == 0o700
    assert (r / "etc/tmpfiles.d/egress-warden.conf").exists()


def test_second_run_changes_nothing(installed_root):
    before = snapshot(installed_root)
    out = install(installed_root)
    assert "nothing changed" in out
    assert snapshot(installed_root) == before


def test_existing_policy_is_never_overwritten(installed_root):
    policy = installed_root / "etc/egress-warden/policy.yaml"
    original = policy.read_text()
    try:
        policy.write_text(original + "# an operator's edit\n")
        install(installed_root)
        assert policy.read_text().endswith("# an operator's edit\n")
    finally:
        policy.write_text(original)


def test_uninstall_removes_what_it_installed(tmp_path):
    seed_os(tmp_path)
    before = snapshot(tmp_path)
    install(tmp_path)
    policy = tmp_path / "etc/egress-warden/policy.yaml"
    policy.write_text(policy.read_text() + "# edited\n")
    out = install(tmp_path, "--uninstall")
    assert "kept /etc/egress-warden/policy.yaml" in out
    assert not (tmp_path / "opt/egress-warden").exists()
    policy.unlink()
    install(tmp_path, "--uninstall", "--purge")  # nothing left to remove: says so, exits 0
    left = {p for p, meta in snapshot(tmp_path).items() if p not in before and not os.path.isdir(tmp_path / p)}
    assert left == set(), left


def unit_capabilities() -> list[str]:
    line = re.search(r"^CapabilityBoundingSet=(.*)$", UNIT.read_text(), re.M).group(1)
    return [c.removeprefix("CAP_").lower() for c in line.split()]


def test_agent_enforces_and_kills_with_only_the_units_capabilities(lab, start_agent, names, tmp_path):
    """The unit's CapabilityBoundingSet is enough: the agent starts, refuses a destination
    and kills the router, with every other capability gone and no_new_privs set, and
    READY=1 reaches the service manager only once enforcement is active."""
    wl = names[0]
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(60)
    attacker = lab.serve(Lab.ATTACKER4, 443)
    bounding = ",".join(["-all", *(f"+{c}" for c in unit_capabilities())])
    policy = workload_policy(wl, f"{{cidr: {Lab.PROVIDER4}/32, ports: [443]}}", on_violation="kill")
    agent = start_agent(policy, [wl], prefix=["setpriv", f"--bounding-set={bounding}", "--inh-caps=-all",
                                               "--no-new-privs", "--"],
                        env={"NOTIFY_SOCKET": str(notify_path)})
    message = notify.recv(4096).decode()
    assert "READY=1" in message
    assert any(e["kind"] == "agent_started" for e in agent.events()), "READY=1 before enforcement"
    status = Path(f"/proc/{agent.process.pid}/status").read_text()
    assert re.search(r"^NoNewPrivs:\s+1$", status, re.M)

    # The router runs as another user, as the example drop-in makes it.
    router = lab.run_in_router(agent.run_cmd(wl, [sys.executable, ROUTER, "tcp", Lab.ATTACKER4, "443"], "--user", "nobody"),
                               stdout=-1, stderr=-1, text=True)
    agent.wait_for(lambda e: e["kind"] == "action_kill" and e["workload"] == wl)
    router.wait(timeout=10)
    assert attacker.received_bytes() == 0 and attacker.connections() == 0
    assert agent.stop() == 0
    assert "STOPPING=1" in notify.recv(4096).decode()
    notify.close()


def vagrant_validate(directory: Path) -> subprocess.CompletedProcess:
    # No VM provider runs here; --ignore-provider checks everything else of the Vagrantfile.
    return subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=directory,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "VAGRANT_CHECKPOINT_DISABLE": "1"})


def test_vagrantfile_validates(tmp_path):
    done = vagrant_validate(REPO / "vagrant")
    assert done.returncode == 0, done.stdout + done.stderr
    # The check has teeth: a misspelt setting in a copy of the same file is refused.
    broken = tmp_path / "Vagrantfile"
    broken.write_text((REPO / "vagrant/Vagrantfile").read_text().replace("config.vm.hostname", "config.vm.hostnam"))
    assert vagrant_validate(tmp_path).returncode != 0
