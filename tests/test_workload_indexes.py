"""agent.kernel.indexes without a kernel: which kernel index a workload gets, across agents."""
from __future__ import annotations

import logging

from agent.kernel.indexes import INDEXES_FILE, WorkloadIndexes
from agent.policy.values import MAX_WORKLOADS


def number(state_dir, names: list[str]) -> dict[str, int]:
    """As an agent starting with a policy of `names` numbers them."""
    indexes, given = WorkloadIndexes(state_dir), {}
    for name in names:
        given[name] = indexes.index_for(name, set(given.values()))
    return given


def test_a_workload_keeps_its_index_whatever_the_order_of_the_policy(tmp_path):
    assert number(tmp_path, ["a", "b", "c"]) == {"a": 0, "b": 1, "c": 2}
    assert number(tmp_path, ["c", "b"]) == {"c": 2, "b": 1}
    assert number(tmp_path, ["b", "a", "c"]) == {"b": 1, "a": 0, "c": 2}


def test_a_new_workload_takes_an_index_no_workload_had(tmp_path):
    number(tmp_path, ["a", "b"])
    assert number(tmp_path, ["b", "new"]) == {"b": 1, "new": 2}  # not a's 0: a's counters are not its
    assert number(tmp_path, ["a", "new"]) == {"a": 0, "new": 2}


def test_when_every_index_was_had_the_first_free_is_taken_from_its_earlier_owner(tmp_path):
    number(tmp_path, [f"w{i}" for i in range(MAX_WORKLOADS)])
    assert number(tmp_path, ["w5", "late"]) == {"w5": 5, "late": 0}
    # w0's index is "late"'s now; w0 comes back as a new workload, with w1's.
    assert number(tmp_path, ["late", "w0"]) == {"late": 0, "w0": 1}


def test_an_unreadable_record_numbers_afresh_and_says_so(tmp_path, caplog):
    (tmp_path / INDEXES_FILE).write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert number(tmp_path, ["b", "a"]) == {"b": 0, "a": 1}
    assert f"{tmp_path / INDEXES_FILE}: cannot read which kernel index each workload had" in caplog.text
    assert number(tmp_path, ["a", "b"]) == {"a": 1, "b": 0}  # and keeps the new numbering from then on
