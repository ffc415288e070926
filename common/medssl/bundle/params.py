"""Command-line values of bundle parameters, coerced in one place.

``python -m monai.bundle run ... --amp true`` hands the config the string ``"true"`` (python-fire turns only
``True`` / ``False`` into booleans), and ``--amp 1`` the int 1. Every boolean parameter of a medssl bundle is read
through :func:`as_bool` where the config uses it (``"$medssl.bundle.as_bool(@amp, 'amp')"``), so each spelling a
user may type means the same thing and anything else stops the run with one line naming the key.
"""

from __future__ import annotations

from typing import Any

__all__ = ["as_bool", "require", "TRUE_WORDS", "FALSE_WORDS"]

TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")


def as_bool(value: Any, key: str = "value") -> bool:
    """``value`` as a bool: a bool, 0 / 1, or true / false / yes / no / on / off / 1 / 0 in any case.

    Raises:
        ValueError: any other value; the message names ``key`` and the accepted spellings.
    """
    if isinstance(value, bool):
        return value
    if type(value).__name__ == "bool_":  # numpy.bool_
        return bool(value)
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
    raise ValueError(
        f"bundle parameter {key!r}: {value!r} is not a boolean; give one of true / false (also yes / no, on / off, 1 / 0)"
    )


def require(condition: Any, message: str) -> bool:
    """``True`` when ``condition`` holds; otherwise stop the run with ``message`` as a one-line ``ValueError``.

    For a config that only fits some settings (``"$medssl.bundle.require(int(@stage) == 1, 'why')"``): MONAI's
    parser has no expression that raises, and a failed lookup would show a ``KeyError`` instead of the reason.
    """
    if not condition:
        raise ValueError(message)
    return True
