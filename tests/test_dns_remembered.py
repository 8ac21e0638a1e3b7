"""The DNS answers kept for the next agent: what a file carries across a restart or a reboot."""
import json
import logging
import time

from agent.dns import remembered
from agent.dns.remembered import ANSWERS_FILE, RememberedAnswers


def test_answers_come_back_once_with_their_expiry_by_the_wall_clock(tmp_path):
    now = time.monotonic_ns()
    earlier = RememberedAnswers(tmp_path)
    assert earlier.note("wl", "eastus.azure.test", "198.18.1.10", now + 60 * 10**9)
    assert not earlier.note("wl", "eastus.azure.test", "198.18.1.10", now + 90 * 10**9)  # later expiry, same address
    earlier.note("wl", "gone.azure.test", "198.18.1.11", now - 10**9)  # expired, kept while a socket uses it
    earlier.note("other", "api.provider.test", "198.18.1.12", now + 60 * 10**9)
    earlier.save_if_changed()

    later = RememberedAnswers(tmp_path)
    mine = {(name, address): expires for name, address, expires in later.take_earlier("wl")}
    assert abs(mine[("eastus.azure.test", "198.18.1.10")] - (now + 90 * 10**9)) < 50 * 10**6
    assert 0 < mine[("gone.azure.test", "198.18.1.11")] <= time.monotonic_ns()
    assert later.take_earlier("wl") == []
    assert [a for _, a, _ in later.take_earlier("other")] == ["198.18.1.12"]


def test_an_expiry_from_before_a_reboot_never_becomes_a_static_entry(tmp_path):
    (tmp_path / ANSWERS_FILE).write_text(json.dumps({"answers": [["wl", "a.test", "198.18.1.10", 1.0]]}))
    assert RememberedAnswers(tmp_path).take_earlier("wl") == [("a.test", "198.18.1.10", 1)]


def test_expired_answers_go_once_the_kernel_no_longer_allows_their_address(tmp_path):
    answers = RememberedAnswers(tmp_path)
    now = time.monotonic_ns()
    answers.note("wl", "a.test", "198.18.1.10", now - 1)
    answers.note("wl", "b.test", "198.18.1.11", now - 1)
    answers.forget("wl", now, still_allowed=lambda: {"198.18.1.11"})
    answers.save_if_changed()
    assert [row[2] for row in json.loads((tmp_path / ANSWERS_FILE).read_text())["answers"]] == ["198.18.1.11"]


def test_an_unreadable_file_is_reported_and_the_agent_starts_without_it(tmp_path, caplog):
    (tmp_path / ANSWERS_FILE).write_text('{"answers": [["wl", "a.test"]]}')
    with caplog.at_level(logging.WARNING):
        assert RememberedAnswers(tmp_path).take_earlier("wl") == []
    assert f"{tmp_path / ANSWERS_FILE}: cannot read the DNS answers" in caplog.text


def test_many_names_of_one_address_keep_one_answer_and_addresses_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(remembered, "MAX_ANSWERS", 3)
    answers = RememberedAnswers(tmp_path)
    later = time.monotonic_ns() + 60 * 10**9
    for i in range(100):  # random labels under a wildcard whose zone answers anything
        answers.note("wl", f"r{i}.azure.test", "198.18.1.10", later)
    answers.save_if_changed()
    assert [row[1:3] for row in json.loads((tmp_path / ANSWERS_FILE).read_text())["answers"]] == [
        ["r99.azure.test", "198.18.1.10"]]
    for i in range(5):
        answers.note("wl", "cdn.azure.test", f"198.18.2.{i}", later)
    answers.save_if_changed()
    rows = json.loads((tmp_path / ANSWERS_FILE).read_text())["answers"]
    assert [(name, address) for _, name, address, _ in rows] == [
        ("cdn.azure.test", "198.18.2.2"), ("cdn.azure.test", "198.18.2.3"), ("cdn.azure.test", "198.18.2.4")]


def test_a_wall_clock_stepped_back_never_lengthens_a_restored_answer(tmp_path, monkeypatch):
    earlier = RememberedAnswers(tmp_path)
    earlier.note("wl", "a.test", "198.18.1.10", time.monotonic_ns() + 60 * 10**9)
    earlier.save_if_changed()

    wall_clock = time.time
    monkeypatch.setattr(time, "time", lambda: wall_clock() - 86400)  # set back a day, between the agents
    [(_, _, expires)] = RememberedAnswers(tmp_path).take_earlier("wl")
    assert abs(expires - (time.monotonic_ns() + 60 * 10**9)) < 10**9  # the minute it had left, not a day more
