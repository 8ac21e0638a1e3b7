import os
from pathlib import Path

import pytest

from agentproc import AgentProcess, unique_name, warden_parent_removed_if_new
from agent import cgroups
from agent.lab.network import Lab
from pgserver import PostgresServer


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="kernel tests need root (CI runs them as root)")
        for item in items:
            if "root" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def warden_parent_cgroup_removed_if_ours():
    """A session that found no `egress-warden` parent cgroup leaves none, and fails on a test's
    leaked workload cgroup."""
    try:
        cgroups.warden_parent()
    except cgroups.CgroupError:
        yield
        return
    with warden_parent_removed_if_new():
        yield


@pytest.fixture
def lab():
    with Lab() as created:
        yield created


@pytest.fixture
def start_agent(tmp_path):
    """start_agent(policy_text, workloads=[names], agent_args=[more `warden agent` options],
    events_file=PATH, **AgentProcess.start options) -> a started AgentProcess, cleaned up after."""
    started: list[AgentProcess] = []

    def start(policy_text: str, workloads: list[str], agent_args: list[str] = (), events_file: Path | None = None,
              **options) -> AgentProcess:
        # A second agent of the same test gets a directory of its own (policy, events, state).
        home = tmp_path / f"agent-{len(started)}" if started else tmp_path
        home.mkdir(exist_ok=True)
        agent = AgentProcess(home, policy_text, workloads, events_file)
        agent.agent_args = list(agent_args)
        started.append(agent)
        agent.start(**options)
        return agent

    yield start
    for agent in started:
        agent.cleanup()


@pytest.fixture
def names():
    return [unique_name("wa"), unique_name("wb")]


@pytest.fixture(scope="session")
def postgres_server():
    """One throwaway PostgreSQL server for the session (initdb takes seconds); tests get their own database."""
    if os.geteuid() != 0:
        pytest.skip("the PostgreSQL server runs as the postgres user, which only root can switch to")
    with PostgresServer() as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server):
    """A URL to a fresh, empty database on the session's PostgreSQL server."""
    return postgres_server.new_database()
