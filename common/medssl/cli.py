"""Command-line plumbing shared by the tools in ``tools/``: one-line user errors and sha256 arguments.

- :func:`run` runs a python-fire command (a function or a dict of commands); for a function, ``--help`` / ``-h``
  prints the calling script's docstring (its usage). A user mistake -- a missing file, a
  datalist that is not JSON, a bad fraction, an unknown modality -- is printed as one line ``error: <message>`` on
  stderr with exit status 2 instead of a traceback; ``--debug`` anywhere on the command line shows the traceback.
  What counts as a user mistake is :data:`USER_ERRORS` (the exceptions the project raises for bad input, with
  messages that name the file and the problem); anything else is a bug and keeps its traceback.
- :func:`as_sha256` reads a sha256 argument. python-fire (and MONAI's bundle command line, which uses it) parses an
  all-digit hash as an int, which is zero-padded back to its 64 digits here; anything that is not 64 hexadecimal
  digits is a one-line error.

This module imports neither torch nor MONAI (the datalist tools start fast).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["USER_ERRORS", "DEBUG_FLAG", "run", "is_user_error", "user_message", "as_sha256"]

DEBUG_FLAG = "--debug"

#: exceptions that report bad input (a KeyError only when its argument is a sentence, see :func:`is_user_error`)
USER_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError, ImportError)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` reports a user mistake (shown as one line) rather than a bug (shown with its traceback).

    ``OSError`` (missing file, permission, full disk), ``ValueError`` (bad value, invalid JSON -- ``JSONDecodeError``
    is one), ``ImportError`` (a missing optional package), ``medssl.data.ImageReadError`` / ``BadItemError`` (an
    unreadable image), and a ``KeyError`` whose argument is a message (``KeyError("no key 'x' in ...")``); a bare
    ``KeyError('x')`` is a lookup bug.
    """
    if isinstance(error, KeyError):
        return bool(error.args) and isinstance(error.args[0], str) and " " in error.args[0].strip()
    if isinstance(error, USER_ERRORS):
        return True
    return type(error).__name__ in ("ImageReadError", "BadItemError")


def user_message(error: BaseException) -> str:
    """The message of a user error, on one line (a KeyError's message without the quotes ``str()`` adds)."""
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return " ".join(lines) if lines else type(error).__name__


def run(component: Any, argv: Sequence[str] | None = None, name: str | None = None, **fire_kwargs: Any) -> Any:
    """``fire.Fire(component)`` with one-line user errors; returns what the command returns.

    Args:
        component: the function, or dict of command name -> function, that python-fire exposes.
        argv: the arguments (default ``sys.argv[1:]``); ``--debug`` is taken out and turns the one-line errors off.
        name: the program name in fire's help (default: the script's file name).
        fire_kwargs: passed to ``fire.Fire`` (e.g. ``serialize``).

    A user error (:func:`is_user_error`) prints ``error: <message>`` on stderr and exits with status 2.
    """
    import fire

    args = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in args
    args = [a for a in args if a != DEBUG_FLAG]
    name = name or os.path.basename(sys.argv[0] or "") or None
    usage = getattr(sys.modules.get("__main__"), "__doc__", None)
    if usage and callable(component) and ("--help" in args or "-h" in args):
        # one command: the tool's own docstring (its usage and options); python-fire would pass --help to a command
        # taking **kwargs as an option. A dict of commands keeps fire's help, which lists each command's flags.
        print(usage.strip())
        sys.exit(0)
    try:
        return fire.Fire(component, command=args, name=name, **fire_kwargs)
    except Exception as e:  # noqa: BLE001 - user errors become one line; anything else is re-raised as it is
        if debug or not is_user_error(e):
            raise
        print(f"error: {user_message(e)} ({DEBUG_FLAG} shows the traceback)", file=sys.stderr, flush=True)
        sys.exit(2)


def as_sha256(value: Any, name: str = "sha256") -> str | None:
    """A sha256 argument as 64 lower-case hexadecimal digits; None for no hash (None, "", "none", "null").

    An int is what a command line made of an all-digit hash: its decimal digits are zero-padded back to 64.

    Raises:
        ValueError: one line naming ``name`` and the value, for anything that is not a sha256.
    """
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**64:
        return f"{value:064d}"
    if isinstance(value, str) and _SHA256.match(value.strip().lower()):
        return value.strip().lower()
    hint = ""
    if isinstance(value, (float, int)) and not isinstance(value, bool):
        hint = f"; the command line read it as a number: quote it, e.g. --{name}='\"HASH\"'"
    raise ValueError(f"{name} {value!r}: not a sha256 (64 hexadecimal digits, e.g. from `sha256sum FILE`){hint}")
