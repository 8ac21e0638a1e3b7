"""The agent: policy -> kernel -> events -> actions, in that one direction.

It owns the running state (which workload has which kernel index and cgroups, which is
quarantined) and the loop that reads kernel records. Everything it decides becomes an
event first; actions follow the event that caused them."""
from __future__ import annotations

import ipaddress
import logging
import os
import queue
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from agent import actions, cgroups
from agent.cgroups.launch import launched_into
from agent.dns.names import NameMatcher
from agent.dns.proxy import DnsProxy, WorkloadDns, parse_upstreams
from agent.dns.remembered import RememberedAnswers
from agent.events import Destination, Event, EventBus, EventKind, ProcessInfo
from agent.events.process import describe_process, forget_process
from agent.actions.hooks import DEFAULT_TIMEOUT_SECONDS, HookOutcome, HookRunner
from agent.actions.quarantines import QuarantineRecord
from agent.events.repeats import RepeatFolder
from agent.kernel.indexes import WorkloadIndexes
from agent.kernel.loader import DEFAULT_PIN_DIR, PORT_ANY, AllowEntry, KernelPrograms, TrafficChanges
from agent.kernel.records import Kind, KernelRecord, Verdict
from agent.kernel.sockets import InetSocket, destroy_socket, process_sockets
from agent.policy import Budget, Policy, PolicyError, Workload, load_policy
from agent.traffic import Anomaly, BudgetCrossing, DestinationTraffic, ProcessTraffic, TrafficWatch
from agent.traffic.record import TrafficRecord

log = logging.getLogger("egress_warden")

_PROTOCOL_NAMES = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp", socket.IPPROTO_ICMP: "icmp",
                   socket.IPPROTO_ICMPV6: "icmpv6", socket.IPPROTO_RAW: "raw"}
_HOOK_NAMES = {Kind.CONNECT: "connect", Kind.SENDMSG: "sendmsg", Kind.SOCK_CREATE: "sock_create",
               Kind.BACKSTOP: "egress"}
_LOST_CHECK_SECONDS = 1.0
_ESCAPE_SWEEPS = 10  # each returns what the ones before it forked meanwhile
_ACCOUNTING_SECONDS = 1.0
# Violations an operator's on_violation hook hears about: refusals in enforce mode.
_VIOLATION_KINDS = {EventKind.EGRESS_DENIED, EventKind.CGROUP_ESCAPE, EventKind.SOCKET_DESTROYED}
_BUDGET_KINDS = {EventKind.BUDGET_EXCEEDED, EventKind.ANOMALY}


@dataclass
class RunningWorkload:
    spec: Workload
    index: int
    cgroup: Path  # egress-warden/NAME: where `warden run` and discovery put processes
    unit_cgroup: Path | None = None  # the systemd unit's own cgroup, while it exists
    unit_cgroup_id: int = 0  # its id: systemd makes a new cgroup (same path, new id) each time the unit starts
    quarantined_since: float | None = None  # seconds since the epoch
    bound_ids: set[int] = field(default_factory=set)

    @property
    def quarantined(self) -> bool:
        return self.quarantined_since is not None

    @property
    def cgroup_dirs(self) -> list[Path]:
        return [p for p in (self.cgroup, self.unit_cgroup) if p is not None]

    def contains(self, path: Path) -> bool:
        return any(cgroups.is_within(path, root) for root in self.cgroup_dirs)


def allow_entries(spec: Workload) -> list[AllowEntry]:
    """The kernel allowlist of a workload: one entry per cidr rule and port."""
    return [
        AllowEntry(rule.network(), rule.protocol, port)
        for rule in spec.allow
        if rule.kind == "cidr"
        for port in (rule.ports or (PORT_ANY,))
    ]


def _cgroup_id_if_exists(cgroup: Path | None) -> int:
    try:
        return cgroups.cgroup_id(cgroup) if cgroup is not None else 0
    except FileNotFoundError:
        return 0


def _log_unfinished(action: str, workload: str, outcome: dict[str, Any], consequence: str = "") -> None:
    if "unfinished" in outcome:
        log.error("%s of %s: %s%s", action, workload, "; ".join(outcome["unfinished"]), consequence)


