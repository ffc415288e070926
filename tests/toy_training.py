"""A toy self-supervised training run for the engine tests (in-process and as a subprocess / under torchrun).

* data: ``num_items`` seeded random 1x8x8 "images" (item i from ``RandomState(1000 + i)``) in a MONAI ``Dataset``
  whose random transform (MONAI ``Compose``: copy to two views, Gaussian noise on each, a random flip of view 1)
  is reseeded per item by ``medssl.data.samplers.SeededDataset`` from the ``SampleKey`` seeds of a
  ``DistributedBatchSampler`` (``batch_size`` per rank; global batch = batch_size x world size);
* method: :class:`ToyMethod`, an MLP encoder + LayerNorm (no BatchNorm, so a DDP run equals a one-process run with
  the same global batch), a scheduled ``temperature`` attribute, optional dropout (global torch RNG, to check that
  a resume restores the RNG state) and an optional NaN loss at a given iteration;
* engine: ``SSLTrainer`` + cosine lr / weight-decay / temperature schedules, ``TrainingLogHandler``,
  ``CheckpointHandler`` (``<out>/ckpt``), ``TerminateOnNanHandler``.

Command line (``python tests/toy_training.py --out DIR ...``, or under ``torchrun``): see :func:`parse_args`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from ignite.engine import Events

from medssl.data.samplers import DistributedBatchSampler, SeededDataset
from medssl.engines.checkpoint import CheckpointHandler
from medssl.utils.dist import destroy_distributed, get_rank, get_world_size, init_distributed, local_device
from medssl.engines.handlers import CosineScheduleHandler, TerminateOnNanHandler, TrainingLogHandler
from medssl.engines.trainer import SSLTrainer
from medssl.methods.base import SSLMethod

IMAGE_SIZE = 8


def make_dataset(num_items: int) -> SeededDataset:
    """The toy dataset: items {"image": (1, 8, 8) float32, "modality": "CT" | "MR", "dim": 2} -> two noisy views."""
    from monai.data import Dataset
    from monai.transforms import Compose, CopyItemsd, EnsureTyped, RandFlipd, RandGaussianNoised

    data = [
        {
            "image": np.random.RandomState(1000 + i).rand(1, IMAGE_SIZE, IMAGE_SIZE).astype(np.float32),
            "modality": ("CT", "MR")[i % 2],
            "dim": 2,
        }
        for i in range(num_items)
    ]
    transform = Compose(
        [
            CopyItemsd(keys="image", times=2, names=["view1", "view2"]),
            RandGaussianNoised(keys="view1", prob=1.0, std=0.2),
            RandGaussianNoised(keys="view2", prob=1.0, std=0.2),
            RandFlipd(keys="view1", prob=0.5, spatial_axis=0),
            EnsureTyped(keys=["image", "view1", "view2"], track_meta=False),
        ]
    )
    return SeededDataset(Dataset(data=data, transform=transform))


class ToyMethod(SSLMethod):
    """Two-view alignment of L2-normalised embeddings divided by a temperature, plus a norm regulariser; both terms
    are means of per-sample terms (so DDP gradient averaging equals the big-batch gradient)."""

    def __init__(self, dropout: float = 0.0, nan_at_iteration: int | None = None, temperature: float = 0.5):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Flatten(),
            nn.Linear(IMAGE_SIZE * IMAGE_SIZE, 32),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(32, 16),
        )
        self.norm = nn.LayerNorm(16)
        self.temperature = temperature
        self.nan_at_iteration = nan_at_iteration
        self.iteration = 0
        self.modalities_seen: list[str] = []

    def on_iteration_start(self, engine) -> None:
        self.iteration = engine.state.iteration

    def training_step(self, batch):
        self.modalities_seen.extend(batch["modality"])
        h1 = self.norm(self.encoder(batch["view1"]))
        h2 = self.norm(self.encoder(batch["view2"]))
        z1, z2 = F.normalize(h1, dim=1), F.normalize(h2, dim=1)
        align = ((z1 - z2) ** 2).sum(dim=1).mean() / self.temperature
        reg = ((h1.norm(dim=1) - 1.0) ** 2).mean()
        loss = align + 0.1 * reg
        if self.nan_at_iteration is not None and self.iteration == self.nan_at_iteration:
            loss = loss * float("nan")
        return {"loss": loss, "align": align.detach(), "reg": reg.detach()}


class ToyEncoder(nn.Module):
    """The inference network of the toy bundle: ToyMethod's encoder + norm as one module (image -> embedding)."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        method = ToyMethod(dropout=dropout)
        self.encoder, self.norm = method.encoder, method.norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.encoder(x))


