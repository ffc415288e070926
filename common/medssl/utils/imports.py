"""An object from its dotted path: the ``_target_`` of encoder manifests and DVME encoder specs."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["locate"]


def locate(dotted: str, where: str = "locate") -> Any:
    """The object named by a full dotted path: ``package.module.Name`` or ``package.module.Class.attr``.

    The longest importable module prefix wins, the rest is read as attributes. Raises ImportError naming ``where``,
    the path and the first real problem met (a module that exists but fails to import, a missing attribute), so a
    typo and a broken dependency read differently.
    """
    parts = str(dotted).split(".")
    problem: BaseException | None = None
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module_name)
        except ImportError as e:
            if not (isinstance(e, ModuleNotFoundError) and e.name == module_name):  # not just "no such module"
                problem = problem or e
            continue
        try:
            for name in parts[cut:]:
                obj = getattr(obj, name)
        except AttributeError as e:
            problem = problem or e
            continue
        return obj
    detail = f": {type(problem).__name__}: {problem}" if problem is not None else ""
    raise ImportError(f"{where}: cannot import {dotted!r} (a full dotted path package.module.Name is needed){detail}")
