"""The collector's JSON lines after a collector was killed in the middle of a write."""
import json
import logging

import pytest

from agent.collector.jsonl import JsonLinesOutput
from agent.collector.rows import row_from_event


def row(seq: int):
    return row_from_event({"agent": "agent-a", "seq": seq, "kind": "egress_denied", "time": 1.0})


def line(seq: int) -> bytes:
    return row(seq).body.encode() + b"\n"


def reopened_then_written(path, caplog) -> bytes:
    with caplog.at_level(logging.WARNING, logger="egress_warden.collector"):
        output = JsonLinesOutput(str(path))
        output.write([row(3)])
        output.close()
    return path.read_bytes()


@pytest.mark.parametrize("torn", [line(2)[:37], b"x" * 200_000], ids=["part-of-a-line", "longer-than-a-read"])
def test_a_line_cut_off_by_a_kill_is_dropped_before_the_next_write(tmp_path, caplog, torn):
    path = tmp_path / "events.jsonl"
    path.write_bytes(line(1) + torn)
    assert reopened_then_written(path, caplog) == line(1) + line(3)
    assert [json.loads(text)["seq"] for text in path.read_text().splitlines()] == [1, 3]
    assert f"{len(torn)} bytes of a line cut off" in caplog.text


def test_a_file_of_only_a_torn_line_starts_afresh(tmp_path, caplog):
    path = tmp_path / "events.jsonl"
    path.write_bytes(line(1)[:20])
    assert reopened_then_written(path, caplog) == line(3)


def test_whole_lines_are_kept_and_nothing_is_said(tmp_path, caplog):
    path = tmp_path / "events.jsonl"
    path.write_bytes(line(1) + line(2))
    assert reopened_then_written(path, caplog) == line(1) + line(2) + line(3)
    assert "cut off" not in caplog.text
