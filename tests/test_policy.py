"""agent.policy and `warden policy check`: every problem names file, line, key path and reason."""
from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.cli import main
from agent.policy import (
    AllowRule,
    Budget,
    DnsConfig,
    Hooks,
    Match,
    PolicyError,
    PolicyProblem,
    Spike,
    load_policy,
    parse_policy,
)

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "policy.yaml"
NOBODY = 65534

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="the permission checks require root-owned files, and chown needs root"
)

MINIMAL = """\
version: 1
workloads:
  - name: app
    allow:
      - cidr: 10.20.0.0/16
"""


def one_workload(body: str) -> str:
    """A policy whose only workload is named app; body's first line is the file's line 4."""
    return "version: 1\nworkloads:\n  - name: app\n" + textwrap.indent(textwrap.dedent(body), "    ")


def problems_of(text: str) -> list[PolicyProblem]:
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "p.yaml")
    return caught.value.problems


def only_problem(text: str) -> PolicyProblem:
    problems = problems_of(text)
    assert len(problems) == 1, "\n".join(map(str, problems))
    return problems[0]


def assert_problem(problem: PolicyProblem, key: str, line: int | None, reason_part: str) -> None:
    assert (problem.path, problem.key, problem.line) == ("p.yaml", key, line), str(problem)
    assert reason_part in problem.reason, str(problem)


def write_policy(directory: Path, text: str = MINIMAL, mode: int = 0o644) -> Path:
    path = directory / "policy.yaml"
    path.write_text(text)
    path.chmod(mode)
    return path


def load_problems(path: Path) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    return [str(problem) for problem in caught.value.problems]


# --- valid policies ---------------------------------------------------------------


def test_minimal_workload_gets_the_documented_defaults() -> None:
    policy = parse_policy(MINIMAL, "p.yaml")
    workload = policy.workload("app")
    assert (policy.version, policy.path, policy.notices) == (1, "p.yaml", ())
    assert (workload.mode, workload.on_violation) == ("enforce", "deny")
    assert workload.match == Match(systemd_unit=None, exe=(), cmdline=())
    assert workload.listen == ()
    assert workload.allow == (AllowRule(kind="cidr", value="10.20.0.0/16", ports=(), protocol="any", line=5),)
    assert workload.dns == DnsConfig(upstream=("system",))
    assert (workload.budgets, workload.hooks) == ((), Hooks(on_violation=(), on_budget=()))


def test_full_policy_is_normalized() -> None:
    policy = parse_policy(
        one_workload("""\
            mode: monitor
            on_violation: quarantine
            match:
              systemd_unit: litellm.service
              exe: /opt/litellm/venv/bin/python3*
              cmdline: ["litellm --config"]
            listen: [4000, 4001]
            allow:
              - fqdn: API.OpenAI.com.
                ports: [443]
                protocol: tcp
              - cidr: 192.0.2.7
              - cidr: 2001:DB8::/32
                protocol: udp
            dns:
              upstream: [system, 192.0.2.53, "192.0.2.53:5353", "[2001:db8::53]:53"]
            budgets:
              - fqdn: api.openai.com
                bytes_per_minute: 50MB
              - cidr: 192.0.2.0/24
                bytes_per_minute: 1000
                action: kill
            hooks:
              on_violation: ["/usr/local/bin/rotate-keys"]
              on_budget: [/usr/local/bin/page]
            """),
        "p.yaml",
    )
    workload = policy.workload("app")
    assert (workload.mode, workload.on_violation) == ("monitor", "quarantine")
    assert workload.match == Match("litellm.service", ("/opt/litellm/venv/bin/python3*",), ("litellm --config",))
    assert workload.listen == (4000, 4001)
    assert workload.allow == (
        AllowRule("fqdn", "api.openai.com", (443,), "tcp", 12),
        AllowRule("cidr", "192.0.2.7/32", (), "any", 15),
        AllowRule("cidr", "2001:db8::/32", (), "udp", 16),
    )
    assert workload.dns.upstream == ("system", "192.0.2.53", "192.0.2.53:5353", "[2001:db8::53]:53")
    assert workload.budgets == (
        Budget(fqdn="api.openai.com", cidr=None, bytes_per_minute=50_000_000, action="alert"),
        Budget(fqdn=None, cidr="192.0.2.0/24", bytes_per_minute=1000, action="kill"),
    )
    assert workload.hooks == Hooks(("/usr/local/bin/rotate-keys",), ("/usr/local/bin/page",))


