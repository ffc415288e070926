"""Process-group set-up for multi-process training (``torchrun``), called from the bundles' configs.

``configs/multi_gpu_train.json`` layers on ``train.json`` and only swaps these in::

    "device": "$medssl.engines.local_device()",
    "initialize": ["$medssl.engines.init_distributed()", "$monai.utils.set_determinism(seed=@seed)"],
    "finalize": ["$medssl.engines.destroy_distributed()"]

The trainer (:class:`medssl.engines.SSLTrainer`) wraps the method in ``DistributedDataParallel`` by itself when
the world size is above 1, and the medssl samplers read rank / world size through ``ignite.distributed``, which
picks up the native process group initialised here (``idist`` syncs with an existing ``torch.distributed`` group),
so ``train.json`` stays the same for one and N processes.
"""

from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

__all__ = [
    "init_distributed",
    "destroy_distributed",
    "local_device",
    "is_main_process",
    "get_rank",
    "get_world_size",
    "barrier",
]

logger = logging.getLogger(__name__)


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
    if get_world_size() > 1:
        dist.barrier()
