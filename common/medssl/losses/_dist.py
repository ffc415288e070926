"""Small collective helpers used by the losses; each is a no-op (identity) without an initialised process group.

The helpers talk to ``torch.distributed`` directly, so they work under ``ignite.distributed``'s native backends
(nccl / gloo), under ``torchrun`` and in a plain single process alike. Every rank must call them in the same order
with tensors of the same shape (except :func:`all_gather_cat`, which accepts a different first dimension per rank).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = [
    "is_distributed",
    "get_world_size",
    "get_rank",
    "all_reduce_sum",
    "all_reduce_max",
    "broadcast",
    "all_gather_cat",
    "all_gather_with_grad",
    "PerRankState",
]


def is_distributed() -> bool:
    """True when a default process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place (no autograd); returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``tensor`` over all ranks, in place (no autograd); returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` on every rank with rank ``src``'s copy, in place (no autograd); returns it."""
    if is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, in rank order (no autograd).

    The first dimension may differ between ranks (the other dimensions and the dtype must agree): sizes are
    exchanged first and the tensors are padded to the largest one for the collective.
    """
    if not is_distributed():
        return tensor
    world_size = dist.get_world_size()
    local_size = torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)
    sizes = [torch.zeros_like(local_size) for _ in range(world_size)]
    dist.all_gather(sizes, local_size)
    sizes_list = [int(s.item()) for s in sizes]
    max_size = max(sizes_list)
    padded = tensor.new_zeros((max_size, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor.detach()
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, sizes_list)], dim=0)


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` (same shape on every rank) along dim 0, keeping autograd.

    The gradient flowing back to this rank's input is the sum over ranks of the gradients of its slice
    (``torch.distributed.nn.functional.all_gather``), which is what a loss computed on the gathered batch needs.
    """
    if not is_distributed():
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor), dim=0)


class PerRankState(nn.Module):
    """Base for per-rank tensors (queues, memory banks) that must NOT be nn.Module buffers.

    DistributedDataParallel broadcasts the buffers of the wrapped module from rank 0 before every forward, which
    would overwrite each rank's own queue / memory bank with rank 0's. The tensors here are plain attributes listed
    in ``_state_names``: ``.to()`` / ``.cuda()`` move them (``_apply``), and ``state_dict`` carries them as the
    module's extra state — this rank's copy (a checkpoint written by rank 0 holds rank 0's).
    """

    _state_names: tuple[str, ...] = ()

    def _apply(self, fn, *args, **kwargs):
        module = super()._apply(fn, *args, **kwargs)
        for name in self._state_names:
            value = getattr(self, name)
            if isinstance(value, torch.Tensor):
                setattr(self, name, fn(value))
        return module

    def get_extra_state(self) -> dict:
        return {name: getattr(self, name) for name in self._state_names}

    def set_extra_state(self, state: dict) -> None:
        for name in self._state_names:
            if name not in state:
                raise KeyError(f"{type(self).__name__}: checkpoint state lacks {name!r}")
            current, value = getattr(self, name), state[name]
            if isinstance(current, torch.Tensor):
                if tuple(value.shape) != tuple(current.shape):
                    raise ValueError(
                        f"{type(self).__name__}: checkpoint {name!r} has shape {tuple(value.shape)}, "
                        f"expected {tuple(current.shape)}"
                    )
                value = value.to(device=current.device, dtype=current.dtype)
            setattr(self, name, value)