def test_fqdn_rule_is_accepted_without_notice() -> None:
    policy = parse_policy(one_workload("allow:\n  - fqdn: '*.openai.azure.com'\n"), "p.yaml")
    assert policy.workload("app").allow[0].value == "*.openai.azure.com"
    assert policy.notices == ()


def test_dns_grace_defaults_and_has_a_floor() -> None:
    assert parse_policy(MINIMAL).workloads[0].dns.grace_seconds == 60
    assert parse_policy(MINIMAL + "    dns:\n      grace_seconds: 5\n").workloads[0].dns.grace_seconds == 5
    with pytest.raises(PolicyError) as error:
        parse_policy(MINIMAL + "    dns:\n      grace_seconds: 0\n")
    assert "workloads[0].dns.grace_seconds: must be at least 1 s" in str(error.value)


@pytest.mark.parametrize(
    ("written", "expected"),
    [("1000", 1000), ("50MB", 50 * 10**6), ("1.5GB", 1_500_000_000), ("10MiB", 10 * 2**20), ("1GiB", 2**30)],
)
def test_budget_sizes_are_bytes(written: str, expected: int) -> None:
    policy = parse_policy(MINIMAL + f"    budgets:\n      - cidr: 10.20.0.0/16\n        bytes_per_minute: {written}\n")
    assert policy.workloads[0].budgets[0].bytes_per_minute == expected


def test_workload_lookup_by_name_raises_key_error_when_absent() -> None:
    policy = parse_policy(MINIMAL)
    assert policy.workload("app").name == "app"
    with pytest.raises(KeyError):
        policy.workload("other")


def test_match_uses_exe_globs_and_cmdline_substrings() -> None:
    match = Match(systemd_unit=None, exe=("/opt/*/bin/python3*",), cmdline=("litellm --config",))
    assert match.matches("/opt/litellm/bin/python3.11", "python3 -m http.server")
    assert match.matches("/usr/bin/python3.11", "/usr/bin/python3 /opt/x/litellm --config c.yaml")
    assert not match.matches("/usr/bin/python3.11", "/usr/bin/python3 /opt/x/litellm --port 4000")


def test_cidr_rule_gives_its_network() -> None:
    rule = parse_policy(MINIMAL).workloads[0].allow[0]
    assert str(rule.network()) == "10.20.0.0/16"


# --- structure --------------------------------------------------------------------


def test_empty_file_is_refused() -> None:
    assert_problem(only_problem(""), "", None, "the file is empty")


def test_file_that_is_a_list_is_refused() -> None:
    assert_problem(only_problem("- version: 1\n"), "", 1, "top level must be a mapping")


def test_file_that_is_a_scalar_is_refused() -> None:
    assert_problem(only_problem("just text\n"), "", 1, "got the string 'just text'")


def test_yaml_syntax_error_names_its_line() -> None:
    problem = only_problem("version: 1\nworkloads:\n  - name: app\n    allow: [\n      {cidr: 10.0.0.0/8}\n")
    assert_problem(problem, "", 6, "invalid YAML: expected ',' or ']'")
    assert "at line 4" in problem.reason


def test_version_other_than_1_is_refused() -> None:
    assert_problem(only_problem(MINIMAL.replace("version: 1", "version: 2")), "version", 1, "must be 1")


