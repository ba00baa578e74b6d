"""How a stage ends on an expected error: one line, ``error: <what> (<fix>)``, exit status 2, no traceback.

Expected errors are refusals of the user's input: :class:`UserError` (and the project's own subclasses of
it), ``ValueError`` (bad option values, malformed files) and the ``OSError`` family for missing or
unwritable paths. Any other ``OSError`` of the system (a full disk, a read-only or failing file system)
is one line too, naming the path and the free space there. Anything else is a bug and keeps its
traceback. ``SJD2_TRACEBACK=1`` shows the traceback of expected errors too (the documented switch,
README "Errors"). Ctrl-C ends with one line, :data:`INTERRUPTED`, and exit status 130 (every stage
resumes where it stopped when the same command runs again).
"""
from __future__ import annotations

import errno
import functools
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
TRACEBACK_ENV = "SJD2_TRACEBACK"
INTERRUPTED = "interrupted; rerun the same command to resume"


class UserError(Exception):
    """A refusal of the user's input; its message says what is wrong and how to fix it."""


class OptionError(UserError, ValueError):
    """A bad option value (a count below its minimum, a device this machine lacks): both kinds at once."""


# OSErrors of the storage: full disk or quota, file too large, read-only or failing file system
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO})
EXPECTED: tuple[type[BaseException], ...] = (UserError, ValueError, FileNotFoundError, NotADirectoryError,
                                             IsADirectoryError, PermissionError)


def one_line(message: str) -> str:
    """The message as one line (newlines folded), prefixed with ``error: ``."""
    return "error: " + " ".join(str(message).split())


def _size(n: float) -> str:
    units, i = ("bytes", "KiB", "MiB", "GiB", "TiB"), 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} bytes" if i == 0 else f"{n:.1f} {units[i]}"


def free_space(path: str | os.PathLike | None) -> str:
    """``"1.2 GiB free"`` on the disk of ``path`` (its nearest existing folder; the current one without a path)."""
    probe = Path(path) if path else Path.cwd()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return f"{_size(shutil.disk_usage(probe if probe.is_dir() else probe.parent).free)} free"
    except OSError:
        return "free space unknown"


def system_error_line(e: OSError) -> str:
    """One line for an ``OSError`` of the system: what, where, and the space left there."""
    where = e.filename if e.filename is not None else "the current folder"
    return (f"{e.strerror or type(e).__name__}: {where} ({free_space(e.filename)} there); free some space or "
            "choose another folder, then rerun the same command (finished work is kept)")


def one_line_errors(fn: F) -> F:
    """Wrap a stage's entry point: expected errors print :func:`one_line` on stderr and exit with 2; Ctrl-C
    prints :data:`INTERRUPTED` and exits with 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
                raise
            print(INTERRUPTED, file=sys.stderr)
            raise SystemExit(130) from None
        except (*EXPECTED, OSError) as e:
            if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
                raise
            system = isinstance(e, OSError) and not isinstance(e, EXPECTED)
            if system and e.errno not in DISK_ERRNOS and e.filename is None:
                raise  # no errno of the storage and no path: a bug or the network, keep the traceback
            if system and e.errno in DISK_ERRNOS:
                text = system_error_line(e)
            else:
                text = str(e) if not isinstance(e, OSError) or not e.filename else f"{e.strerror}: {e.filename}"
            if isinstance(e, PermissionError):
                text += " (choose a folder you can write to, e.g. out_dir=runs/...)"
            print(one_line(text or type(e).__name__), file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper  # type: ignore[return-value]
