"""What the hooks themselves cost a connect: the agent's programs against empty programs at the
same hooks, and against an nftables rule set doing the same job for one cgroup.

    python bench/hooks.py [--cycles N] [--block-size N] [--repeats N] [--program-times] [-o table|json]

One client process in ROUTER, pinned to one CPU (the server to the other), moves itself
between cgroups and makes a block of connects (connect + reset close) in each, in turn:
- plain: a cgroup nothing is attached to (the baseline);
- empty: programs that return at once at sock_create, connect4 and egress, the hooks a
  connect passes (what running cgroup programs costs at all);
- warden: the agent's whole program set (bpf/warden.bpf.c), guarding the cgroup with an
  allowlist of the one provider, loaded in this process (no agent runs), its socket slots
  folded before each repeat as a running agent folds them every second: a slot not folded
  since its last socket makes the connect hook read it before rewriting it (a cache miss,
  90 ns with the statistics on), which no running agent leaves;
- nftables: no program, an output-hook rule set accepting the provider and dropping all
  else for that cgroup (`socket cgroupv2`), when nft is installed.
One process throughout, so the ratios carry no difference between processes (two identical
clients differ by up to 2 % here, bench/foundation.py). Each ratio is connects per second in
that cgroup over plain, all blocks of a repeat together; a repeat is a fresh client.

--program-times also turns kernel.bpf_stats_enabled on for the run and reports the
nanoseconds of each program run, empty and warden: their difference, times the runs a connect
makes, is what the program bodies add to a connect. The statistics add two clock reads to
every run (and wait for its memory loads to finish), so that run's ratios are lower and
its times higher than without; the differences between programs are what they show.
"""
from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator

# first: puts tests/ and the repository root on sys.path
from common import argument_parser, parse, progress, report

from agent import cgroups
from agent.kernel import bpfsys
from agent.kernel.loader import AllowEntry, KernelPrograms, detach_all, remove_pins
from agent.lab.network import Lab
from foundation import PROVIDER_PORT, cgroup_dir, client_and_server_cpus, pinned, positive, start_accept_server

# For each JSON line {"cgroups": [...], "block": N, "cycles": C} on stdin: C cycles, each a
# block of N connects in every cgroup (rotating which goes first); prints the seconds of each
# block per cgroup.
MOVING_CLIENT = """
import json, os, socket, struct, sys, time
host, port = sys.argv[1], int(sys.argv[2])
reset_on_close = struct.pack("ii", 1, 0)
pid = str(os.getpid())
for line in sys.stdin:
    request = json.loads(line)
    places = [open(cgroup + "/cgroup.procs", "w") for cgroup in request["cgroups"]]
    seconds = [[] for _ in places]
    for cycle in range(request["cycles"]):
        order = list(range(len(places)))
        order = order[cycle % len(order):] + order[:cycle % len(order)]
        for i in order if cycle % 2 == 0 else reversed(order):
            places[i].write(pid)
            places[i].flush()
            started = time.perf_counter()
            for _ in range(request["block"]):
                with socket.socket() as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, reset_on_close)
                    s.connect((host, port))
            seconds[i].append(time.perf_counter() - started)
    for place in places:
        place.close()
    print(json.dumps(seconds), flush=True)
"""

EMPTY_PROGRAMS = """
int empty_connect4(struct bpf_sock_addr *ctx) { return 1; }
int empty_sock_create(struct bpf_sock *sk) { return 1; }
int empty_egress(struct __sk_buff *skb) { return 1; }
"""