def test_workloads_must_not_be_empty() -> None:
    assert_problem(only_problem("version: 1\nworkloads: []\n"), "workloads", 2, "at least one workload")


def test_more_workloads_than_the_kernel_holds_are_refused() -> None:
    many = "".join(f"  - name: app{i}\n    allow: [{{cidr: 10.0.0.0/8}}]\n" for i in range(257))
    assert_problem(only_problem("version: 1\nworkloads:\n" + many), "workloads", 3, "lists 257 workloads; the "
                   "kernel's table holds at most 256")


def test_unknown_top_level_key_is_refused_with_a_suggestion() -> None:
    problem = only_problem(MINIMAL + "workload: []\n")
    assert problem.reason.startswith("unknown key 'workload' (did you mean 'workloads'?")
    assert_problem(problem, "workload", 6, "expected one of: version, workloads")


def test_unknown_nested_key_is_refused_with_a_suggestion() -> None:
    problem = only_problem(one_workload("allow:\n  - cidr: 10.0.0.0/8\n    port: [443]\n"))
    assert_problem(problem, "workloads[0].allow[0].port", 6, "unknown key 'port' (did you mean 'ports'?")


def test_unknown_key_without_a_close_match_lists_the_expected_keys() -> None:
    problem = only_problem(one_workload("allow: [{cidr: 10.0.0.0/8}]\ncolour: blue\n"))
    assert_problem(problem, "workloads[0].colour", 5, "unknown key 'colour' (expected one of: name, mode")


def test_duplicate_yaml_key_is_refused() -> None:
    problem = only_problem(one_workload("mode: monitor\nallow: [{cidr: 10.0.0.0/8}]\nmode: enforce\n"))
    assert_problem(problem, "workloads[0].mode", 6, "duplicate key (first at line 4)")


# --- workloads ----------------------------------------------------------------------


def test_name_with_capitals_is_refused() -> None:
    problem = only_problem(MINIMAL.replace("name: app", "name: LiteLLM"))
    assert_problem(problem, "workloads[0].name", 3, "'LiteLLM' is not a valid workload name")


def test_name_longer_than_32_characters_is_refused() -> None:
    problem = only_problem(MINIMAL.replace("name: app", "name: " + "a" * 33))
    assert_problem(problem, "workloads[0].name", 3, "1-32 lowercase letters")


def test_duplicate_workload_name_names_the_first_line() -> None:
    problem = only_problem(MINIMAL + "  - name: app\n    allow: [{cidr: 10.0.0.0/8}]\n")
    assert_problem(problem, "workloads[1].name", 6, "duplicate workload name 'app' (first defined at line 3)")


def test_bad_mode_is_refused() -> None:
    problem = only_problem(one_workload("mode: audit\nallow: [{cidr: 10.0.0.0/8}]\n"))
    assert_problem(problem, "workloads[0].mode", 4, "must be one of enforce, monitor; got the string 'audit'")


def test_bad_on_violation_is_refused() -> None:
    problem = only_problem(one_workload("on_violation: block\nallow: [{cidr: 10.0.0.0/8}]\n"))
    assert_problem(problem, "workloads[0].on_violation", 4, "must be one of deny, kill, quarantine")


def test_missing_allow_is_refused() -> None:
    assert_problem(only_problem(one_workload("mode: monitor\n")), "workloads[0].allow", 3, "required key missing")


def test_empty_allow_is_refused() -> None:
    assert_problem(only_problem(one_workload("allow: []\n")), "workloads[0].allow", 4, "at least one rule")


def test_relative_exe_is_refused() -> None:
    problem = only_problem(one_workload("match:\n  exe: [/usr/bin/python3, python3]\nallow: [{cidr: 10.0.0.0/8}]\n"))
    assert_problem(problem, "workloads[0].match.exe[1]", 5, "'python3' is not an absolute path")


