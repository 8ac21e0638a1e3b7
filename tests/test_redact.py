"""agent.events.redact: what looks like a secret never leaves the host in a command line."""
from __future__ import annotations

import pytest

from agent.events.redact import MAX_CMDLINE_CHARS, REDACTED, publishable_cmdline, redact_cmdline


@pytest.mark.parametrize("argv, expected", [
    (["litellm", "--api_key", "hunter2", "--port", "4000"], ["litellm", "--api_key", REDACTED, "--port", "4000"]),
    (["litellm", "--master-key=hunter2"], ["litellm", f"--master-key={REDACTED}"]),
    (["router", "--token", "--verbose"], ["router", "--token", "--verbose"]),  # a flag, no value: nothing hidden
    (["env", "OPENAI_API_KEY=hunter2", "AWS_SECRET_ACCESS_KEY=abc", "PATH=/usr/bin", "litellm"],
     ["env", f"OPENAI_API_KEY={REDACTED}", f"AWS_SECRET_ACCESS_KEY={REDACTED}", "PATH=/usr/bin", "litellm"]),
    (["litellm", "--database_url", "postgres://llm:hunter2@db:5432/litellm"],
     ["litellm", "--database_url", f"postgres://llm:{REDACTED}@db:5432/litellm"]),
    (["python", "-c", "print(1)", "sk-ant-api03-abcdefghijklmnop", "x=AKIAIOSFODNN7EXAMPLE"],
     ["python", "-c", "print(1)", REDACTED, f"x={REDACTED}"]),
    (["curl", "-H", "Authorization: Bearer eyJhbGciOi.payload.sig", "https://api.test"],
     ["curl", "-H", f"Authorization: Bearer {REDACTED}", "https://api.test"]),
    # inside one argument: a shell line, a --flag=NAME=value, a query string, headers
    (["sh", "-c", "litellm --api_key hunter2 --master_key 'hunter3' --port 4000"],
     ["sh", "-c", f"litellm --api_key {REDACTED} --master_key '{REDACTED}' --port 4000"]),
    (["docker", "run", "--env=AZURE_API_KEY=0123abcd", "--set=llm.api_key=abc123", "img"],
     ["docker", "run", f"--env=AZURE_API_KEY={REDACTED}", f"--set=llm.api_key={REDACTED}", "img"]),
    (["router", "--db", "postgresql://db/x?user=u&password=hunter2&sslmode=require", "--db-pass", "hunter2"],
     ["router", "--db", f"postgresql://db/x?user=u&password={REDACTED}&sslmode=require", "--db-pass", REDACTED]),
    (["curl", "-H", "Authorization: Basic dXNlcjpwYXNz", "-H", "X-Api-Key: hunter2"],
     ["curl", "-H", f"Authorization: Basic {REDACTED}", "-H", f"X-Api-Key: {REDACTED}"]),
    (["router", "postgresql://llm:hunt@r2@db/x"], ["router", f"postgresql://llm:{REDACTED}@db/x"]),
    (["litellm", "--config", "/etc/litellm/config.yaml", "--num_workers", "4"],
     ["litellm", "--config", "/etc/litellm/config.yaml", "--num_workers", "4"]),
])
def test_secrets_in_command_lines_are_redacted(argv, expected):
    assert redact_cmdline(argv) == expected


def test_a_long_command_line_is_cut_after_its_secrets_are_taken_out():
    key = "sk-" + "a" * 40
    argv = ["router", "x" * (MAX_CMDLINE_CHARS - 10), key, "y" * 100]  # the cut falls inside the key
    *kept, cut = publishable_cmdline(argv)
    assert kept == ["router", "x" * (MAX_CMDLINE_CHARS - 10), REDACTED[:4]]
    assert cut == f"<{len(REDACTED) - 4 + 100} more characters not kept>"
    assert publishable_cmdline(["router", "--port", "4000"]) == ["router", "--port", "4000"]
