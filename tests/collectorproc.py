"""A real `warden collector` process for tests, configured by a YAML file it writes."""
from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import yaml

from agentproc import REPO, WARDEN
from apiclient import free_port
from childproc import ChildProcess


class CollectorProcess(ChildProcess):
    stop_timeout = 30.0

    def __init__(self, home: Path, store: str, agents: dict[str, int], tls: dict[str, Path],
                 jsonl: Path | None = None) -> None:
        """`agents` maps a name to the agent's TLS port on 127.0.0.1."""
        home.mkdir(parents=True, exist_ok=True)
        self.home = home
        self.store = store
        self.port = free_port()
        self.log = home / "collector.log"
        config = {"store": store, "listen": f"127.0.0.1:{self.port}",
                  "tls": {key: str(path) for key, path in tls.items()},
                  "agents": [{"name": name, "address": f"127.0.0.1:{port}"} for name, port in agents.items()]}
        if jsonl is not None:
            config["jsonl"] = {"path": str(jsonl), "max_bytes": "200kB", "keep": 1000}
        self.config = home / "collector.yaml"
        self.config.write_text(yaml.safe_dump(config))
        self.process: subprocess.Popen | None = None

    def start(self) -> "CollectorProcess":
        self.process = subprocess.Popen([*WARDEN, "collector", "--config", str(self.config)], cwd=REPO,
                                        stdout=subprocess.DEVNULL, stderr=open(self.log, "a"))
        self.wait_until(lambda status: True, timeout=30, what="its status endpoint")
        return self

    def status(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/status", timeout=5) as answer:
                return json.load(answer)
        except OSError:
            return None

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as answer:
            return answer.read().decode()

    def wait_until(self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        status = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"collector exited with {self.process.returncode}:\n{self.log.read_text()}")
            status = self.status()
            if status is not None and predicate(status):
                return status
            time.sleep(0.1)
        raise AssertionError(f"collector: no {what} within {timeout}s; status {status}\nlog:\n{self.log.read_text()}")
