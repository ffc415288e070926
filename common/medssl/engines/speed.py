"""The engine's speed switches (split from :mod:`medssl.engines.trainer`, which uses and re-exports them):
``channels_last`` for 2D convolutional backbones (:func:`has_conv2d`, :func:`to_channels_last`, the parameters in
place) and ``compile`` (:func:`compile_backbone`: ``torch.compile`` with an eager fallback and a one-line warning)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

__all__ = ["has_conv2d", "to_channels_last", "compile_backbone"]

logger = logging.getLogger("medssl.engines.trainer")  # the trainer's logger: its warnings read as the engine's


def has_conv2d(module: nn.Module) -> bool:
    """Whether ``module`` holds a 2D convolution (the backbones ``channels_last`` speeds up)."""
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def to_channels_last(data: Any) -> Any:
    """``data`` with every 4-D floating tensor in ``torch.channels_last`` memory format (same values, NHWC strides),
    recursing into dicts, lists and tuples like :func:`to_device`; other tensors and objects are returned as they
    are."""
    if isinstance(data, torch.Tensor):
        if data.ndim == 4 and data.is_floating_point():
            return data.contiguous(memory_format=torch.channels_last)
        return data
    if isinstance(data, Mapping):
        moved = {k: to_channels_last(v) for k, v in data.items()}
        try:
            return type(data)(moved)
        except TypeError:
            return moved
    if isinstance(data, tuple) and hasattr(data, "_fields"):
        return type(data)(*(to_channels_last(v) for v in data))
    if isinstance(data, (list, tuple)):
        moved = [to_channels_last(v) for v in data]
        return moved if isinstance(data, list) else tuple(moved)
    return data


def _params_channels_last(module: nn.Module) -> None:
    """The 4-D parameters and buffers of ``module`` (2D conv weights) in channels_last, in place: the Parameter
    objects stay the same (the optimiser built before the engine keeps them); 5-D (3D conv) weights are left as they
    are (``Module.to(memory_format=...)`` would reject them)."""
    with torch.no_grad():
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            if tensor.ndim == 4 and tensor.is_floating_point():
                tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)


def compile_backbone(module: nn.Module, **compile_kwargs: Any) -> bool:
    """Run ``module``'s forward through ``torch.compile``, in place, keeping its parameters and ``state_dict`` keys.

    Returns False (and logs one warning line) when ``torch.compile`` raises; the module then stays eager. A compiled
    forward that raises on a call (compilation is lazy: most failures show at the first batch) logs one warning line,
    and that call and every later one run the eager forward. Returns True when the compiled forward is installed.
    Only training-mode calls are compiled: in eval mode (kNN monitors, feature extraction, other batch shapes) the
    eager forward runs, so those passes do not trigger recompilations.
    """
    eager_forward = module.forward
    try:
        compiled_forward = torch.compile(eager_forward, **compile_kwargs)
    except Exception as err:  # noqa: BLE001 - any failure of the compiler means: train eagerly
        logger.warning(f"compile: torch.compile failed ({type(err).__name__}: {_first_line(err)}); training eagerly")
        return False
    failed = False

    def forward(*args: Any, **kwargs: Any) -> Any:
        nonlocal failed
        if not failed and module.training:
            try:
                return compiled_forward(*args, **kwargs)
            except Exception as err:  # noqa: BLE001
                failed = True
                logger.warning(
                    f"compile: the compiled {type(module).__name__} failed ({type(err).__name__}: {_first_line(err)}); "
                    "training eagerly"
                )
        return eager_forward(*args, **kwargs)

    module.forward = forward  # instance attribute: nn.Module.__call__ uses it, state_dict is untouched
    return True


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else "no message"