class StallAfter:
    """Test helper: after iteration ``iteration`` completed (its checkpoint and log line written by the handlers
    attached before this one), write ``marker`` and hang, so that a test can SIGKILL the process at a known point."""

    def __init__(self, iteration: int, marker: Path) -> None:
        self.iteration, self.marker = iteration, Path(marker)

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine) -> None:
        if engine.state.iteration == self.iteration:
            self.marker.write_text(str(self.iteration))
            time.sleep(3600)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory (train_log.jsonl, ckpt/)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--num-items", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=4, help="per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--wd", type=float, default=0.05)
    p.add_argument("--warmup-iters", type=int, default=2)
    p.add_argument("--accumulate", type=int, nargs="+", default=[1], help="one run per value, in <out>/acc<N>")
    p.add_argument("--clip", type=float, default=None)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--nan-at", type=int, default=None)
    p.add_argument("--amp", action="store_true")
    p.add_argument("--device", default=None, help="cpu / cuda (default: the local device)")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--save-every-iters", type=int, default=None)
    p.add_argument("--keep-last", type=int, default=3)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--stall-after-iter", type=int, default=None)
    return p.parse_args(argv)


def build_trainer(args: argparse.Namespace, out_dir: Path, accumulate: int = 1) -> SSLTrainer:
    """Everything of one toy run, seeded; the trainer is ready to ``run()``."""
    from monai.data import DataLoader
    from monai.utils import set_determinism

    torch.set_num_threads(1)
    set_determinism(seed=args.seed)
    torch.use_deterministic_algorithms(True)
    dataset = make_dataset(args.num_items)
    sampler = DistributedBatchSampler(len(dataset), args.batch_size, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=args.num_workers)
    method = ToyMethod(dropout=args.dropout, nan_at_iteration=args.nan_at)
    optimizer = torch.optim.AdamW(method.parameter_groups(base_lr=args.lr, weight_decay=args.wd), lr=args.lr)
    handlers = [
        CosineScheduleHandler(optimizer, args.lr, 0.1 * args.lr, warmup_iters=args.warmup_iters),
        CosineScheduleHandler(optimizer, args.wd, 4 * args.wd, param_name="weight_decay"),
        CosineScheduleHandler(method, 0.5, 0.2, param_name="temperature"),
        TrainingLogHandler(out_dir, print_every=5, tensorboard=False),
        CheckpointHandler(
            out_dir / "ckpt",
            objects={"method": method, "optimizer": optimizer},
            save_every_iters=args.save_every_iters,
            keep_last=args.keep_last,
            resume=args.resume,
        ),
        TerminateOnNanHandler(),
    ]
    if args.stall_after_iter is not None:
        handlers.append(StallAfter(args.stall_after_iter, out_dir / "stalled"))
    return SSLTrainer(
        device=args.device or local_device(),
        max_epochs=args.epochs,
        data_loader=loader,
        method=method,
        optimizer=optimizer,
        amp=args.amp,
        clip_grad_norm=args.clip,
        accumulate_grad_batches=accumulate,
        handlers=handlers,
    )


def run(argv: list[str] | None = None) -> list[SSLTrainer]:
    """Run the toy training(s) described by ``argv`` (one per ``--accumulate`` value); returns the trainers."""
    args = parse_args(argv)
    out = Path(args.out)
    if get_world_size() > 1:
        import ignite.distributed as idist

        out.mkdir(parents=True, exist_ok=True)
        info = {
            "rank": get_rank(),
            "world_size": get_world_size(),
            "idist_rank": idist.get_rank(),
            "idist_world_size": idist.get_world_size(),
            "idist_backend": idist.backend(),
        }
        (out / f"dist_rank{get_rank()}.json").write_text(json.dumps(info))
    trainers = []
    for accumulate in args.accumulate:
        out_dir = out if len(args.accumulate) == 1 else out / f"acc{accumulate}"
        trainer = build_trainer(args, out_dir, accumulate)
        trainer.run()
        trainers.append(trainer)
    return trainers


def read_log(path: str | Path) -> dict[int, dict]:
    """train_log.jsonl as {iteration: record}, the last line of each iteration winning (a resumed run appends the
    iterations it redoes); a truncated last line (a killed writer) is skipped."""
    records: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        records[int(rec["iteration"])] = rec
    return records


def main() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    init_distributed()
    try:
        run(sys.argv[1:])
    finally:
        destroy_distributed()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
