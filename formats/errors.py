"""Exceptions every layer raises; the CLI's error boundary turns them into one stderr line."""
from __future__ import annotations


class VecpipeError(Exception):
    """An error a user can act on. `source`/`record` locate it (file name, 1-based record)."""

    exit_code = 1

    def __init__(self, message: str, source: str | None = None, record: int | None = None,
                 hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.source = source
        self.record = record
        self.hint = hint

    def located(self, source: str | None = None, record: int | None = None) -> "VecpipeError":
        """Fill in the location if the raiser did not know it; returns self for `raise`."""
        if self.source is None:
            self.source = source
        if self.record is None:
            self.record = record
        return self

    def where(self) -> str:
        if self.source is None:
            return ""
        return self.source if self.record is None else f"{self.source}:{self.record}"

    def __str__(self) -> str:
        where = self.where()
        return f"{self.message} ({where})" if where else self.message


class DataError(VecpipeError):
    """Bad or incompatible input data: exit status 1."""


class UsageError(VecpipeError):
    """A combination of options that cannot work, found after parsing: exit status 2."""

    exit_code = 2


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that every cleanup path (temporary
    files and folders, unterminated streams) runs for it too; exit status 143 (128 + 15)."""


class ParameterError(UsageError):
    """A parameter value that cannot work; `parameter` names it, so that a command can say
    which of its options that is."""

    def __init__(self, message: str, parameter: str, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.parameter = parameter
