"""Who could have written what the agent trusts: like sshd's StrictModes, a file or directory
that anyone but root could change (directly or by swapping a directory on the way to it) is
refused. The policy decides what a router may reach; the state directory decides which
quarantines outlast a restart and which addresses DNS answers allow again after one; a policy
hook runs as root whenever a router makes a refused connection. A TLS private key is refused,
as ssh refuses one, when anyone but its owner can read it."""
from __future__ import annotations

import os
import shlex
import stat

GROUP_OR_OTHER_WRITE = 0o022


def permission_problems(path: str, file_status: os.stat_result, what: str = "") -> list[str]:
    """Reasons to refuse the file (or directory) whose status is file_status, each saying what to
    run; `what` begins the reasons about the path itself (those about its directories name them)."""
    reasons = _owner_and_mode_problems(path, file_status, what)
    for directory in _directories_leading_to(path):
        reasons += _owner_and_mode_problems(directory, os.stat(directory), what=f"directory {directory} ")
    return reasons


def executable_problems(path: str) -> list[str]:
    """Reasons root must not run the executable at `path`; FileNotFoundError when there is none.
    Once there are none only root can change it, so nothing can swap it before it runs."""
    return permission_problems(path, os.stat(path), what=f"{path} ")


def private_key_problem(path: str) -> str | None:
    """Why the private key at `path` must not be used, or None. Whoever reads it can pose as its
    owner: as the agent to its collectors (and feed them events), or as a collector to the
    agents (and read every event)."""
    status = os.stat(path)
    if status.st_uid not in (0, os.geteuid()):
        return f"{path} is owned by uid {status.st_uid}, not by this user or root: run chown {os.geteuid()} " \
               f"{shlex.quote(path)}"
    if status.st_mode & 0o077:
        return (f"{path} can be read by group/others (mode {stat.S_IMODE(status.st_mode):04o}): run chmod 600 "
                f"{shlex.quote(path)}")
    return None


def _owner_and_mode_problems(path: str, status: os.stat_result, what: str) -> list[str]:
    reasons = []
    if status.st_uid != 0:
        reasons.append(f"{what}is owned by uid {status.st_uid}, not root: run chown root {shlex.quote(path)}")
    writable = status.st_mode & GROUP_OR_OTHER_WRITE
    # A sticky directory (like /tmp) lets others add files but not rename or remove ours.
    sticky_directory = stat.S_ISDIR(status.st_mode) and status.st_mode & stat.S_ISVTX
    if writable and not sticky_directory:
        mode = f"mode {stat.S_IMODE(status.st_mode):04o}"
        if stat.S_ISDIR(status.st_mode):
            mode += " without the sticky bit"
        reasons.append(f"{what}is writable by group/others ({mode}): run chmod go-w {shlex.quote(path)}")
    return reasons


def _directories_leading_to(path: str) -> list[str]:
    """Every directory from the file's up to /, for the path as given and as resolved.

    Both, because whoever can write a directory holding a symlink can repoint it.
    """
    directories: dict[str, None] = {}
    for file_path in (os.path.abspath(path), os.path.realpath(path)):
        directory = os.path.dirname(file_path)
        while directory not in directories:
            directories[directory] = None
            directory = os.path.dirname(directory)
    return list(directories)