def test_systemd_unit_must_be_a_service_or_scope() -> None:
    problem = only_problem(one_workload("match: {systemd_unit: litellm.timer}\nallow: [{cidr: 10.0.0.0/8}]\n"))
    assert_problem(problem, "workloads[0].match.systemd_unit", 4, "ending in .service or .scope")


def test_listen_port_out_of_range_is_refused() -> None:
    problem = only_problem(one_workload("listen: [4000, 65536]\nallow: [{cidr: 10.0.0.0/8}]\n"))
    assert_problem(problem, "workloads[0].listen[1]", 4, "port 65536 is out of range 1-65535")


# --- allow rules ----------------------------------------------------------------------


def test_bad_cidr_is_refused() -> None:
    problem = only_problem(one_workload("allow:\n  - cidr: 10.300.0.0/16\n"))
    assert_problem(problem, "workloads[0].allow[0].cidr", 5, "'10.300.0.0/16' is not an IPv4 or IPv6")


def test_cidr_with_host_bits_says_the_corrected_network() -> None:
    problem = only_problem(one_workload("allow:\n  - cidr: 10.20.1.5/16\n"))
    assert_problem(problem, "workloads[0].allow[0].cidr", 5, "has host bits set: did you mean 10.20.0.0/16?")


@pytest.mark.parametrize(
    ("ports", "index", "reason"),
    [
        ("[0]", 0, "port 0 is out of range 1-65535"),
        ("[443, 70000]", 1, "port 70000 is out of range 1-65535"),
        ('["443"]', 0, "expected a port number 1-65535, got the string '443'"),
        ("[true]", 0, "expected a port number 1-65535, got the boolean true"),
    ],
)
def test_bad_port_is_refused(ports: str, index: int, reason: str) -> None:
    problem = only_problem(one_workload(f"allow:\n  - cidr: 10.0.0.0/8\n    ports: {ports}\n"))
    assert_problem(problem, f"workloads[0].allow[0].ports[{index}]", 6, reason)


def test_bad_protocol_is_refused() -> None:
    problem = only_problem(one_workload("allow:\n  - cidr: 10.0.0.0/8\n    protocol: icmp\n"))
    assert_problem(problem, "workloads[0].allow[0].protocol", 6, "must be one of tcp, udp, any")


@pytest.mark.parametrize("fqdn", ["api.*.com", "**.x.com", "*", "api*.x.com"])
def test_wildcard_that_is_not_a_whole_leftmost_label_is_refused(fqdn: str) -> None:
    problem = only_problem(one_workload(f"allow:\n  - fqdn: '{fqdn}'\n"))
    assert_problem(problem, "workloads[0].allow[0].fqdn", 5, "wildcard that is not a whole leftmost label")


@pytest.mark.parametrize(
    ("fqdn", "reason"),
    [("a..b.com", "label ''"), ("x" * 64 + ".com", "must be 1-63 characters"), ("a!b.com", "label 'a!b'")],
)
def test_invalid_host_name_is_refused(fqdn: str, reason: str) -> None:
    problem = only_problem(one_workload(f"allow:\n  - fqdn: '{fqdn}'\n"))
    assert_problem(problem, "workloads[0].allow[0].fqdn", 5, reason)


def test_fqdn_that_is_an_address_points_to_cidr() -> None:
    problem = only_problem(one_workload("allow:\n  - fqdn: 192.0.2.1\n"))
    assert_problem(problem, "workloads[0].allow[0].fqdn", 5, "use 'cidr: 192.0.2.1'")


@pytest.mark.parametrize(
    ("rule", "found"), [("{cidr: 10.0.0.0/8, fqdn: a.com}", "both"), ("{ports: [443]}", "neither")]
)
def test_rule_needs_exactly_one_of_cidr_or_fqdn(rule: str, found: str) -> None:
    problem = only_problem(one_workload(f"allow:\n  - {rule}\n"))
    assert_problem(problem, "workloads[0].allow[0]", 5, f"needs exactly one of 'cidr' or 'fqdn' (found {found})")


