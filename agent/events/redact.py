"""Secrets in command lines, taken out before a command line is published.

A command line goes into the events that name its process: to the events file, the spool and
every collector, far beyond the host, where /proc shows it to local users only. Routers are
often given their keys on the command line (`litellm --api_key sk-...`, a database URL with
its password, `env OPENAI_API_KEY=...`), so what looks like a secret becomes REDACTED: the
value of an option or assignment whose name says key, token, secret, pass(word), credential or
auth, also inside one argument (a shell line, `--env=NAME=value`, a query string, a header); a
URL's password; a bearer or basic credential; and anything in the shape of a well-known
provider or cloud key, wherever it appears. Too much is taken rather than too little: an investigator
still sees which option held what."""
from __future__ import annotations

import re

REDACTED = "<redacted>"
# An argv may hold megabytes (up to 6 MiB on Linux); every event naming the process carries it
# to the spool, the events file and each collector, and one too large for a gRPC message would
# stop every subscriber at its seq. What routers are started with fits easily.
MAX_CMDLINE_CHARS = 4096

_SECRET_WORD = r"[\w.-]*(?:key|token|secret|pass|pwd|credential|auth)[\w.-]*"
_SECRET_NAME = re.compile(rf"^(-{{1,2}})?{_SECRET_WORD}$", re.IGNORECASE)
_IN_TEXT = [
    # Provider and cloud key shapes: OpenAI/Anthropic, AWS access keys, Google, GitHub, Slack,
    # Hugging Face.
    (re.compile(r"\b(sk-[A-Za-z0-9_-]{16,}|A[KS]IA[0-9A-Z]{16}|AIza[0-9A-Za-z_-]{35}|gh[pousr]_[A-Za-z0-9]{30,}"
                r"|xox[abprs]-[A-Za-z0-9-]{10,}|hf_[A-Za-z0-9]{30,})"), REDACTED),
    (re.compile(r"(://[^/\s:@]*:)[^/\s]+(@)"), rf"\g<1>{REDACTED}\g<2>"),  # scheme://user:PASSWORD@ (it may hold @)
    (re.compile(r"(\b(?:bearer|basic)\s+)\S+", re.IGNORECASE), rf"\g<1>{REDACTED}"),
    # Inside one argument: NAME=value (`--env=API_KEY=...`, `?password=...`, a shell line), a
    # header `X-Api-Key: value`, and `--option value` in a line a shell will split.
    (re.compile(rf"(\b{_SECRET_WORD}=)[^\s&;,'\"]+", re.IGNORECASE), rf"\g<1>{REDACTED}"),
    (re.compile(rf"^({_SECRET_WORD}:\s*)(?!(?:bearer|basic)\s)\S+", re.IGNORECASE), rf"\g<1>{REDACTED}"),
    (re.compile(rf"((?:^|\s)-{{1,2}}{_SECRET_WORD}\s+['\"]?)(?!-)[^\s'\"]+", re.IGNORECASE), rf"\g<1>{REDACTED}"),
]


def publishable_cmdline(argv: list[str]) -> list[str]:
    """`argv` redacted, then cut to MAX_CMDLINE_CHARS, the cut said in a last element.
    Redacted before it is cut: a cut secret would no longer look like one."""
    kept: list[str] = []
    room = MAX_CMDLINE_CHARS
    redacted = redact_cmdline(argv)
    for i, arg in enumerate(redacted):
        if len(arg) > room:
            left_out = len(arg) - room + sum(len(rest) for rest in redacted[i + 1:])
            return [*kept, arg[:room], f"<{left_out} more characters not kept>"]
        kept.append(arg)
        room -= len(arg)
    return kept


def redact_cmdline(argv: list[str]) -> list[str]:
    """`argv` with what looks like a secret replaced by REDACTED."""
    redacted: list[str] = []
    value_follows = False
    for arg in argv:
        if value_follows and not arg.startswith("-"):
            redacted.append(REDACTED)
            value_follows = False
            continue
        name, equals, _ = arg.partition("=")
        secret_name = bool(_SECRET_NAME.match(name))
        if secret_name and equals:
            redacted.append(f"{name}={REDACTED}")
            value_follows = False
        else:
            value_follows = secret_name and name.startswith("-")
            redacted.append(_redact_text(arg))
    return redacted


def _redact_text(text: str) -> str:
    for pattern, replacement in _IN_TEXT:
        text = pattern.sub(replacement, text)
    return text