def destination_allowed(spec: Workload, ip: str, port: int, protocol: str) -> bool:
    """The kernel's rule, for sockets judged in user space (adoption)."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return any(
        rule.kind == "cidr"
        and addr in rule.network()
        and rule.protocol in ("any", protocol)
        and (not rule.ports or port in rule.ports)
        for rule in spec.allow
    )


class Agent:
    def __init__(self, policy_path: Path, state_dir: Path, bus: EventBus, pin_dir: Path = DEFAULT_PIN_DIR,
                 hook_timeout: float = DEFAULT_TIMEOUT_SECONDS) -> None:
        self.policy_path = Path(policy_path)
        self.state_dir = Path(state_dir)
        self.pin_dir = Path(pin_dir)
        self.bus = bus
        self.policy: Policy | None = None
        self.kernel: KernelPrograms | None = None
        self.dns: DnsProxy | None = None
        self._dns_events: queue.SimpleQueue = queue.SimpleQueue()  # from the proxy's thread
        self.workloads: dict[str, RunningWorkload] = {}
        self._lock = threading.RLock()
        # Set from signal handlers, so plain flags: a handler can be interrupted by the next
        # signal, and one inside threading.Event.set would wait forever on the lock its own
        # thread holds (an agent sent SIGINT and SIGTERM together never stopped).
        self._stop_requested = False
        self._reload_requested = False
        self._stopping = threading.Event()  # wakes the accounting thread
        self._lost_reported = 0
        self._joined_by_agent: dict[int, str] = {}
        self._repeats = RepeatFolder()
        self._cgroup_root = cgroups.cgroup2_root()
        self._never_adopt = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
        self.traffic = TrafficWatch(self._name_for)
        # The meter has a lock of its own so that a long tick (every counter new after a start:
        # 65,536 take 0.14-0.3 s) never holds back the verdicts and kills under self._lock.
        self._traffic_lock = threading.Lock()
        self._traffic_record = TrafficRecord(self.state_dir)
        self._indexes = WorkloadIndexes(self.state_dir)
        self._hooks = HookRunner(self._on_hook_finished, hook_timeout)
        self._accounting_failure: BaseException | None = None
        self._quarantines = QuarantineRecord(self.state_dir)
        self._quarantined_before: dict[str, float] = {}  # by the agent before this one

    # --- life cycle -------------------------------------------------------------------

    def start(self) -> float:
        """Load the policy, compile and attach the programs, adopt running processes.
        Returns the seconds from start to enforcing."""
        started = time.monotonic()
        policy = load_policy(self.policy_path)  # PolicyError: nothing to enforce, refuse to start
        self._quarantined_before = self._quarantines.load()  # QuarantineRecordError: likewise
        self.kernel = KernelPrograms(pin_dir=self.pin_dir)
        self.kernel.on_record(self._on_record)
        self.dns = DnsProxy(self.kernel, self._dns_events, RememberedAnswers(self.state_dir))
        self.dns.start()
        with self._lock:
            self._apply(policy)
            self._traffic_record.restore_into(self.traffic, self._workload_indexes())
            self._keep_earlier_quarantines()
            left_behind = self._release_what_earlier_agents_left()
        seconds = time.monotonic() - started
        log.info("enforcing %d workload(s) after %.2f s (programs compiled and loaded in %.2f s)",
                 len(self.workloads), seconds, self.kernel.load_seconds)
        self._publish(Event(EventKind.AGENT_STARTED, detail={
            "startup_seconds": round(seconds, 3), "compile_seconds": round(self.kernel.load_seconds, 3),
            "pid": os.getpid(), "cgroup_root": str(self._cgroup_root),
            "detached_left_behind": [str(c) for c in left_behind]}))
        return seconds

    def _release_what_earlier_agents_left(self) -> list[Path]:
        """Cgroups an earlier agent guarded for workloads this policy no longer has lose its
        programs (and a quarantine's freeze), as a reload would have taken them away."""
        guarded = {c for w in self.workloads.values() for c in w.cgroup_dirs}
        left_behind = self.kernel.detach_left_behind(self._cgroup_root, guarded)
        for cgroup in left_behind:
            thawed = cgroups.is_frozen(cgroup)
            if thawed:
                cgroups.thaw(cgroup)
            log.warning("no workload of the policy guards %s: detached the programs an earlier agent left there%s",
                        cgroup, " and thawed it" if thawed else "")
        return left_behind

    def run(self) -> None:
        next_check = 0.0
        # A thread that wants the GIL waits this long for another to hand it over: with
        # Python's 5 ms, each system call of a kill cost up to 5 ms while the accounting read a
        # full map (p99 violation to workload gone 53 ms; 21 ms at 0.5 ms, bench/accounting.py).
        sys.setswitchinterval(0.0005)
        accounting = threading.Thread(target=self._account_traffic_every_second, name="traffic-accounting",
                                      daemon=True)
        accounting.start()
        while not self._stop_requested:
            self.kernel.poll(100)
            if self._accounting_failure:
                raise self._accounting_failure
            self._publish_dns_events()
            self._publish_repeats()
            if self._reload_requested:
                self._reload_requested = False
                self.reload()
            searching = time.monotonic() >= next_check
            with self._lock:
                self._follow_unit_cgroups(search=searching)
            if searching:
                next_check = time.monotonic() + _LOST_CHECK_SECONDS
                with self._lock:
                    self._report_lost_records()
                self.dns.sweep()
        self._stopping.set()
        accounting.join()
        self._save_traffic_record()
        self.dns.stop()
        self._publish_repeats(everything=True)  # they may run hooks
        self._hooks.close()
        self._publish(Event(EventKind.AGENT_STOPPED, detail={
            "enforcement": "left attached: workloads stay enforced until the agent returns"}))

    def stop(self) -> None:
        """Ask `run` to return (within its 0.1 s poll). Safe in a signal handler: takes no lock."""
        self._stop_requested = True

    def _publish_repeats(self, everything: bool = False) -> None:
        with self._lock:
            for summary in self._repeats.due(everything):
                self._publish(summary)

    def request_reload(self) -> None:
        """Ask `run` to reload the policy. Safe in a signal handler: takes no lock."""
        self._reload_requested = True

    def reload(self) -> Event:
        """Apply the policy file again. An invalid policy is refused and the one in force stays.
        Returns the policy_loaded or policy_rejected event."""
        try:
            policy = load_policy(self.policy_path)
        except PolicyError as e:
            log.error("policy %s rejected; the previous policy stays in force:\n%s", self.policy_path, e)
            return self._publish(Event(EventKind.POLICY_REJECTED, detail={
                "path": str(self.policy_path), "problems": [str(p) for p in e.problems],
                "in_force": self.policy.path if self.policy else None}))
        with self._lock:
            return self._apply(policy)

    # --- what the API reports ------------------------------------------------------------

    def workload_members(self) -> list[tuple[RunningWorkload, list[int]]]:
        """Each workload with the pids now in its cgroups."""
        with self._lock:
            return [(w, sorted({p for c in w.cgroup_dirs for p in cgroups.pids(c)})) for w in self.workloads.values()]

    def kernel_figures(self) -> dict[str, Any]:
        return {"records_lost": self.kernel.lost_records(), "features": self.kernel.features}

    # --- policy -> kernel ------------------------------------------------------------

    def _apply(self, policy: Policy) -> Event:
        wanted = {w.name: w for w in policy.workloads}
        retired = [self.workloads.pop(n) for n in list(self.workloads) if n not in wanted]
        for running in retired:
            self._retire(running)
        if any(r.quarantined for r in retired):
            self._save_quarantines()
        for spec in policy.workloads:
            self._enforce(spec)
        self.kernel.set_discovery(any(w.match.exe or w.match.cmdline for w in policy.workloads))
        self.policy = policy
        loaded = self._publish(Event(EventKind.POLICY_LOADED, detail={
            "path": policy.path, "notices": list(policy.notices),
            "workloads": {w.name: {"mode": w.mode, "on_violation": w.on_violation,
                                   "cgroups": [str(p) for p in self.workloads[w.name].cgroup_dirs]}
                          for w in policy.workloads}}))
        for notice in policy.notices:
            log.warning("%s", notice)
        self._adopt_matching_processes()
        return loaded

    def _enforce(self, spec: Workload) -> None:
        running = self.workloads.get(spec.name)
        if running is None:
            index = self._indexes.index_for(spec.name, {w.index for w in self.workloads.values()})
            running = RunningWorkload(spec, index, cgroups.workload_cgroup(spec.name, self._cgroup_root),
                                      quarantined_since=self._quarantined_before.get(spec.name))
            self.workloads[spec.name] = running
        running.spec = spec
        # Allowances first, then the generation bump, so the backstop re-judges sockets
        # against the new list and nothing allowed by both policies is cut in between.
        self.kernel.set_listen_ports(running.index, spec.listen)
        self.kernel.replace_allowlist(running.index, allow_entries(spec))
        # The proxy listens where the workload's processes are before the kernel sends it
        # queries, and stops only once the kernel no longer does.
        dns = self._dns_config(running)
        if dns is not None:
            self.dns.set_workload(spec.name, dns)
            self._open_dns_for(running, [p for c in running.cgroup_dirs for p in cgroups.pids(c)])
        self._set_kernel_state(running)
        if dns is None:
            self.dns.set_workload(spec.name, None)
        self._guard_cgroup(running, running.cgroup)
        if not self._follow_unit_cgroup(running, search=True) and running.unit_cgroup is not None:
            self._guard_cgroup(running, running.unit_cgroup)

    def _set_kernel_state(self, running: RunningWorkload) -> None:
        """The workload's mode, quarantine and DNS redirection, as the kernel must hold them."""
        self.kernel.set_workload(running.index, mode=running.spec.mode, quarantined=running.quarantined,
                                 dns=bool(NameMatcher(running.spec.allow)))

    @staticmethod
    def _dns_config(running: RunningWorkload) -> WorkloadDns | None:
        """The DNS proxy's view of a workload; None when it has no fqdn rule (its port 53 is
        then judged by its cidr rules like any other port)."""
        spec = running.spec
        matcher = NameMatcher(spec.allow)
        if not matcher:
            return None
        return WorkloadDns(spec.name, running.index, spec.mode, matcher, parse_upstreams(spec.dns.upstream),
                           spec.dns.grace_seconds,
                           lambda: [p for c in running.cgroup_dirs for p in cgroups.pids(c)])

    def _open_dns_for(self, running: RunningWorkload, pids: list[int]) -> None:
        for pid in pids:
            self.dns.open_for(running.spec.name, pid)

    def _publish_dns_events(self) -> None:
        while True:
            try:
                event = self._dns_events.get_nowait()
            except queue.Empty:
                return
            with self._lock:
                self._publish(event)
                running = self.workloads.get(event.workload)
                if event.kind == EventKind.DNS_DENIED and event.verdict == "deny" and running and not running.quarantined:
                    self._respond(running, event)

    def _guard_cgroup(self, running: RunningWorkload, cgroup: Path) -> None:
        cgroup_id = cgroups.cgroup_id(cgroup)
        running.bound_ids.add(cgroup_id)
        replaced = self.kernel.guard(cgroup, cgroup_id, running.index)
        if replaced:
            log.info("took over %d program(s) an earlier agent attached to %s", replaced, cgroup)
        pids = cgroups.pids(cgroup)
        self.kernel.add_members(running.index, pids)
        self._open_dns_for(running, pids)

    def _follow_unit_cgroups(self, search: bool) -> None:
        """Every 0.1 s the unit cgroups known are checked (a stat each), and once a second the
        missing ones are searched for: a router unit that restarts runs in a new cgroup, which
        no program guards until the agent finds it."""
        for running in self.workloads.values():
            if running.unit_cgroup is not None or search:
                self._follow_unit_cgroup(running, search)

    def _follow_unit_cgroup(self, running: RunningWorkload, search: bool) -> bool:
        """Keep the workload on its unit's cgroup as it is now. systemd removes a unit's cgroup
        when the unit stops and makes a new one at the same path when it starts again; the
        programs and the binding went with the old one. True if it changed."""
        found = running.unit_cgroup
        if search:
            unit = running.spec.match.systemd_unit
            found = cgroups.find_unit_cgroup(unit, self._cgroup_root) if unit else None
        found_id = _cgroup_id_if_exists(found)
        if found_id == running.unit_cgroup_id and found == running.unit_cgroup:
            return False
        self._leave_unit_cgroup(running, keep=found)
        if found_id:
            running.unit_cgroup, running.unit_cgroup_id = found, found_id
            try:
                self._guard_cgroup(running, found)
            except FileNotFoundError:  # stopped again meanwhile: found at the next look
                self._leave_unit_cgroup(running, keep=None)
                return True
            if running.quarantined and running.spec.name not in self._quarantined_before:
                # systemd started the unit again (a restart, a reboot): the earlier agent's
                # quarantines are frozen by _keep_earlier_quarantines.
                self._freeze_with_evidence(running, {"cause": "unit_started",
                                                     "quarantined_since": running.quarantined_since})
        return True

    def _leave_unit_cgroup(self, running: RunningWorkload, keep: Path | None) -> None:
        """Forget the unit cgroup guarded so far: gone (its id is free for reuse), or no longer
        the policy's unit (its programs come off)."""
        if running.unit_cgroup_id:
            self.kernel.unbind_cgroup(running.unit_cgroup_id)
            running.bound_ids.discard(running.unit_cgroup_id)
        if running.unit_cgroup is not None and running.unit_cgroup != keep and running.unit_cgroup.exists():
            self.kernel.detach(running.unit_cgroup)
        running.unit_cgroup, running.unit_cgroup_id = None, 0

    def _retire(self, running: RunningWorkload) -> None:
        """A workload gone from the policy: its processes are no longer guarded."""
        for cgroup in running.cgroup_dirs:
            if running.quarantined and cgroup.exists():
                cgroups.thaw(cgroup)
            self.kernel.detach(cgroup)
        for cgroup_id in running.bound_ids:
            self.kernel.unbind_cgroup(cgroup_id)
        self.dns.set_workload(running.spec.name, None)
        self.kernel.deactivate_workload(running.index)

    # --- discovery ---------------------------------------------------------------------

    def _adopt_matching_processes(self) -> None:
        for proc in psutil.process_iter(["pid", "exe", "cmdline"]):
            self._maybe_adopt(proc.info["pid"], proc.info["exe"], proc.info["cmdline"])

    def _maybe_adopt(self, pid: int, exe: str | None, cmdline: list[str] | None) -> None:
        if pid in self._never_adopt or not exe or launched_into(cmdline or []) in self.workloads:
            return  # a `warden run` launcher joins its own workload a moment later
        joined = " ".join(cmdline or ())
        # A venv's python is a link to the base interpreter, which is what /proc/PID/exe
        # names; the path it was started by (argv[0]) is what an exe glob is written for.
        started_as = [exe, *(cmdline[:1] if cmdline and cmdline[0].startswith("/") else [])]
        for running in self.workloads.values():
            if any(running.spec.match.matches(path, joined) for path in started_as):
                self._adopt(running, pid)
                return

    def _adopt(self, running: RunningWorkload, pid: int) -> None:
        if not self._adopt_one(running, pid, "matched the workload's match.exe/match.cmdline"):
            return
        # What it started before the move (a worker it forked, a curl it ran) is the router's
        # too, though it may match nothing; what it forks from now on starts inside.
        try:
            children = [child.pid for child in psutil.Process(pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for child in children:
            self._adopt_one(running, child, f"started by {pid}, which matched the workload's match")

    def _adopt_one(self, running: RunningWorkload, pid: int, reason: str) -> bool:
        try:
            # In another workload already (`warden run`, its unit): moving it would be an escape
            # from that one, and its violation action.
            current = cgroups.cgroup_of_pid(pid, self._cgroup_root)
            if any(w.contains(current) for w in self.workloads.values()):
                return False
            self._joined_by_agent[pid] = reason
            cgroups.move_pid(running.cgroup, pid)
        except (FileNotFoundError, ProcessLookupError):
            return False  # exited meanwhile
        self.kernel.add_members(running.index, [pid])
        self._open_dns_for(running, [pid])
        self._cut_disallowed_sockets(running, pid)
        return True

    def _cut_disallowed_sockets(self, running: RunningWorkload, pid: int) -> None:
        """Sockets opened before adoption belong to the old cgroup: no hook of the workload
        sees them. Established TCP ones to destinations not allowed are destroyed. A UDP socket
        cannot be (SOCK_DESTROY only fails its next send; the one after goes out), so one that
        may send where the policy does not allow (unconnected, or connected there) is reported
        as the unguarded way out it is."""
        spec = running.spec
        try:
            held = process_sockets(pid)
        except FileNotFoundError:
            return
        for sock in held:
            tcp = sock.protocol_name == "tcp"
            if tcp and (not sock.connected or sock.local_port in spec.listen):
                continue
            if sock.connected and destination_allowed(spec, sock.remote_ip, sock.remote_port, sock.protocol_name):
                continue
            if tcp:
                self._destroy_held_socket(running, pid, sock)
            else:
                self._publish(Event(
                    EventKind.EGRESS_OBSERVED, workload=spec.name, process=describe_process(pid),
                    destination=self._socket_destination(sock) if sock.connected else None, verdict="allow",
                    detail={"reason": "a UDP socket opened before the process was adopted: outside the workload's "
                                      "programs for its life, and SOCK_DESTROY does not stop one",
                            "local": f"{sock.local_ip}:{sock.local_port}", "connected": sock.connected}))

    def _destroy_held_socket(self, running: RunningWorkload, pid: int, sock: InetSocket) -> None:
        enforcing = running.spec.mode == "enforce"
        if enforcing:
            try:
                destroy_socket(pid, sock)
            except (FileNotFoundError, ProcessLookupError):
                return  # the socket or its process went meanwhile: nothing is left to cut
        self._publish(Event(
            EventKind.SOCKET_DESTROYED if enforcing else EventKind.EGRESS_OBSERVED,
            workload=running.spec.name, process=describe_process(pid),
            destination=self._socket_destination(sock), verdict="deny" if enforcing else "allow",
            action="socket_destroyed" if enforcing else None,
            detail={"reason": "established before the process was adopted; destination not allowed"}))

    @staticmethod
    def _socket_destination(sock: InetSocket) -> Destination:
        return Destination(sock.remote_ip_unmapped, sock.remote_port, sock.protocol_name)

    # --- kernel records -> events -------------------------------------------------------

    def _on_record(self, record: KernelRecord) -> None:
        with self._lock:
            handler = {
                Kind.EXEC: self._on_exec,
                Kind.EXIT: self._on_exit,
                Kind.CGROUP_ATTACH: self._on_cgroup_attach,
                Kind.DNS_PENDING: self._on_dns_pending,
            }.get(record.kind, self._on_verdict)
            handler(record)

    def _workload_at(self, index: int | None) -> RunningWorkload | None:
        return next((w for w in self.workloads.values() if w.index == index), None)

    def _on_verdict(self, record: KernelRecord) -> None:
        running = self._workload_at(record.workload)
        if running is None:
            return
        repeat = (record.workload, record.tgid, record.kind, record.verdict, record.address, record.dport,
                  record.protocol, running.quarantined)
        if self._repeats.absorb(repeat):
            return
        pid = record.tgid or self._owner_of_socket(running, record)
        event = Event(
            EventKind.EGRESS_DENIED if record.verdict == Verdict.DENY else EventKind.EGRESS_OBSERVED,
            workload=running.spec.name,
            process=describe_process(pid, comm=record.comm, uid=record.uid) if pid else None,
            destination=self._record_destination(record),
            verdict="deny" if record.verdict == Verdict.DENY else "allow",
            detail=self._verdict_detail(running, record, pid),
        )
        self._publish(event)
        self._repeats.track(repeat, event)
        if record.verdict == Verdict.DENY and not running.quarantined:
            self._respond(running, event)

    @staticmethod
    def _record_destination(record: KernelRecord) -> Destination | None:
        if record.kind == Kind.SOCK_CREATE:
            return None
        protocol = _PROTOCOL_NAMES.get(record.protocol, str(record.protocol))
        return Destination(record.address, record.dport or None, protocol)

    def _verdict_detail(self, running: RunningWorkload, record: KernelRecord, pid: int | None) -> dict[str, Any]:
        detail: dict[str, Any] = {"hook": _HOOK_NAMES[record.kind], "mode": running.spec.mode,
                                  "cgroup_id": record.cgroup_id, "thread": record.pid or None}
        if running.quarantined:
            detail["quarantined"] = True
        if record.kind == Kind.SOCK_CREATE:
            detail["reason"] = "raw sockets are refused: they bypass every address check"
            detail["socket_protocol"] = record.protocol
        if record.kind == Kind.BACKSTOP:
            detail["reason"] = "packet of a socket no allowed connect explains (opened before enforcement, or its destination was revoked)"
            detail["source_port"] = record.sport
            # The backstop runs where `current` may not own the socket: found from the socket table.
            detail["attribution"] = "socket table" if pid else "unknown: no process of the workload holds the socket"
        return detail

    def _owner_of_socket(self, running: RunningWorkload, record: KernelRecord) -> int | None:
        """The process holding the socket of a backstop record the hooks never saw."""
        for cgroup in running.cgroup_dirs:
            for pid in cgroups.pids(cgroup):
                try:
                    held = process_sockets(pid)
                except (FileNotFoundError, ProcessLookupError):
                    continue
                if any(s.local_port == record.sport and s.remote_port == record.dport
                       and s.remote_ip_unmapped == record.address for s in held):
                    return pid
        return None

    def _on_exec(self, record: KernelRecord) -> None:
        forget_process(record.tgid)  # a new program: new cmdline and exe
        running = self._workload_at(record.workload)
        if running is not None:
            self._publish(Event(EventKind.PROCESS_EXEC, workload=running.spec.name,
                                process=describe_process(record.tgid, comm=record.comm, uid=record.uid),
                                detail={"filename": record.path}))
            return
        try:
            proc = psutil.Process(record.tgid)
            self._maybe_adopt(record.tgid, proc.exe(), proc.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass

    def _on_dns_pending(self, record: KernelRecord) -> None:
        """A query from a namespace where the proxy was not open yet: the kernel refused it
        (fail closed); open the proxy there so the asker's retry finds it."""
        running = self._workload_at(record.workload)
        if running is not None:
            self._open_dns_for(running, [record.tgid])

    def _on_exit(self, record: KernelRecord) -> None:
        forget_process(record.tgid)
        running = self._workload_at(record.workload)
        if running is not None:
            self._publish(Event(EventKind.PROCESS_EXITED, workload=running.spec.name,
                                process=ProcessInfo(pid=record.tgid, uid=record.uid, comm=record.comm)))

    def _on_cgroup_attach(self, record: KernelRecord) -> None:
        moved = record.aux
        destination = self._cgroup_root / record.path.lstrip("/")
        writer = {"pid": record.tgid, "comm": record.comm}
        left = self._workload_at(record.workload)
        if left is not None and not left.contains(destination):
            self._on_escape(left, moved, destination, writer)
            return
        arrived = next((w for w in self.workloads.values() if w.contains(destination)), None)
        if arrived is not None:
            self._open_dns_for(arrived, [moved])
        if arrived is not None and left is None:
            reason = self._joined_by_agent.pop(moved, None) or f"moved in by {record.comm} ({record.tgid})"
            self._publish(Event(EventKind.PROCESS_JOINED, workload=arrived.spec.name,
                                process=describe_process(moved), detail={"cgroup": str(destination), "reason": reason}))

    def _on_escape(self, running: RunningWorkload, pid: int, destination: Path, writer: dict) -> None:
        enforcing = running.spec.mode == "enforce"
        returned: list[int] = []
        forked: list[int] = []
        if enforcing:
            returned = self._return_to_workload(running, [pid])
            forked = self._return_forked_outside(running, destination, pid)
        event = self._publish(Event(
            EventKind.CGROUP_ESCAPE, workload=running.spec.name, process=describe_process(pid),
            verdict="deny" if enforcing else "allow",
            detail={"to_cgroup": str(destination), "writer": writer, "returned_to_workload": bool(returned),
                    "forked_there_and_returned": forked}))
        if enforcing:
            self._respond(running, event)

    def _return_to_workload(self, running: RunningWorkload, pids: list[int]) -> list[int]:
        returned = []
        for pid in pids:
            try:
                self._joined_by_agent[pid] = "returned by the agent after a cgroup escape"
                cgroups.move_pid(running.cgroup, pid)
                returned.append(pid)
            except OSError:  # gone meanwhile, or the cgroup refuses it
                self._joined_by_agent.pop(pid, None)
        return returned

    def _return_forked_outside(self, running: RunningWorkload, destination: Path, escaped: int) -> list[int]:
        """What the escaped process forked before it was returned runs outside every program
        of the workload; the kernel counts it a member (the fork tracepoint), so it is found
        among the destination's processes and returned too, until none is left there."""
        returned: list[int] = []
        for _ in range(_ESCAPE_SWEEPS):
            try:
                there = [int(p) for p in (destination / "cgroup.procs").read_text().split()]
            except OSError:
                break  # removed meanwhile: nothing runs there
            found = [p for p in there if p != escaped and self.kernel.member_of(p) == running.index]
            if not found:
                break
            returned += self._return_to_workload(running, found)
        return returned

    # --- actions ------------------------------------------------------------------------

    def _respond(self, running: RunningWorkload, cause: Event) -> None:
        # Records still queued after a kill find the workload empty: nothing left to act on.
        if running.spec.on_violation == "deny" or running.spec.mode != "enforce" \
                or not any(cgroups.pids(c) for c in running.cgroup_dirs):
            return
        if running.spec.on_violation == "kill":
            self.kill(running.spec.name, cause=cause)
        elif running.spec.on_violation == "quarantine":
            self.quarantine(running.spec.name, cause=cause)

    def _running(self, name: str) -> RunningWorkload:
        try:
            return self.workloads[name]
        except KeyError:
            raise KeyError(f"no workload named {name!r} in the policy in force") from None

    def kill(self, name: str, cause: Event | None = None) -> Event:
        with self._lock:
            running = self._running(name)
            outcome = actions.kill(running.cgroup_dirs)
            _log_unfinished("kill", name, outcome)
            return self._publish(Event(EventKind.ACTION_KILL, workload=name, action="kill",
                                       detail={**outcome, **self._cause(cause)}))

    def quarantine(self, name: str, cause: Event | None = None) -> Event:
        with self._lock:
            running = self._running(name)
            # Deny-all in the kernel first: it takes effect at once, freezing takes a moment.
            running.quarantined_since = running.quarantined_since or time.time()
            self._set_kernel_state(running)
            self._save_quarantines()
            return self._freeze_with_evidence(running, self._cause(cause))

    def _freeze_with_evidence(self, running: RunningWorkload, cause: dict[str, Any]) -> Event:
        outcome = actions.freeze(running.cgroup_dirs)
        _log_unfinished("quarantine", running.spec.name, outcome, " (its egress is denied all the same)")
        evidence = [actions.evidence(pid) for pid in outcome["frozen_pids"]]
        return self._publish(Event(EventKind.ACTION_QUARANTINE, workload=running.spec.name, action="quarantine",
                                   detail={**outcome, "evidence": evidence, **cause}))

    def _keep_earlier_quarantines(self) -> None:
        """Workloads the agent before this one quarantined stay so until released: their
        programs were set to deny all before they were attached (_enforce), and here their
        cgroups are frozen again (processes a reboot restarted, or a hand that thawed them)."""
        for name, since in self._quarantined_before.items():
            running = self.workloads.get(name)
            if running is None:
                continue  # out of the policy: released with what the earlier agent left
            log.warning("workload %s stays quarantined (since %s): `warden release %s` ends it", name,
                        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since)), name)
            self._freeze_with_evidence(running, {"cause": "agent_restart", "quarantined_since": since})
        self._quarantined_before = {}
        self._save_quarantines()

    def _save_quarantines(self) -> None:
        """A save that fails (a full or read-only disk) is said, not raised: the quarantine holds
        in this agent all the same, only a restart would not know it; raised, it would stop the
        freeze and its evidence."""
        try:
            self._quarantines.save({w.spec.name: w.quarantined_since
                                    for w in self.workloads.values() if w.quarantined})
        except OSError as e:
            log.error("cannot save the quarantines to %s (%s): they hold until this agent stops, but a "
                      "restarted agent would not know them", self._quarantines.path, e)

    def release(self, name: str) -> Event:
        with self._lock:
            running = self._running(name)
            running.quarantined_since = None
            self._set_kernel_state(running)
            self._save_quarantines()
            actions.thaw(running.cgroup_dirs)
            return self._publish(Event(EventKind.ACTION_RELEASE, workload=name, action="release",
                                       detail={"pids": sorted(p for c in running.cgroup_dirs for p in cgroups.pids(c))}))

    @staticmethod
    def _cause(cause: Event | None) -> dict[str, Any]:
        return {"cause_seq": cause.seq, "cause_kind": cause.kind.value} if cause else {"cause": "operator"}

    # --- traffic: counters -> budgets, spikes -------------------------------------------

    def _name_for(self, address: str) -> str | None:
        """The DNS name the proxy resolved `address` from, to label counters and budgets."""
        return self.dns.name_for(address) if self.dns else None

    # The API and metrics threads read the meter under the lock its tick (on the accounting
    # thread) holds: a tick changes the meter's totals in place.
    def traffic_by_process(self) -> list[ProcessTraffic]:
        """Per process (pid, comm, workload): bytes, packets and rate per destination, as of
        the last tick (one a second)."""
        with self._traffic_lock:
            return self.traffic.processes()

    def traffic_by_workload(self) -> dict[str, list[DestinationTraffic]]:
        with self._lock:
            names = list(self.workloads)
        with self._traffic_lock:
            return {name: self.traffic.destinations(name) for name in names}

    def budget_usage(self) -> list[tuple[str, Budget, int]]:
        """(workload, budget, bytes in its window) for each budget checked so far."""
        with self._lock:
            budgets = [(name, b) for name, w in self.workloads.items() for b in w.spec.budgets]
        with self._traffic_lock:
            used = [(name, b, self.traffic.budgets.used(name, b)) for name, b in budgets]
        return [(name, b, bytes_) for name, b, bytes_ in used if bytes_ is not None]

    def _account_traffic_every_second(self) -> None:
        """On a thread of its own: reading a full counter map takes about 0.1 s (65,536
        counters, bench/accounting.py), which on the main loop would hold back the verdicts
        it acts on, kills included. The tick takes the meter's lock, and the agent's only to act
        on what it found. A failure stops the agent, from the main loop, as it did when the
        accounting ran there."""
        try:
            while True:
                self._account_traffic(self.kernel.traffic_changes())
                if self._stopping.wait(_ACCOUNTING_SECONDS):
                    return
        except BaseException as failure:
            self._accounting_failure = failure

    def _account_traffic(self, changes: TrafficChanges) -> None:
        with self._lock:
            by_index = {w.index: w.spec for w in self.workloads.values()}
        now = time.monotonic()
        with self._traffic_lock:
            crossings, anomalies = self.traffic.tick(changes.changed, by_index, now, changes.gone)
        with self._lock:
            for crossing in crossings:
                self._on_budget_crossed(crossing)
            for anomaly in anomalies:
                self._on_anomaly(anomaly)
        if self._traffic_record.save_due(now):  # after acting: a kill must not wait for a file sync
            self._save_traffic_record()

    def _workload_indexes(self) -> dict[str, int]:
        with self._lock:
            return {name: w.index for name, w in self.workloads.items()}

    def _save_traffic_record(self) -> None:
        indexes = self._workload_indexes()
        with self._traffic_lock:
            kept = self._traffic_record.kept_of(self.traffic)
        self._traffic_record.save(kept, indexes)  # the file's sync outside the lock

    def _on_budget_crossed(self, crossing: BudgetCrossing) -> None:
        running = self.workloads.get(crossing.workload)
        if running is None:  # a reload took the workload out of the policy during the tick
            return
        budget = crossing.budget
        acting = budget.action != "alert" and running.spec.mode == "enforce"
        event = self._publish(Event(
            EventKind.BUDGET_EXCEEDED, workload=crossing.workload, bytes=crossing.window_bytes,
            destination=Destination(budget.cidr, None, "any", budget.fqdn),
            detail={"budget": {"fqdn": budget.fqdn, "cidr": budget.cidr, "bytes_per_minute": budget.bytes_per_minute,
                               "action": budget.action},
                    "window_seconds": crossing.window_seconds, "destinations": list(crossing.destinations),
                    "processes": self._top_processes(crossing), **self._unwatched(crossing),
                    **({} if acting or budget.action == "alert" else {"action_not_taken": "monitor mode"})}))
        if not acting or running.quarantined:
            return
        if budget.action == "kill":
            self.kill(crossing.workload, cause=event)
        elif budget.action == "quarantine":
            self.quarantine(crossing.workload, cause=event)

    @staticmethod
    def _unwatched(crossing: BudgetCrossing) -> dict[str, Any]:
        if crossing.unwatched_seconds is None:
            return {}
        return {"unwatched": {"seconds": crossing.unwatched_seconds, "bytes": crossing.unwatched_bytes,
                              "reason": "sent while no agent watched; split into whole windows, one of them "
                                        "carried at least the window's bytes"}}

    def _top_processes(self, crossing: BudgetCrossing) -> list[dict]:
        with self._traffic_lock:
            return self.traffic.top_processes(crossing.workload, crossing.destinations)

    def _on_anomaly(self, anomaly: Anomaly) -> None:
        d = anomaly.destination
        self._publish(Event(
            EventKind.ANOMALY, workload=anomaly.workload, bytes=d.bytes,
            destination=Destination(d.address, d.port, d.protocol, d.fqdn),
            detail={"rate_bytes_per_second": round(anomaly.rate), "baseline_bytes_per_second": round(anomaly.baseline),
                    "factor": anomaly.factor, "reason": "send rate above the policy's spike.factor times the "
                    "workload's own recent rate toward this destination"}))

    # --- hooks -------------------------------------------------------------------------

    def _run_hooks(self, event: Event) -> None:
        running = self.workloads.get(event.workload or "")
        if running is None:
            return
        hooks = running.spec.hooks
        if event.kind in _VIOLATION_KINDS and event.verdict == "deny":
            commands, hook = hooks.on_violation, "on_violation"
        elif event.kind in _BUDGET_KINDS:
            commands, hook = hooks.on_budget, "on_budget"
        else:
            return
        if commands:
            self._hooks.run(commands, workload=running.spec.name, hook=hook, event_json=event.to_json(),
                            cause_seq=event.seq)

    def _on_hook_finished(self, outcome: HookOutcome) -> None:
        """On a hook worker thread."""
        self._publish(Event(EventKind.HOOK_FINISHED, workload=outcome.workload, detail={
            "hook": outcome.hook, "command": outcome.command, "outcome": outcome.outcome,
            "exit_status": outcome.exit_status, "timed_out": outcome.timed_out, "seconds": outcome.seconds,
            "cause_seq": outcome.cause_seq, "error": outcome.error,
            "skipped_while_running": outcome.skipped_while_running}))

    # --- bookkeeping ----------------------------------------------------------------------

    def _report_lost_records(self) -> None:
        lost = self.kernel.lost_records()
        if lost > self._lost_reported:
            self._publish(Event(EventKind.EVENTS_LOST, bytes=None, detail={
                "count": lost - self._lost_reported, "total": lost, "where": "kernel ring buffer full"}))
            self._lost_reported = lost

    def _publish(self, event: Event) -> Event:
        with self._lock:  # hook workers publish too: one sequence, one order
            published = self.bus.publish(event)
            self._run_hooks(published)
            return published

