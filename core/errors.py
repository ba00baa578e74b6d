"""How a stage ends on an expected error: one line, ``error: <what> (<fix>)``, exit status 2, no traceback.

Expected errors are refusals of the user's input: :class:`UserError` (and the project's own subclasses of
it), ``ValueError`` (bad option values, malformed files) and the ``OSError`` family for missing or
unwritable paths. Anything else is a bug and keeps its traceback. ``SJD2_TRACEBACK=1`` shows the
traceback of expected errors too (the documented switch, README "Errors").
"""
from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
TRACEBACK_ENV = "SJD2_TRACEBACK"


class UserError(Exception):
    """A refusal of the user's input; its message says what is wrong and how to fix it."""


EXPECTED: tuple[type[BaseException], ...] = (UserError, ValueError, FileNotFoundError, NotADirectoryError,
                                             IsADirectoryError, PermissionError)


def one_line(message: str) -> str:
    """The message as one line (newlines folded), prefixed with ``error: ``."""
    return "error: " + " ".join(str(message).split())


def one_line_errors(fn: F) -> F:
    """Wrap a stage's entry point: expected errors print :func:`one_line` on stderr and exit with 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EXPECTED as e:
            if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
                raise
            text = str(e) if not isinstance(e, OSError) or not e.filename else f"{e.strerror}: {e.filename}"
            if isinstance(e, PermissionError):
                text += " (choose a folder you can write to, e.g. out_dir=runs/...)"
            print(one_line(text or type(e).__name__), file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper  # type: ignore[return-value]
