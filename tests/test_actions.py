"""Actions on a cgroup that will not comply. The kernel has no way to make one on demand (a
process stuck in uninterruptible sleep on a hung mount), so a directory laid out as a cgroup
whose one process never freezes or leaves stands in for it: the one stand-in in these tests."""
from pathlib import Path

import pytest

from agent import actions


@pytest.fixture
def stuck(tmp_path) -> Path:
    (tmp_path / "cgroup.procs").write_text("4242\n")
    (tmp_path / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    (tmp_path / "cgroup.kill").write_text("")
    return tmp_path


def test_a_cgroup_that_does_not_freeze_in_time_is_reported_not_raised(stuck):
    outcome = actions.freeze([stuck])
    assert outcome["frozen_pids"] == [4242]
    assert outcome["unfinished"] == [f"timed out after 5.0s waiting for {stuck} to freeze"]
    assert (stuck / "cgroup.freeze").read_text() == "1"


def test_a_cgroup_that_does_not_empty_in_time_is_reported_not_raised(stuck):
    outcome = actions.kill([stuck])
    assert outcome["pids"] == [4242] and outcome["seconds"] >= 5
    assert outcome["unfinished"] == [f"timed out after 5.0s waiting for {stuck} to empty"]
    assert (stuck / "cgroup.kill").read_text() == "1"
