"""`warden demo`: a compromised LLM router stopped in the kernel, in a minute, on this host.

It builds two throwaway network namespaces (agent.lab.network): the router's, and a small
internet with a fake provider, a DNS server and an attacker host. A real agent guards the
router; its events stream live over the agent's own API while the router first calls its
provider by name and then tries to send a stolen key out (a direct connection, a DNS
tunnel, a child process). First every attempt is refused; then the policy's violation
action is switched to kill or quarantine and the router tries again. Everything it built
is removed at the end, also on Ctrl-C."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import grpc

from agent import cgroups
from agent.kernel.loader import detach_all, remove_pins
from agent.lab.dns_server import DnsServer
from agent.lab.network import Lab

PROVIDER_NAME = "api.provider.test"
ATTACKER_ZONE = "exfil.attacker.test"
RESOLVER = "198.18.5.53"
SHOWN_KINDS = ["policy_loaded", "egress_denied", "egress_observed", "dns_denied", "dns_allowed",
               "action_kill", "action_quarantine", "action_release", "cgroup_escape", "socket_destroyed"]

Echo = Callable[[str], None]


def policy_text(workload: str, on_violation: str) -> str:
    return f"""version: 1
workloads:
  - name: {workload}
    mode: enforce
    on_violation: {on_violation}
    allow:
      - fqdn: {PROVIDER_NAME}
        ports: [443]
        protocol: tcp
    dns:
      upstream: ["{RESOLVER}"]
