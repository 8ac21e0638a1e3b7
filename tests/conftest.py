import os
import subprocess

import pytest

from agentproc import AgentProcess, unique_name
from agent.lab.network import Lab


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="kernel tests need root (CI runs them as root)")
        for item in items:
            if "root" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def lab():
    with Lab() as created:
        yield created


@pytest.fixture
def start_agent(tmp_path):
    """start_agent(policy_text, workloads=[names], agent_args=[more `warden agent` options],
    **AgentProcess.start options) -> a started AgentProcess, cleaned up after."""
    started: list[AgentProcess] = []

    def start(policy_text: str, workloads: list[str], agent_args: list[str] = (), **options) -> AgentProcess:
        agent = AgentProcess(tmp_path, policy_text, workloads)
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
