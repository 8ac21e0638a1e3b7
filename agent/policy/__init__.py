"""The policy file: what each workload (an LLM router deployment) may reach.

load_policy() reads and validates a file and refuses it with every problem
(file, line, key path, reason) at once; parse_policy() validates text.
"""
from .errors import PolicyError, PolicyProblem
from .load import load_policy, parse_policy
from .model import AllowRule, Budget, DnsConfig, Hooks, Match, Mode, Policy, Spike, Workload

__all__ = [
    "AllowRule",
    "Budget",
    "DnsConfig",
    "Hooks",
    "Match",
    "Mode",
    "Policy",
    "PolicyError",
    "PolicyProblem",
    "Spike",
    "Workload",
    "load_policy",
    "parse_policy",
]
