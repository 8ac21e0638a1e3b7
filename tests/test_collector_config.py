"""The collector's configuration file and flags: what it accepts, and what it refuses with which words."""
import pytest
from click.testing import CliRunner

from agent.cli import main
from agent.collector.config import ConfigError, load_config
from agent.collector.subscriber import Backoff


@pytest.fixture
def tls_files(tmp_path):
    for name in ("ca.pem", "c.pem", "c.key"):
        (tmp_path / name).write_text("x")
    (tmp_path / "c.key").chmod(0o600)
    return tmp_path


def config_file(tmp_path, text: str):
    path = tmp_path / "collector.yaml"
    path.write_text(text)
    return path


def test_a_full_configuration_loads(tmp_path, tls_files):
    config = load_config(config_file(tmp_path, f"""
store: postgresql://ew@db/events
tls: {{ca: {tls_files}/ca.pem, cert: {tls_files}/c.pem, key: {tls_files}/c.key}}
agents:
  - {{name: host-1, address: "10.0.0.1:7443"}}
  - {{name: host-2, address: "[fd00::2]:7443", server_name: host-2.internal}}
jsonl: {{path: /var/log/ew.jsonl, max_bytes: 10MiB, keep: 3}}
listen: null
""")).check()
    assert [a.address for a in config.agents] == ["10.0.0.1:7443", "[fd00::2]:7443"]
    assert config.agents[1].server_name == "host-2.internal"
    assert config.jsonl.max_bytes == 10 * 2**20 and config.jsonl.keep == 3
    assert config.listen is None and config.store == "postgresql://ew@db/events"


@pytest.mark.parametrize("text, message", [
    ("agents: [{name: a, address: nohost}]", "agents[0].address: 'nohost': expected HOST:PORT"),
    ("agents: [{name: 'a b', address: 'h:1'}]", "agents[0].name: 'a b': letters, digits"),
    ("agents: [{name: a, adress: 'h:1'}]", "unknown key(s) adress"),
    ("stor: x.db", "unknown key(s) stor"),
    ("jsonl: {path: x, max_bytes: lots}", "jsonl.max_bytes: 'lots' is not a size"),
    ("jsonl: {path: x, keep: 0}", "jsonl.keep: expected a whole number >= 1"),
    ("agents: [", "not valid YAML"),
])
def test_mistakes_are_named_with_the_file_and_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as refused:
        load_config(config_file(tmp_path, text))
    assert str(refused.value).startswith(str(tmp_path / "collector.yaml"))
    assert message in str(refused.value)


def test_what_a_collector_cannot_run_without(tmp_path, tls_files):
    no_tls = load_config(config_file(tmp_path, "agents: [{name: a, address: 'h:1'}]"))
    with pytest.raises(ConfigError, match="mutual TLS only; give tls.ca"):
        no_tls.check()
    twice = load_config(config_file(tmp_path, "agents: [{name: a, address: 'h:1'}, {name: a, address: 'h:2'}]"))
    with pytest.raises(ConfigError, match="name.s. a given twice"):
        twice.check()
    missing = load_config(config_file(tmp_path, "agents: [{name: a, address: 'h:1'}]\n"
                                                f"tls: {{ca: {tmp_path}/nope.pem, cert: x, key: y}}"))
    with pytest.raises(ConfigError, match="tls.ca: .*nope.pem: no such file"):
        missing.check()


def test_a_private_key_others_can_read_is_refused(tmp_path, tls_files):
    """Whoever reads the collector's key can pose as it to every agent and read every event."""
    (tls_files / "c.key").chmod(0o640)
    config = load_config(config_file(tmp_path, "agents: [{name: a, address: 'h:1'}]\n"
                                              f"tls: {{ca: {tls_files}/ca.pem, cert: {tls_files}/c.pem, key: {tls_files}/c.key}}"))
    with pytest.raises(ConfigError) as refused:
        config.check()
    assert str(refused.value) == (f"{tmp_path / 'collector.yaml'}: tls.key: {tls_files}/c.key can be read by "
                                  f"group/others (mode 0640): run chmod 600 {tls_files}/c.key")


def test_flags_add_agents_and_override_the_file(tmp_path, tls_files):
    path = config_file(tmp_path, "agents: [{name: a, address: 'h:1'}]\nstore: /nonexistent-dir/x.db\n")
    result = CliRunner().invoke(main, ["collector", "--config", str(path), "--agent", "b=h:2", "--agent", "c",
                                       "--tls-ca", str(tls_files / "ca.pem")])
    assert result.exit_code == 1
    assert "--agent 'c': expected NAME=HOST:PORT" in result.output
    result = CliRunner().invoke(main, ["collector", "--config", str(path), "--tls-ca", str(tls_files / "ca.pem")])
    assert result.exit_code == 1 and "--tls-ca, --tls-cert and --tls-key go together" in result.output


def test_backoff_grows_to_its_cap_with_jitter_and_resets():
    backoff = Backoff(first=1.0, cap=8.0)
    delays = [backoff.next() for _ in range(6)]
    for delay, ceiling in zip(delays, [1, 2, 4, 8, 8, 8]):
        assert ceiling / 2 <= delay <= ceiling
    assert len({round(d, 6) for d in delays[3:]}) > 1  # jitter: not all the same
    backoff.reset()
    assert backoff.next() <= 1.0
