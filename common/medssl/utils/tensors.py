"""Conversions every layer needs: a MetaTensor as a plain tensor, and a module without its DDP wrapper."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

__all__ = ["as_plain_tensor", "unwrap_module"]


def as_plain_tensor(value: Any) -> Any:
    """A MONAI ``MetaTensor`` as a plain ``torch.Tensor`` (same storage, no metadata: faster ops, nothing to collate,
    no meta in an autograd graph); any other value (plain tensors included) is returned as it is.

    MetaTensors are recognised by their ``as_tensor`` method, so this module does not import MONAI.
    """
    if isinstance(value, torch.Tensor):
        as_tensor = getattr(value, "as_tensor", None)
        if callable(as_tensor):
            return as_tensor()
    return value


def unwrap_module(module: Any) -> Any:
    """``module`` without ``DistributedDataParallel`` / ``DataParallel`` wrappers (any depth): the module whose
    ``state_dict`` keys have no ``module.`` prefix and whose forward runs no DDP collective; anything else is returned
    as it is."""
    while isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        module = module.module
    return module
