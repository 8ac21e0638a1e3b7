"""How a policy is refused: every problem with its file, line, key path and reason."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PolicyProblem:
    path: str
    line: int | None  # 1-based; None when no line applies (missing file, permissions)
    key: str  # key path like "workloads[1].allow[0].ports[2]"; "" for the file as a whole
    reason: str

    def __str__(self) -> str:
        location = self.path if self.line is None else f"{self.path}:{self.line}"
        if self.key:
            return f"{location}: {self.key}: {self.reason}"
        return f"{location}: {self.reason}"


class PolicyError(Exception):
    def __init__(self, problems: list[PolicyProblem]) -> None:
        super().__init__(problems)
        self.problems = problems

    def __str__(self) -> str:
        return "\n".join(str(problem) for problem in self.problems)
