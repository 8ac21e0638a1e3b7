"""cgroup v2: where workloads live. Found from /proc/mounts, since hosts mount it at
/sys/fs/cgroup (unified) or /sys/fs/cgroup/unified (hybrid)."""
from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

PARENT = "egress-warden"


class CgroupError(RuntimeError):
    pass


def cgroup2_root(mounts: str = "/proc/mounts") -> Path:
    roots = [line.split()[1] for line in Path(mounts).read_text().splitlines() if line.split()[2] == "cgroup2"]
    if not roots:
        raise CgroupError(
            "no cgroup v2 hierarchy is mounted (looked in /proc/mounts for type cgroup2): "
            "mount it with `mount -t cgroup2 none /sys/fs/cgroup/unified` or boot with systemd.unified_cgroup_hierarchy=1"
        )
    return Path("/sys/fs/cgroup") if "/sys/fs/cgroup" in roots else Path(roots[0])


def warden_parent(root: Path | None = None) -> Path:
    return (root or cgroup2_root()) / PARENT


def workload_cgroups(root: Path | None = None) -> list[Path]:
    """The cgroups under the egress-warden parent, by name; none when there is no parent."""
    parent = warden_parent(root)
    return sorted(p for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []


def workload_cgroup(name: str, root: Path | None = None) -> Path:
    """The cgroup `warden run` and discovery place a workload's processes in, created if absent."""
    path = warden_parent(root) / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def cgroup_id(path: Path) -> int:
    # On cgroup2 the directory's inode number is the kernel's cgroup id (kernfs node id).
    return os.stat(path).st_ino


def find_unit_cgroup(unit: str, root: Path | None = None, max_depth: int = 4) -> Path | None:
    """The cgroup systemd made for `unit` (e.g. system.slice/litellm.service), if it exists."""
    root = root or cgroup2_root()
    level = [root]
    for _ in range(max_depth):
        below = []
        for directory in level:
            candidate = directory / unit
            if candidate.is_dir():
                return candidate
            below.extend(p for p in directory.iterdir() if p.is_dir() and p.name.endswith(".slice"))
        level = below
    return None


def cgroup_of_pid(pid: int, root: Path | None = None) -> Path:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        hierarchy, _, path = line.split(":", 2)
        if hierarchy == "0":
            return (root or cgroup2_root()) / path.lstrip("/")
    raise CgroupError(f"process {pid} is in no cgroup v2")


def is_within(path: Path, ancestor: Path) -> bool:
    return path == ancestor or ancestor in path.parents


def move_pid(cgroup: Path, pid: int) -> None:
    (cgroup / "cgroup.procs").write_text(str(pid))


def pids(cgroup: Path) -> list[int]:
    """Every process in the cgroup and the cgroups below it."""
    found: list[int] = []
    for directory, _subdirs, _files in os.walk(cgroup):
        try:
            found.extend(int(p) for p in Path(directory, "cgroup.procs").read_text().split())
        except FileNotFoundError:
            continue  # removed while walking
    return found


def _events(cgroup: Path) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in (cgroup / "cgroup.events").read_text().splitlines())


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise CgroupError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.001)


def freeze(cgroup: Path, timeout: float = 5.0) -> None:
    (cgroup / "cgroup.freeze").write_text("1")
    _wait_for(lambda: _events(cgroup).get("frozen") == "1", timeout, f"{cgroup} to freeze")


def thaw(cgroup: Path) -> None:
    (cgroup / "cgroup.freeze").write_text("0")


def is_frozen(cgroup: Path) -> bool:
    return _events(cgroup).get("frozen") == "1"


def kill_all(cgroup: Path, timeout: float = 5.0) -> None:
    """SIGKILL every process below `cgroup` and wait until none is left."""
    kill_file = cgroup / "cgroup.kill"
    if kill_file.exists():
        kill_file.write_text("1")
    else:  # kernels before 5.14: repeat, since a process may fork while we walk
        _wait_for(lambda: not _signal_all(cgroup, signal.SIGKILL), timeout, f"{cgroup} to empty")
    _wait_for(lambda: _events(cgroup).get("populated") == "0", timeout, f"{cgroup} to empty")


def _signal_all(cgroup: Path, sig: int) -> bool:
    targets = pids(cgroup)
    for pid in targets:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return bool(targets)


def remove(cgroup: Path) -> None:
    """Remove `cgroup` and the cgroups below it, killing what still runs there."""
    if not cgroup.exists():
        return
    if is_frozen(cgroup):
        thaw(cgroup)
    kill_all(cgroup)
    for directory, _subdirs, _files in sorted(os.walk(cgroup), key=lambda w: -len(w[0])):
        try:
            os.rmdir(directory)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
