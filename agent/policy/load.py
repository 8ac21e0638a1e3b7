"""Reading a policy file: permissions, then YAML, then validation, all problems at once."""
from __future__ import annotations

import dataclasses
import os
import stat

from agent.permissions import executable_problems, permission_problems

from . import validate
from .errors import PolicyError, PolicyProblem
from .model import Policy


def load_policy(path: str | os.PathLike[str], *, check_permissions: bool = True) -> Policy:
    """Read, check and validate a policy file; raise PolicyError listing every problem.

    With check_permissions the file and every directory up to / must be owned
    by root and not writable by group or others (sticky directories excepted),
    and so must every hook executable the policy names.
    """
    name = os.fspath(path)
    data, status = _read(name)
    reasons = permission_problems(name, status) if check_permissions else []
    problems = [PolicyProblem(name, None, "", reason) for reason in reasons]
    try:
        policy = parse_policy(_decode(name, data), name)
    except PolicyError as error:
        problems += error.problems
        policy = None
    if policy is not None and check_permissions:
        hook_problems, notices = _check_hooks(policy)
        problems += hook_problems
        policy = dataclasses.replace(policy, notices=policy.notices + tuple(notices))
    if problems:
        raise PolicyError(problems)
    return policy


def _check_hooks(policy: Policy) -> tuple[list[PolicyProblem], list[str]]:
    """Hooks run as root: one that anyone but root could change would let a router run code as
    root by making a refused connection. A hook not there yet is a notice (it may be deployed
    after the policy); each of its runs is then reported as an error."""
    problems, notices = [], []
    for i, workload in enumerate(policy.workloads):
        for hook in ("on_violation", "on_budget"):
            for j, command in enumerate(getattr(workload.hooks, hook)):
                key = f"workloads[{i}].hooks.{hook}[{j}]"
                try:
                    reasons = executable_problems(command)
                except FileNotFoundError:
                    notices.append(str(PolicyProblem(policy.path, None, key, f"{command} does not exist (yet)")))
                    continue
                except OSError as error:
                    reasons = [f"cannot check {command}: {error.strerror}"]
                problems += [PolicyProblem(policy.path, None, key, f"hooks run as root: {r}") for r in reasons]
    return problems, notices


def parse_policy(text: str, path: str = "<string>") -> Policy:
    """Validate policy YAML text; path only names the source in messages."""
    return validate.parse(text, path)


def _read(name: str) -> tuple[bytes, os.stat_result]:
    """The file's bytes and the status of the very file read (not of whatever the path names later)."""
    try:
        # O_NONBLOCK: a FIFO planted at the path must not hang the agent.
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise _file_error(name, "no such file") from None
    except OSError as error:
        raise _file_error(name, f"cannot open: {error.strerror}") from None
    with os.fdopen(fd, "rb") as file:
        status = os.fstat(file.fileno())
        if not stat.S_ISREG(status.st_mode):
            raise _file_error(name, "is not a regular file")
        return file.read(), status


def _decode(name: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise PolicyError([PolicyProblem(name, line, "", "is not UTF-8 text")]) from None


def _file_error(name: str, reason: str) -> PolicyError:
    return PolicyError([PolicyProblem(name, None, "", reason)])
