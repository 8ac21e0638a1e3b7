"""A real DNS server (dnsmasq from Debian's dnsmasq-base) inside a Lab's NET namespace, on an
address the test gives NET, serving the test's zone from a hosts file and --cname lines.
Its query log tells which names reached it."""
from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

from agent.lab.network import Lab


class DnsServer:
    def __init__(self, lab: Lab, ip: str, workdir: Path, *, hosts: dict[str, str | list[str]], cnames: dict[str, str] = {},
                 ttl: int = 60, cache: int = 0, log_queries: bool = True) -> None:
        dnsmasq = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
        self.ip = ip
        self.hosts_file = workdir / f"hosts-{ip}"
        self.log_file = workdir / f"dnsmasq-{ip}.log"
        self.write_hosts(hosts)
        subprocess.run(["ip", "-n", lab.net_netns, "addr", "add", f"{ip}/32", "dev", "lo"], check=True)
        argv = [dnsmasq, "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
                "--bind-interfaces", f"--listen-address={ip}", "--port=53", f"--addn-hosts={self.hosts_file}",
                f"--local-ttl={ttl}", f"--cache-size={cache}", f"--log-facility={self.log_file}",
                "--pid-file=", "--user=root", "--group=root", *(["--log-queries"] if log_queries else [])]
        argv += [f"--cname={alias},{target}" for alias, target in cnames.items()]
        self.process = lab.run_in_net(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._wait_until_listening()

    def write_hosts(self, hosts: dict[str, str | list[str]]) -> None:
        """name -> address, or a list of addresses (one A record each)."""
        lines = [f"{ip} {name}\n" for name, ips in hosts.items() for ip in ([ips] if isinstance(ips, str) else ips)]
        self.hosts_file.write_text("".join(lines))

    def change_hosts(self, hosts: dict[str, str]) -> None:
        """New addresses for the zone; dnsmasq reads its hosts file again on SIGHUP."""
        self.write_hosts(hosts)
        before = self.log_file.read_text().count("read ")
        self.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while self.log_file.read_text().count("read ") <= before and time.monotonic() < deadline:
            time.sleep(0.01)

    def queried_names(self) -> list[str]:
        """Every name a query asked this server for (from its log)."""
        if not self.log_file.exists():
            return []
        return [line.split("]: ", 1)[1].split()[1] for line in self.log_file.read_text().splitlines()
                if "]: query[" in line]

    def _wait_until_listening(self) -> None:
        deadline = time.monotonic() + 5
        while "started" not in (self.log_file.read_text() if self.log_file.exists() else ""):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dnsmasq did not start: {self.process.stderr.read().decode()}")
            time.sleep(0.01)