# --- dns, budgets, hooks --------------------------------------------------------------


@pytest.mark.parametrize("upstream", ["8.8.8", "[192.0.2.1]:53", "192.0.2.1:99999", "resolver.example"])
def test_bad_dns_upstream_is_refused(upstream: str) -> None:
    problem = only_problem(one_workload(f"allow: [{{cidr: 10.0.0.0/8}}]\ndns:\n  upstream: ['{upstream}']\n"))
    assert_problem(problem, "workloads[0].dns.upstream[0]", 6, "")
    assert upstream in problem.reason


def test_bad_budget_action_is_refused() -> None:
    problem = only_problem(MINIMAL + "    budgets:\n      - cidr: 10.20.0.0/16\n        bytes_per_minute: 1MB\n"
                           "        action: page\n")
    assert_problem(problem, "workloads[0].budgets[0].action", 9, "must be one of alert, kill, quarantine")


@pytest.mark.parametrize(
    ("written", "reason"),
    [("0", "must be more than 0 bytes"), ("0MB", "must be more than 0 bytes"),
     ("-5MB", "is not a size"), ("10 parsecs", "is not a size"), ("1.5", "got the number 1.5")],
)  # fmt: skip
def test_bad_budget_size_is_refused(written: str, reason: str) -> None:
    problem = only_problem(MINIMAL + f"    budgets:\n      - cidr: 10.20.0.0/16\n        bytes_per_minute: {written}\n")
    assert_problem(problem, "workloads[0].budgets[0].bytes_per_minute", 8, reason)


def test_relative_hook_is_refused() -> None:
    problem = only_problem(MINIMAL + "    hooks:\n      on_budget: [rotate-keys]\n")
    assert_problem(problem, "workloads[0].hooks.on_budget[0]", 7, "'rotate-keys' is not an absolute path")


def test_spike_defaults_and_sizes() -> None:
    policy = parse_policy(MINIMAL + "    spike:\n      factor: 4\n      min_rate: 2MB\n")
    assert policy.workloads[0].spike == Spike(factor=4.0, baseline_seconds=300, min_rate=2_000_000)
    assert parse_policy(MINIMAL).workloads[0].spike is None


@pytest.mark.parametrize(
    ("body", "key", "line", "reason"),
    [("spike:\n      factor: 1\n", "spike.factor", 7, "must be above 1"),
     ("spike:\n      factor: fast\n", "spike.factor", 7, "expected a number above 1"),
     ("spike:\n      min_rate: 1MB\n", "spike.factor", 7, "required key missing"),
     ("spike:\n      factor: 3\n      baseline_seconds: 0\n", "spike.baseline_seconds", 8, "must be 1-86400"),
     ("spike:\n      factor: 3\n      min_rate: 0\n", "spike.min_rate", 8, "must be more than 0 bytes"),
     ("spike:\n      factor: 3\n      window: 5\n", "spike.window", 8, "unknown key")],
)  # fmt: skip
def test_bad_spike_is_refused(body: str, key: str, line: int, reason: str) -> None:
    problem = only_problem(MINIMAL + "    " + body)
    assert_problem(problem, f"workloads[0].{key}", line, reason)


# --- all at once ----------------------------------------------------------------------


def test_all_problems_are_reported_at_once_in_line_order() -> None:
    text = """\
version: 1
workloads:
  - name: App
    mode: on
    allow:
      - cidr: 10.0.0.1/8
        ports: [0]
  - name: b
    alow: []
"""
    problems = problems_of(text)
    assert [(p.line, p.key) for p in problems] == [
        (3, "workloads[0].name"),
        (4, "workloads[0].mode"),
        (6, "workloads[0].allow[0].cidr"),
        (7, "workloads[0].allow[0].ports[0]"),
        (8, "workloads[1].allow"),
        (9, "workloads[1].alow"),
    ]
    assert str(PolicyError(problems)).splitlines() == [str(p) for p in problems]


