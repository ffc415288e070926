"""Everything medssl does with ``torch.distributed``: process-group set-up, rank / world size, collectives, and the
base class of per-rank module state.

Process group (called from the bundles' configs through ``medssl.engines``; ``configs/multi_gpu_train.json`` layers on
``train.json`` and only swaps these in)::

    "device": "$medssl.engines.local_device()",
    "initialize": ["$medssl.engines.init_distributed()", "$monai.utils.set_determinism(seed=@seed)"],
    "finalize": ["$medssl.engines.destroy_distributed()"]

The trainer (:class:`medssl.engines.SSLTrainer`) wraps the method in ``DistributedDataParallel`` by itself when the
world size is above 1, so ``train.json`` stays the same for one and N processes.

Rank and world size: :func:`get_rank` / :func:`get_world_size` read the default ``torch.distributed`` group (0 and
1 without one); :func:`is_distributed` is True when a group of more than one rank exists. They are plain reads, so any
rank may call them alone (``is_main_process()`` guards rank-0-only work). ``ignite.distributed``'s ``idist.get_rank``
is not used for them: in a group it did not create, its first call sets up a helper gloo group (a collective every rank
must enter) and it then keeps that group after ``destroy_process_group``.

Collectives (:func:`all_reduce_sum`, :func:`all_reduce_max`, :func:`broadcast`, :func:`all_gather_cat`,
:func:`all_gather_with_grad`, :func:`all_gather_object`, :func:`broadcast_object`, :func:`barrier`) call
``torch.distributed`` directly, in place where the tensor is given, and are no-ops (identity) without a group of more
than one rank. Every rank must call them in the same order with tensors of the same shape (except
:func:`all_gather_cat`, which accepts a different first dimension per rank). The Sinkhorn-Knopp iterations of the
losses rely on this: their sums and maxima are raw all-reduces of each rank's own rows, however many rows each has.
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = [
    "init_distributed",
    "destroy_distributed",
    "local_device",
    "is_distributed",
    "get_world_size",
    "get_rank",
    "is_main_process",
    "barrier",
    "all_reduce_sum",
    "all_reduce_max",
    "broadcast",
    "all_gather_cat",
    "all_gather_with_grad",
    "all_gather_object",
    "broadcast_object",
    "PerRankState",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- process group
def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as e:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from e


def init_distributed(backend: str | None = None, timeout_minutes: float = 30.0) -> bool:
    """Initialise the default process group from the ``torchrun`` environment (``env://``: RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

    No-op returning False when ``WORLD_SIZE`` is not set (a plain ``python -m monai.bundle run``); returns True when
    a group is (or already was) initialised. ``backend`` defaults to ``nccl`` when CUDA is available, else ``gloo``;
    with nccl the process's CUDA device is set to ``cuda:LOCAL_RANK`` first (needed by nccl's object collectives).
    """
    if dist.is_available() and dist.is_initialized():
        return True
    if "WORLD_SIZE" not in os.environ:
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE is set but this torch build has no torch.distributed support")
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("init_distributed(backend='nccl'): CUDA is not available; use backend='gloo'")
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, init_method="env://", timeout=datetime.timedelta(minutes=timeout_minutes))
    logger.info(f"initialised process group: backend={backend} rank={rank}/{world_size} local_rank={local_rank}")
    return True


def destroy_distributed() -> None:
    """Destroy the default process group if one is initialised (no-op otherwise).

    All ranks meet at a barrier first: a rank that tears its group down while another is still finishing (rank 0
    writes the final checkpoint and the summaries) can make the other's communication threads abort at exit.
    """
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def local_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available (``LOCAL_RANK`` defaults to 0), else ``cpu``."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{_env_int('LOCAL_RANK', 0)}")
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------- rank / world size
def is_distributed() -> bool:
    """True when a default process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_world_size() -> int:
    """Number of processes in the default group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the process that writes files and logs."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


# --------------------------------------------------------------------------------------------- collectives
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
    from torch.distributed.nn.functional import all_gather  # on use: only multi-rank runs need it

    return torch.cat(all_gather(tensor), dim=0)


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (``obj`` itself in a single process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# --------------------------------------------------------------------------------------------- per-rank state
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