@contextmanager
def empty_programs(cgroup: Path) -> Iterator[dict[str, int]]:
    from bcc import BPF, BPFAttachType as A, BPFProgType as P

    bpf = BPF(text=EMPTY_PROGRAMS)
    hooks = [("empty_connect4", P.CGROUP_SOCK_ADDR, A.CGROUP_INET4_CONNECT),
             ("empty_sock_create", P.CGROUP_SOCK, A.CGROUP_INET_SOCK_CREATE),
             ("empty_egress", P.CGROUP_SKB, A.CGROUP_INET_EGRESS)]
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    attached = []
    try:
        for name, prog_type, attach_type in hooks:
            function = bpf.load_func(name.encode(), prog_type, attach_type=attach_type)
            bpfsys.attach(function.fd, fd, attach_type)
            attached.append((function.fd, attach_type))
        yield {name: prog_fd for (name, _, _), (prog_fd, _) in zip(hooks, attached)}
    finally:
        for prog_fd, attach_type in attached:
            bpfsys.detach(prog_fd, fd, attach_type)
        os.close(fd)
        bpf.cleanup()


@contextmanager
def warden_programs(cgroup: Path) -> Iterator[KernelPrograms]:
    pin_dir = Path("/sys/fs/bpf") / f"ew-bench-{secrets.token_hex(4)}"
    programs = KernelPrograms(pin_dir=pin_dir)
    try:
        programs.set_workload(0, mode="enforce", quarantined=False, dns=False)
        programs.replace_allowlist(0, [AllowEntry(ipaddress.ip_network(f"{Lab.PROVIDER4}/32"), "tcp", PROVIDER_PORT)])
        programs.guard(cgroup, cgroups.cgroup_id(cgroup), 0)
        yield programs
    finally:
        detach_all(cgroup)
        programs.close()
        remove_pins(pin_dir)


def nftables_rules(lab: Lab, cgroup: Path) -> None:
    """In ROUTER, which the lab removes; nft names a cgroup by its path below /sys/fs/cgroup."""
    level = len(cgroup.relative_to(cgroups.cgroup2_root()).parts)
    path = cgroup.relative_to("/sys/fs/cgroup")
    rules = (f"table inet ew_bench {{\n chain out {{\n  type filter hook output priority 0; policy accept;\n"
             f'  socket cgroupv2 level {level} "{path}" ip daddr {Lab.PROVIDER4} tcp dport {PROVIDER_PORT} accept\n'
             f'  socket cgroupv2 level {level} "{path}" drop\n }}\n}}\n')
    done = subprocess.run(lab.router_cmd(["nft", "-f", "-"]), input=rules, text=True, capture_output=True)
    if done.returncode != 0:
        raise RuntimeError(f"nft refused the rule set: {done.stderr.strip()}")


WARM_UP_CYCLES = 2  # before each repeat's measured cycles: first connects, caches


