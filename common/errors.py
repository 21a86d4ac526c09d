"""Errors that reach the user as one clear message instead of a traceback.

The command line catches ``FedtailError`` and prints its message, so every
message must say what is wrong and where (file, line, option) on its own.
"""

from __future__ import annotations

from pathlib import Path


class FedtailError(Exception):
    """A problem the user can fix (bad input, bad option); printed without traceback."""


class DataError(FedtailError):
    """Malformed or unusable interaction data, located as precisely as we can."""

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None) -> None:
        where = ""
        if path is not None:
            where = f"{path}"
            if line is not None:
                where += f", line {line}"
            where += ": "
        super().__init__(where + message)
        self.path = None if path is None else str(path)
        self.line = line


class ConfigError(FedtailError):
    """An option or configuration value that is out of range or inconsistent."""


class NonFiniteError(FedtailError):
    """A model, an aggregate or a score holding NaN or infinity: never averaged, kept, scored or served.

    Why an error rather than a warning: NaN compares false with everything, so a NaN model is not merely bad, it
    is ranked first by ``#(scores >= target score)`` and kept as the best round; nothing downstream notices.
    """
