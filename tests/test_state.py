"""agent.state: files of the state directory are written whole, for the agent's eyes only."""
from __future__ import annotations

import os
import stat

from agent.state import replace_file


def test_a_state_file_is_the_agents_alone_whatever_the_umask_or_a_leftover(tmp_path):
    path = tmp_path / "quarantined.json"
    (tmp_path / "quarantined.json.tmp").write_text("a crash left this")
    (tmp_path / "quarantined.json.tmp").chmod(0o666)
    previous = os.umask(0)
    try:
        replace_file(path, '{"workloads": {}}')
    finally:
        os.umask(previous)
    assert path.read_text() == '{"workloads": {}}' and not (tmp_path / "quarantined.json.tmp").exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