"""


class Demo:
    def __init__(self, action: str, echo: Echo) -> None:
        self.action = action
        self._echo_lock = threading.Lock()
        self._echo = echo
        self.workload = f"demo-{secrets.token_hex(3)}"
        self.tmp = Path(tempfile.mkdtemp(prefix="warden-demo-"))
        self.policy = self.tmp / "policy.yaml"
        self.socket = self.tmp / "agent.sock"
        # Its own maps: an agent guarding this host keeps the default pin directory.
        self.pin_dir = Path("/sys/fs/bpf") / f"ew-{self.workload}"
        self.agent: subprocess.Popen | None = None
        self.lab: Lab | None = None
        self._acted = threading.Event()  # the agent killed or quarantined the router
        self._cleaning = threading.Event()

    def say(self, source: str, text: str) -> None:
        with self._echo_lock:
            self._echo(f"{source:<7}| {text}")

    # --- the story -----------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._build_network()
            self._start_agent("deny")
            threading.Thread(target=self._stream_events, daemon=True).start()
            self.say("demo", "1. on_violation: deny. The router calls its provider, then tries to exfiltrate:")
            self._run_router()
            time.sleep(0.5)
            self.say("demo", f"2. on_violation: {self.action}. Policy reloaded; the router tries again:")
            self._write_policy(self.action)
            self.agent.send_signal(signal.SIGHUP)
            time.sleep(0.5)
            self._run_router()
            time.sleep(0.5)
            self._summarise()
        finally:
            self._clean_up()

    def _build_network(self) -> None:
        self.lab = Lab(name_prefix="ewdemo")
        self.say("demo", f"network namespaces {self.lab.router_netns} (router) and {self.lab.net_netns} "
                         f"(provider {Lab.PROVIDER4}, attacker {Lab.ATTACKER4}, DNS {RESOLVER}); "
                         f"files in {self.tmp}")
        self.provider = self.lab.serve(Lab.PROVIDER4, 443, reply=True)
        self.attacker = self.lab.serve(Lab.ATTACKER4, 443)
        self.dns = DnsServer(self.lab, RESOLVER, self.tmp, hosts={PROVIDER_NAME: Lab.PROVIDER4})

    def _write_policy(self, on_violation: str) -> None:
        staged = self.policy.with_suffix(".new")
        staged.write_text(policy_text(self.workload, on_violation))
        os.chmod(staged, 0o600)
        os.replace(staged, self.policy)

    def _start_agent(self, on_violation: str) -> None:
        self._write_policy(on_violation)
        self.say("demo", f"starting the agent for workload {self.workload} ...")
        self.agent = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "agent", "--policy", str(self.policy),
             "--state-dir", str(self.tmp / "state"), "--socket", str(self.socket),
             "--pin-dir", str(self.pin_dir), "--metrics-listen", "off",
             "--events-file", str(self.tmp / "events.jsonl"), "--agent-id", "demo"],
            stdout=subprocess.DEVNULL, stderr=open(self.tmp / "agent.log", "w"))
        deadline = time.monotonic() + 60
        while not self.socket.is_socket():
            if self.agent.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the agent did not start:\n{(self.tmp / 'agent.log').read_text()}")
            time.sleep(0.05)

    def _stream_events(self) -> None:
        from agent.api.gen.egress_warden.v1 import agent_pb2 as pb
        from agent.api.gen.egress_warden.v1 import agent_pb2_grpc as pb_grpc
        from agent.cli.events_command import human_line

        with grpc.insecure_channel(f"unix:{self.socket}") as channel:
            try:
                for event in pb_grpc.AgentStub(channel).WatchEvents(
                        pb.WatchEventsRequest(follow=True, kinds=SHOWN_KINDS)):
                    self.say("event", human_line(event))
                    if event.kind == "action_quarantine":
                        self._show_evidence(json.loads(event.detail_json))
                    if event.kind in ("action_kill", "action_quarantine"):
                        self._acted.set()
            except grpc.RpcError:
                return  # the agent stopped: the demo is ending

    def _show_evidence(self, detail: dict) -> None:
        for item in detail.get("evidence", []):
            self.say("event", f"  evidence pid {item.get('pid')}: {item.get('exe')} sha256 "
                              f"{str(item.get('exe_sha256'))[:16]}..., {len(item.get('sockets', []))} socket(s), "
                              f"{len(item.get('environment_names', []))} environment variable names")

    def _run_router(self) -> None:
        """Run the router to its end, or until the agent acted on it (a quarantined router
        is frozen: it never ends by itself)."""
        # Its own /etc/resolv.conf names the lab's resolver: the host's names a real one,
        # which the demo must never ask.
        resolv = self.tmp / "resolv.conf"
        resolv.write_text(f"nameserver {RESOLVER}\n")
        router = [sys.executable, "-m", "agent.lab.demo_router", PROVIDER_NAME, Lab.ATTACKER4, ATTACKER_ZONE]
        argv = ["unshare", "-m", "sh", "-c", f'mount --bind {resolv} /etc/resolv.conf && exec "$@"', "sh",
                sys.executable, "-m", "agent.cli", "run", self.workload, "--", *router]
        self._acted.clear()
        process = self.lab.run_in_router(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        reader = threading.Thread(target=self._echo_router, args=(process,), daemon=True)
        reader.start()
        while process.poll() is None and not self._acted.wait(0.05):
            pass
        if self._acted.is_set():
            time.sleep(0.5)  # let the action's effect show: killed, or frozen
        if process.poll() is None:
            self.say("router", "-- frozen: quarantined, its processes kept for inspection")
        elif process.returncode < 0:
            self.say("router", f"-- ended by {signal.Signals(-process.returncode).name}")

    def _echo_router(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            if self._cleaning.is_set():
                return  # a frozen router's last words, as it is thawed to be killed
            self.say("router", line.rstrip())

    def _summarise(self) -> None:
        tunnelled = [n for n in self.dns.queried_names() if n.endswith(ATTACKER_ZONE)]
        self.say("demo", f"provider received {self.provider.received_bytes()} bytes; attacker received "
                         f"{self.attacker.received_bytes()} bytes; DNS queries under {ATTACKER_ZONE} that "
                         f"reached any server: {len(tunnelled)}")

    def _clean_up(self) -> None:
        self._cleaning.set()
        if self.agent is not None and self.agent.poll() is None:
            self.agent.terminate()
            try:
                self.agent.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.agent.kill()
                self.agent.wait()
                log_tail = (self.tmp / "agent.log").read_text().splitlines()[-5:]
                self.say("demo", "the agent did not stop within 15 s of SIGTERM: killed it; its log ended:")
                for line in log_tail:
                    self.say("agent", line)
        cgroup = cgroups.warden_parent() / self.workload
        if cgroup.exists():
            detach_all(cgroup)  # the agent leaves them attached on purpose (fail closed)
            cgroups.remove(cgroup)
        remove_pins(self.pin_dir)
        if self.lab is not None:
            self.lab.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.say("demo", "cleaned up: namespaces, cgroup, programs, agent and files removed")
