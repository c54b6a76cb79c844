"""User-facing errors: each prints as one line naming the file, field or item at fault."""
from __future__ import annotations


class UserError(Exception):
    """Bad input or environment; the CLI prints `error: <message>` and exits 2."""


class ConfigError(UserError):
    def __init__(self, path: str, field: str, message: str):
        self.path, self.field = str(path), field
        where = f"{self.path}: {field}" if field else self.path
        super().__init__(f"{where}: {message}")