def test_problem_reads_file_line_key_reason() -> None:
    assert str(PolicyProblem("p.yaml", 7, "workloads[0].mode", "bad")) == "p.yaml:7: workloads[0].mode: bad"
    assert str(PolicyProblem("p.yaml", None, "", "no such file")) == "p.yaml: no such file"


# --- loading files: permissions -------------------------------------------------------


@needs_root
def test_load_policy_reads_a_root_owned_file(tmp_path: Path) -> None:
    path = write_policy(tmp_path)
    assert load_policy(path) == parse_policy(MINIMAL, str(path))


def test_missing_file_is_a_clear_problem(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yaml"
    assert load_problems(missing) == [f"{missing}: no such file"]


@needs_root
def test_group_writable_file_is_refused(tmp_path: Path) -> None:
    path = write_policy(tmp_path, mode=0o664)
    assert load_problems(path) == [f"{path}: is writable by group/others (mode 0664): run chmod go-w {path}"]


@needs_root
def test_file_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    path = write_policy(tmp_path)
    os.chown(path, NOBODY, -1)
    assert load_problems(path) == [f"{path}: is owned by uid {NOBODY}, not root: run chown root {path}"]


@needs_root
def test_world_writable_parent_without_sticky_bit_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    path = write_policy(shared)
    assert load_problems(path) == [
        f"{path}: directory {shared} is writable by group/others (mode 0777 without the sticky bit): "
        f"run chmod go-w {shared}"
    ]


@needs_root
def test_world_writable_parent_with_sticky_bit_is_accepted(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    assert load_policy(write_policy(shared)).workloads[0].name == "app"


@needs_root
def test_parent_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    owned = tmp_path / "owned"
    owned.mkdir()
    path = write_policy(owned)
    os.chown(owned, NOBODY, -1)
    assert load_problems(path) == [
        f"{path}: directory {owned} is owned by uid {NOBODY}, not root: run chown root {owned}"
    ]


@needs_root
def test_permission_and_content_problems_are_reported_together(tmp_path: Path) -> None:
    path = write_policy(tmp_path, MINIMAL.replace("version: 1", "version: 2"), mode=0o666)
    assert load_problems(path) == [
        f"{path}: is writable by group/others (mode 0666): run chmod go-w {path}",
        f"{path}:1: version: must be 1 (the only policy format so far), got the integer 2",
    ]


def test_a_hook_anyone_but_root_could_change_is_refused_and_a_missing_one_noted(tmp_path: Path) -> None:
    """Hooks run as root whenever the router makes a refused connection."""
    hook, later = tmp_path / "rotate-keys", tmp_path / "not-deployed-yet"
    hook.write_text("#!/bin/sh\n")
    hook.chmod(0o777)
    path = write_policy(tmp_path, one_workload(f"allow: [{{cidr: 10.0.0.0/8}}]\nhooks:\n  on_budget: [{hook}, {later}]\n"))
    assert load_problems(path) == [f"{path}: workloads[0].hooks.on_budget[0]: hooks run as root: {hook} is writable by "
                                   f"group/others (mode 0777): run chmod go-w {hook}"]
    hook.chmod(0o755)
    assert load_policy(path).notices == (f"{path}: workloads[0].hooks.on_budget[1]: {later} does not exist (yet)",)
    hook.chmod(0o777)
    assert load_policy(path, check_permissions=False).notices == ()  # a draft: nothing checked


def test_check_permissions_false_skips_the_checks(tmp_path: Path) -> None:
    path = write_policy(tmp_path, mode=0o666)
    assert load_policy(path, check_permissions=False).workloads[0].name == "app"


def test_bundled_example_loads_in_monitor_mode_with_kill_on_violation() -> None:
    # The example's content is under test, not the modes a checkout gave the file
    # (those depend on the cloning user and umask), hence check_permissions=False.
    workload = load_policy(EXAMPLE, check_permissions=False).workload("litellm")
    assert (workload.mode, workload.on_violation, workload.listen) == ("monitor", "kill", (4000,))
    assert workload.match.cmdline == ("litellm",) and workload.match.exe
    assert [(rule.value, rule.ports, rule.protocol) for rule in workload.allow] == [
        (name, (443,), "tcp")
        for name in ("api.openai.com", "api.anthropic.com", "*.openai.azure.com", "generativelanguage.googleapis.com")
    ]
    assert workload.budgets[0].bytes_per_minute > 0


# --- warden policy check --------------------------------------------------------------

TWO_WORKLOADS = MINIMAL + """\
  - name: proxy
    mode: monitor
    allow:
      - fqdn: api.openai.com
"""


@needs_root
def test_cli_check_ok_prints_a_summary_and_notes(tmp_path: Path) -> None:
    path = write_policy(tmp_path, TWO_WORKLOADS)
    result = CliRunner().invoke(main, ["policy", "check", str(path)])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        f"OK: {path} (2 workloads: app (enforce), proxy (monitor))",
    ]
    assert result.stderr == ""


@needs_root
def test_cli_check_invalid_prints_problems_on_stderr_and_exits_1(tmp_path: Path) -> None:
    path = write_policy(tmp_path, MINIMAL.replace("name: app", "name: App").replace("/16", "/33"))
    result = CliRunner().invoke(main, ["policy", "check", str(path)])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{path}:3: workloads[0].name: 'App' is not a valid workload name: use 1-32 lowercase letters, "
        "digits and '-', starting and ending with a letter or digit",
        f"{path}:5: workloads[0].allow[0].cidr: '10.20.0.0/33' is not an IPv4 or IPv6 address or prefix",
    ]


