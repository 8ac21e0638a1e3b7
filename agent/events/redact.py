"""Secrets in command lines, taken out before a command line is published.

A command line goes into the events that name its process: to the events file, the spool and
every collector, far beyond the host, where /proc shows it to local users only. Routers are
often given their keys on the command line (`litellm --api_key sk-...`, a database URL with
its password, `env OPENAI_API_KEY=...`), so what looks like a secret becomes REDACTED: the
value of an option or assignment whose name says key, token, secret, password, credential or
auth; a URL's password; a bearer token; and anything in the shape of a well-known provider or
cloud key, wherever it appears. Too much is taken rather than too little: an investigator
still sees which option held what."""
from __future__ import annotations

import re

REDACTED = "<redacted>"

_SECRET_NAME = re.compile(r"^(-{1,2})?[\w.-]*(key|token|secret|passw(or)?d|pwd|credential|auth)[\w.-]*$",
                          re.IGNORECASE)
_IN_TEXT = [
    # Provider and cloud key shapes: OpenAI/Anthropic, AWS access keys, Google, GitHub, Slack,
    # Hugging Face.
    (re.compile(r"\b(sk-[A-Za-z0-9_-]{16,}|A[KS]IA[0-9A-Z]{16}|AIza[0-9A-Za-z_-]{35}|gh[pousr]_[A-Za-z0-9]{30,}"
                r"|xox[abprs]-[A-Za-z0-9-]{10,}|hf_[A-Za-z0-9]{30,})"), REDACTED),
    (re.compile(r"(://[^/\s:@]*:)[^/\s@]+(@)"), rf"\g<1>{REDACTED}\g<2>"),  # scheme://user:PASSWORD@
    (re.compile(r"(\bbearer\s+)\S+", re.IGNORECASE), rf"\g<1>{REDACTED}"),
]


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