def measure(lab: Lab, places: dict[str, Path], cycles: int, block: int, repeats: int,
            before_each_repeat: Callable[[], object]) -> dict[str, list[float]]:
    """name -> its ratio against "plain" in each repeat."""
    client_cpu, _ = client_and_server_cpus()
    argv = pinned(client_cpu, [sys.executable, "-c", MOVING_CLIENT, Lab.PROVIDER4, str(PROVIDER_PORT)])
    names = list(places)
    ratios: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        before_each_repeat()
        client = lab.run_in_router(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            request = {"cgroups": [str(places[n]) for n in names], "block": block}
            client.stdin.write(json.dumps({**request, "cycles": WARM_UP_CYCLES}) + "\n")
            client.stdin.flush()
            client.stdout.readline()
            client.stdin.write(json.dumps({**request, "cycles": cycles}) + "\n")
            client.stdin.flush()
            seconds = dict(zip(names, json.loads(client.stdout.readline())))
        finally:
            client.stdin.close()
            client.wait(timeout=10)
        for name in names:
            ratios[name].append(sum(seconds["plain"]) / sum(seconds[name]))
        progress(f"  repeat {repeat + 1}/{repeats}: " + ", ".join(f"{n} {ratios[n][-1]:.3f}" for n in names[1:]))
    return ratios


@contextmanager
def kernel_bpf_stats() -> Iterator[None]:
    """kernel.bpf_stats_enabled on, then as it was."""
    setting = Path("/proc/sys/kernel/bpf_stats_enabled")
    before = setting.read_text().strip()
    setting.write_text("1")
    try:
        yield
    finally:
        setting.write_text(before)


def run_totals(programs: dict[str, dict[str, int]]) -> dict[str, dict[str, tuple[int, int]]]:
    return {place: {name: bpfsys.program_run_totals(fd) for name, fd in fds.items()}
            for place, fds in programs.items()}


def program_times(before: dict[str, dict[str, tuple[int, int]]], after: dict[str, dict[str, tuple[int, int]]],
                  connects: int) -> dict[str, dict[str, dict[str, float]]]:
    """place -> program -> its ns per run and runs per connect, for the programs that ran."""
    times: dict[str, dict[str, dict[str, float]]] = {}
    for place, programs in after.items():
        for name, (ns, runs) in programs.items():
            ran = runs - before[place][name][1]
            if ran:
                times.setdefault(place, {})[name] = {"ns_per_run": (ns - before[place][name][0]) / ran,
                                                     "runs_per_connect": ran / connects}
    return times


def ns_per_connect(programs: dict[str, dict[str, float]]) -> float:
    return sum(p["ns_per_run"] * p["runs_per_connect"] for p in programs.values())


def times_table(times: dict[str, dict[str, dict[str, float]]]) -> str:
    rows = [f"{'program (bpf_stats on)':30s}  {'ns/run':>7s}  {'runs/connect':>12s}"]
    for place, programs in times.items():
        rows += [f"{name:30s}  {p['ns_per_run']:7.1f}  {p['runs_per_connect']:12.2f}" for name, p in programs.items()]
        rows.append(f"{place + ' programs per connect':30s}  {ns_per_connect(programs):7.1f}")
    return "\n".join(rows)


def table(ratios: dict[str, list[float]]) -> str:
    rows = [f"{'connect rate against plain':30s}  {'mean':>6s}  {'lowest':>6s}  {'highest':>7s}"]
    for name, values in ratios.items():
        if name != "plain":
            rows.append(f"{name:30s}  {statistics.mean(values):6.3f}  {min(values):6.3f}  {max(values):7.3f}")
    return "\n".join(rows)


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--cycles", type=positive, default=150, help="blocks in each cgroup per repeat (default 150)")
    parser.add_argument("--block-size", type=positive, default=200, help="connects per block (default 200)")
    parser.add_argument("--repeats", type=positive, default=5, help="fresh clients, one after the other (default 5)")
    parser.add_argument("--program-times", action="store_true",
                        help="also the ns of each program run (kernel.bpf_stats_enabled on for the run)")
    arguments = parse(parser)
    with Lab() as lab, ExitStack() as stack:
        start_accept_server(lab, client_and_server_cpus()[1])
        parent = stack.enter_context(cgroup_dir(cgroups.cgroup2_root(), f"ew-bench-hooks-{secrets.token_hex(3)}"))
        places = {name: stack.enter_context(cgroup_dir(parent, name)) for name in ("plain", "empty", "warden")}
        warden = stack.enter_context(warden_programs(places["warden"]))
        programs = {"empty": stack.enter_context(empty_programs(places["empty"])), "warden": warden.hook_programs}
        if shutil.which("nft"):
            places["nftables"] = stack.enter_context(cgroup_dir(parent, "nftables"))
            nftables_rules(lab, places["nftables"])
        else:
            progress("nft is not installed: no nftables comparison (Debian package nftables)")
        with kernel_bpf_stats() if arguments.program_times else nullcontext():
            before = run_totals(programs)
            ratios = measure(lab, places, arguments.cycles, arguments.block_size, arguments.repeats,
                             warden.traffic_changes)
            after = run_totals(programs)
    if not arguments.program_times:
        report(arguments.output, ratios, table(ratios))
        return
    connects = (arguments.cycles + WARM_UP_CYCLES) * arguments.block_size * arguments.repeats  # in each cgroup
    times = program_times(before, after, connects)
    report(arguments.output, {"ratios": ratios, "program_times": times},
           table(ratios) + "\n\n" + times_table(times))


if __name__ == "__main__":
    main()
