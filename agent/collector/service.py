"""The collector: one subscriber per agent into one store, optional JSON lines, and its
own health at /metrics (Prometheus text format) and /status (JSON)."""
from __future__ import annotations

import collections
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc

from agent.collector.config import CollectorConfig
from agent.collector.jsonl import JsonLinesOutput
from agent.collector.rows import EventRow
from agent.collector.store import EventStore, open_store
from agent.collector.subscriber import AgentIds, AgentSubscriber

log = logging.getLogger("egress_warden.collector")

_RATE_WINDOW = 10.0  # seconds over which events/s is measured


class RateMeter:
    """Events per second over the last few seconds, from (time, total) samples."""

    def __init__(self) -> None:
        self.total = 0
        self._samples: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()

    def add(self, count: int) -> None:
        with self._lock:
            self.total += count
            self._sample(time.monotonic())

    def _sample(self, now: float) -> None:
        self._samples.append((now, self.total))
        while len(self._samples) > 2 and now - self._samples[1][0] > _RATE_WINDOW:
            self._samples.popleft()

    def per_second(self) -> float:
        with self._lock:
            now = time.monotonic()
            self._sample(now)
            first_time, first_total = self._samples[0]
            return (self.total - first_total) / max(now - first_time, 1.0)


class Collector:
    def __init__(self, config: CollectorConfig) -> None:
        self.config = config.check()
        self.store: EventStore = open_store(config.store)
        self.output = None if config.jsonl is None else \
            JsonLinesOutput(config.jsonl.path, config.jsonl.max_bytes, config.jsonl.keep)
        self.rate = RateMeter()
        tls = config.tls
        credentials = grpc.ssl_channel_credentials(
            root_certificates=tls.ca.read_bytes(), private_key=tls.key.read_bytes(),
            certificate_chain=tls.cert.read_bytes())
        agent_ids = AgentIds()
        self.subscribers = [AgentSubscriber(target, self.store, tls, credentials, agent_ids, self._write_lines,
                                            self.rate.add) for target in config.agents]
        self._http: ThreadingHTTPServer | None = None

    def _write_lines(self, rows: list[EventRow]) -> None:
        """JSON lines are written before the store commits: a collector killed in between
        writes that batch again after its restart (at least once), never loses it."""
        if self.output is not None:
            self.output.write(rows)

    def start(self) -> None:
        if self.config.listen:
            self._http = _health_server(self.config.listen, self)
            threading.Thread(target=self._http.serve_forever, name="collector-health", daemon=True).start()
        where = "" if self._http is None else "; status at http://%s:%d/status" % self._http.server_address[:2]
        log.info("collector: storing into %s from %d agent(s)%s", self.store.description, len(self.subscribers), where)
        for subscriber in self.subscribers:
            subscriber.start()

    def stop(self) -> None:
        for subscriber in self.subscribers:
            subscriber.stop()
        for subscriber in self.subscribers:
            subscriber.join(timeout=15)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self.output is not None:
            self.output.close()
        self.store.close()
        log.info("collector: stopped; %d event(s) stored since it started", self.rate.total)

    def status(self) -> dict:
        return {"store": self.store.description, "events_per_second": round(self.rate.per_second(), 1),
                "events_stored": self.rate.total,
                "store_errors": sum(s.state.store_errors for s in self.subscribers),
                "agents": [s.state.as_dict() for s in self.subscribers]}


def metrics_text(status: dict) -> str:
    """The status in Prometheus' text exposition format."""
    lines = [
        "# HELP warden_collector_events_stored_total Events this collector stored (new rows).",
        "# TYPE warden_collector_events_stored_total counter",
        *(f'warden_collector_events_stored_total{{agent="{a["name"]}"}} {a["events_stored"]}' for a in status["agents"]),
        "# HELP warden_collector_events_duplicate_total Events received that the store already held.",
        "# TYPE warden_collector_events_duplicate_total counter",
        *(f'warden_collector_events_duplicate_total{{agent="{a["name"]}"}} {a["events_duplicate"]}'
          for a in status["agents"]),
        "# HELP warden_collector_agent_connected 1 while the agent's event stream is open.",
        "# TYPE warden_collector_agent_connected gauge",
        *(f'warden_collector_agent_connected{{agent="{a["name"]}"}} {int(a["connected"])}' for a in status["agents"]),
        "# HELP warden_collector_agent_lag_seq The agent's newest seq minus the newest stored.",
        "# TYPE warden_collector_agent_lag_seq gauge",
        *(f'warden_collector_agent_lag_seq{{agent="{a["name"]}"}} {a["lag"]}' for a in status["agents"]),
        "# HELP warden_collector_agent_sessions_total Sessions (connections) made to the agent.",
        "# TYPE warden_collector_agent_sessions_total counter",
        *(f'warden_collector_agent_sessions_total{{agent="{a["name"]}"}} {a["sessions"]}' for a in status["agents"]),
        "# HELP warden_collector_store_errors_total Store failures (each ends a session; it resumes from the store).",
        "# TYPE warden_collector_store_errors_total counter",
        f"warden_collector_store_errors_total {status['store_errors']}",
        "# HELP warden_collector_events_per_second Events stored per second over the last 10 s.",
        "# TYPE warden_collector_events_per_second gauge",
        f"warden_collector_events_per_second {status['events_per_second']}",
    ]
    return "\n".join(lines) + "\n"


def _health_server(listen: str, collector: Collector) -> ThreadingHTTPServer:
    host, _, port = listen.rpartition(":")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
            status = collector.status()
            if self.path == "/metrics":
                body, kind = metrics_text(status).encode(), "text/plain; version=0.0.4"
            elif self.path == "/status":
                body, kind = json.dumps(status).encode(), "application/json"
            else:
                self.send_error(404, "try /metrics or /status")
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_) -> None:
            pass

    try:
        return ThreadingHTTPServer((host.strip("[]"), int(port)), Handler)
    except OSError as e:
        raise OSError(f"status endpoint {listen}: {e.strerror}") from None
