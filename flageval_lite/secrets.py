"""Secrets stay in memory: every `api_key`, environment values whose names look secret (`HF_TOKEN`,
`AWS_SECRET_ACCESS_KEY`, ...) and command-line words after secret-looking flags (`--api-key X`) are replaced
by `<redacted>` before anything is written: the SQLite meta table, manifest.json, summary.json, the reports
and the log output.  The values themselves are also remembered (`remember`) and scrubbed from any text
(`scrub`), which catches a key that turns up somewhere its name does not (a server command line, an error).
"""
from __future__ import annotations

import logging
import re
from typing import Any, Iterable

REDACTED = "<redacted>"
# `token` but not max_tokens/prompt_token_ids/tokenizer, `auth` but not author.
SECRET_NAME = re.compile(r"api[_-]?key|token(?!s|_id|iz)|secret|passw(or)?d|credential|auth(?!or)|private[_-]?key|"
                         r"access[_-]?key", re.IGNORECASE)
# Placeholders that OpenAI-compatible clients send when a server takes no key: not secrets, kept readable.
NOT_SECRET = frozenset({"", "EMPTY", "none", "None", "null", REDACTED})
MIN_SCRUB_LENGTH = 4  # shorter values would mangle unrelated text if scrubbed everywhere

_known: set[str] = set()


def is_secret_name(name: Any) -> bool:
    return isinstance(name, str) and bool(SECRET_NAME.search(name))


def remember(values: Iterable[Any]) -> None:
    """Values to scrub from every text this process writes from now on."""
    _known.update(v for v in values if isinstance(v, str) and v not in NOT_SECRET and len(v) >= MIN_SCRUB_LENGTH)


def remember_spec(spec: Any) -> None:
    """A serve spec's key and its secret-looking env values."""
    remember([spec.api_key] + [value for name, value in spec.env if is_secret_name(name)])


def scrub(text: str) -> str:
    for value in sorted(_known, key=len, reverse=True):  # a key that contains another is replaced whole
        text = text.replace(value, REDACTED)
    return text


def _secret_value(value: Any) -> Any:
    return REDACTED if isinstance(value, str) and value not in NOT_SECRET else value


def _redact_words(words: list[Any]) -> list[Any]:
    """`--api-key X`, `--hf-token=X`, `NAME=X` with a secret NAME: X redacted."""
    out = []
    after_flag = False
    for word in words:
        if not isinstance(word, str):
            out.append(word)
            after_flag = False
            continue
        name, eq, value = word.partition("=")
        if after_flag and not word.startswith("-"):
            out.append(REDACTED)
        elif eq and is_secret_name(name):
            out.append(f"{name}={REDACTED}")
        else:
            out.append(scrub(word))
        after_flag = word.startswith("-") and not eq and is_secret_name(word)
    return out


def _is_pair(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], str)


def _redact_env(env: dict[str, Any]) -> dict[str, Any]:
    return {name: _secret_value(value) if is_secret_name(name) else redact(value) for name, value in env.items()}


def redact(value: Any) -> Any:
    """A copy of a JSON-like value (dicts, lists, tuples, strings) with every secret replaced by `<redacted>`."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if is_secret_name(key) and not isinstance(item, (dict, list, tuple)):
                out[key] = _secret_value(item)
            elif key == "env" and isinstance(item, (list, tuple)):  # ServeSpec.env: (name, value) pairs
                out[key] = [list(_redact_env(dict([pair])).popitem()) if _is_pair(pair) else redact(pair)
                            for pair in item]
            elif key == "env" and isinstance(item, dict):
                out[key] = _redact_env(item)
            elif key in ("args", "command", "argv") and isinstance(item, (list, tuple)):
                out[key] = _redact_words(list(item))
            else:
                out[key] = redact(item)
        return out
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return scrub(value)
    return value


class ScrubFilter(logging.Filter):
    """Log records with remembered secrets replaced, whatever logger or format argument carried them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _known:
            message = scrub(record.getMessage())
            record.msg, record.args = message, None
        return True


def scrub_logging() -> None:
    """Install the filter on every handler of the root logger (call after logging is configured)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, ScrubFilter) for f in handler.filters):
            handler.addFilter(ScrubFilter())