@needs_root
def test_cli_check_json_ok(tmp_path: Path) -> None:
    path = write_policy(tmp_path, TWO_WORKLOADS)
    result = CliRunner().invoke(main, ["policy", "check", str(path), "-o", "json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert (document["ok"], document["path"], document["problems"]) == (True, str(path), [])
    assert [(w["name"], w["mode"]) for w in document["workloads"]] == [("app", "enforce"), ("proxy", "monitor")]
    assert document["workloads"][0]["allow"] == [
        {"kind": "cidr", "value": "10.20.0.0/16", "ports": [], "protocol": "any", "line": 5}
    ]
    assert document["notices"] == []


def test_cli_check_json_problems_exit_1(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yaml"
    result = CliRunner().invoke(main, ["policy", "check", "-o", "json", str(missing)])
    assert result.exit_code == 1
    assert json.loads(result.stdout) == {
        "ok": False,
        "path": str(missing),
        "workloads": [],
        "problems": [{"path": str(missing), "line": None, "key": "", "reason": "no such file"}],
        "notices": [],
    }


def test_cli_usage_error_exits_2() -> None:
    result = CliRunner().invoke(main, ["policy", "check", "-o", "yaml", "x.yaml"])
    assert result.exit_code == 2
    assert "'yaml' is not one of 'text', 'json'" in result.stderr


def test_cli_no_permission_check_validates_a_draft(tmp_path: Path) -> None:
    path = write_policy(tmp_path, mode=0o666)
    result = CliRunner().invoke(main, ["policy", "check", "--no-permission-check", str(path)])
    assert (result.exit_code, result.stdout) == (0, f"OK: {path} (1 workload: app (enforce))\n")


def test_installed_warden_checks_the_bundled_example() -> None:
    # --no-permission-check for the reason given in the load test above.
    result = subprocess.run(
        [str(REPO / ".venv" / "bin" / "warden"), "policy", "check", "--no-permission-check", "examples/policy.yaml"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OK: examples/policy.yaml (1 workload: litellm (monitor))\n")
    assert result.stderr == ""
