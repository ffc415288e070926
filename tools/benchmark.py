"""medssl benchmarks: each prints its figures next to a baseline measured in the same run.

    python tools/benchmark.py                      # = all: energy, then step
    python tools/benchmark.py energy [--size 512] [--repeats 5] [--channels 1] [--mode reflect] [--goal 3]
    python tools/benchmark.py step [--bundle DIR] [--config train.json] [--override auto] [--dataset-dir D]
        [--datalist F] [--iters 20] [--warmup 2] [--num-workers 0] [--trainer-id train#trainer] [--threads N]
        [--knn false]
    python tools/benchmark.py mit [--variant small] [--batch-2d 2] [--batch-3d 1] [--size-2d 224] [--size-3d 96,96,16]
    python tools/benchmark.py swav-step [--arch resnet50] [--batch-size 128] [--large 224] [--small 96] [--n-large 2]
        [--n-small 6] [--in-channels 3] [--modes plain,eager,channels_last,compiled] [--iters 10] [--warmup 3]
    python tools/benchmark.py loader [--bundle DIR] [--config train.json] [--dataset-dir D] [--datalist F]
        [--repeat 4] [--batch-size 32] [--num-workers 0,2] [--working-size 128] [--threads 1] [--cache-dir C]
    python tools/benchmark.py all [any option of energy and step]    (step part: --num-workers 0,2 by default)

energy — the energy-band decomposition of Ghesu et al. (``medssl.transforms.energy_bands``) against a straightforward
    ``scipy.ndimage.gaussian_filter`` cascade (same σ cascade, border mode and truncation, float32 input, spatial axes
    only) on ``size``×``size`` random images: ms per image for both (median over ``repeats`` images, calls
    interleaved, after one warm-up call each; both single-threaded), the speed-up and whether the goal (ours at least
    ``goal`` times faster, 3 by default) is met, the largest absolute difference between the two sets of bands (the
    comparison is of the same result), and the throughput of the whole ``EnergyBandAugmentd`` transform
    (decomposition + band energies + random recombination) in images per second.

step — where a training step of a bundle goes: builds the bundle's training workflow with
    ``monai.bundle.ConfigWorkflow`` (``config`` + override files; ``dataset_dir``, ``datalist``, ``output_dir``,
    ``ckpt_dir``, ``epochs``, ``num_workers`` set by the tool, outputs in a temporary folder), attaches
    ``medssl.engines.profiling.StepTimeProfiler`` to the trainer (``trainer_id``), runs the bundle's ``run`` section
    for ``warmup`` + ``iters`` iterations and prints the data wait vs compute breakdown. ``--num-workers 0,2`` runs
    once per value and compares them. Defaults: the bundle ``bundles/ssl_swav_multimodal_pretrain`` when it exists,
    else the test fixture ``tests/fixtures/bundles/toy_ssl_pretrain``; the demo dataset
    (``medssl.data.demo.build_demo_dataset``) built in a temporary folder unless ``--dataset-dir`` is given;
    ``--override auto`` = the bundle's ``configs/demo.json`` if it has one, else its ``configs/smoke.json``, else none
    (``--override none`` for the plain ``config``; several files as ``--override a.json,b.json``).

swav-step — the SwAV training step on a synthetic multi-crop batch (Table I's 2 × 224 + 6 × 96 crops by default),
    images per second: medssl's step (``medssl.methods.SwAV`` + ``ResNetBackbone``, as ``SSLTrainer`` runs it) eager,
    with ``channels_last`` and compiled, against a plain-PyTorch step of the reference loop (facebookresearch/swav:
    ResNet-50 + head + prototypes, Sinkhorn, swapped loss) written in this file, in the same run; bf16 autocast on a
    GPU. ``--arch tiny`` is a small ResNet for a check on a CPU.

loader — items per second of a pretraining bundle's data path with its full ``config`` (no override: Table I's crops),
    today's per-item path against the new one, side by side for each ``num_workers`` (0 and 2 by default), on the
    2D training items of the datalist repeated ``repeat`` times (one epoch = the repeated list, so worker start-up
    is amortised; it is counted). Today: the bundle's ``train#preprocessing`` per item in the DataLoader workers
    (decode, preset, ``MultiCropd`` with set A on each crop), ``make_dataset`` over the items. New: the deterministic
    front plus a resize to ``working_size`` cached on disk (``make_dataset(cache_dir=...)``, filled once before the
    measurement, the fill time printed); the workers load cached items and make the crops and set A on each
    collated batch with ``medssl.transforms.batched.BatchedMultiCrop`` (``BatchedViewsCollate`` as the
    ``collate_fn``, the CPU-training arrangement; in the main process with ``num_workers`` 0), configured from the
    bundle's crop sizes, counts and scale range and its set A transforms (energy bands by ``energy_band_augment``:
    one decomposition per crop index for the batch). Two rows per ``num_workers``: set A in full, and set A
    without the energy bands (both paths without them). Batches are drawn by a ``ModalityBatchSampler`` (the
    config's batch size and parts unless ``batch_size`` is given). Torch threads in the main process: ``threads``
    (1 by default, as in a DataLoader worker). Prints a table with the ratio new / today. A UniMiSS bundle
    (``train#views``, bundles/ssl_unimiss_pretrain) is measured per dimension instead: its 2D and its 3D training
    items, ``unimiss_views`` per item (today; and with the decoded front cached, to show the cache's share) against
    the cache + ``medssl.transforms.batched_unimiss.BatchedUniMiSSViews`` in ``UniMiSSViewsCollate``. The joint
    image-volume bundle (``train#volume_transform``, bundles/ssl_joint_image_volume_pretrain) is measured on its stage-1
    slice dataset (every selected slice of the training volumes plus the 2D images, the volumes cached in memory by
    both paths): its per-slice multi-crop views against its ``configs/batched_views.json`` (see
    :func:`_loader_joint`).

Exit status 0 when the benchmarks ran (a missed speed goal is reported, not an error).
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medssl.bundle.params import as_bool
from medssl.cli import run

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLES = (
    REPO / "bundles" / "ssl_swav_multimodal_pretrain",
    REPO / "tests" / "fixtures" / "bundles" / "toy_ssl_pretrain",
)
AUTO_OVERRIDES = ("demo.json", "smoke.json")


# --------------------------------------------------------------------------------------------------------------------
# energy bands
# --------------------------------------------------------------------------------------------------------------------


def scipy_energy_bands(
    image: np.ndarray, sigmas: Sequence[float], mode: str = "reflect", truncate: float = 4.0
) -> np.ndarray:
    """The baseline: the energy-band cascade written directly with ``scipy.ndimage.gaussian_filter``.

    ``L_0 = I, L_k = G_{σ_k} * L_{k-1}, B_k = L_{k-1} − L_k``; returns ``[L_K, B_K, ..., B_1]`` stacked, as
    ``medssl.transforms.energy_bands``. ``image`` is channel-first ``(C, *spatial)``; σ is 0 on the channel axis (no
    filtering across channels); the output has the input's dtype (scipy filters a float32 array into float32).
    """
    from scipy import ndimage

    previous = image
    bands = []
    for sigma in sigmas:
        lowpass = ndimage.gaussian_filter(
            previous, sigma=(0.0,) + (float(sigma),) * (image.ndim - 1), mode=mode, truncate=truncate
        )
        bands.append(previous - lowpass)
        previous = lowpass
    return np.stack([previous] + bands[::-1])


def _timed(fn: Callable, *args, **kwargs) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def energy(
    size: int = 512,
    repeats: int = 5,
    channels: int = 1,
    sigmas: Sequence[float] | None = None,
    mode: str = "reflect",
    truncate: float = 4.0,
    goal: float = 3.0,
    seed: int = 0,
) -> dict:
    """Energy-band decomposition: ours against the scipy.ndimage cascade, plus EnergyBandAugmentd throughput.

    Args:
        size: images are ``size``×``size`` (2D, channel-first ``(channels, size, size)``).
        repeats: number of timed images (distinct random images; median reported).
        channels: channels per image.
        sigmas: the σ cascade (default: Ghesu et al.'s 1, 2, 4, 8, 16 pixels).
        mode: border mode of both implementations.
        truncate: Gaussian truncation of both implementations (scipy's rule).
        goal: the speed-up the project asks for (ours ≥ goal × faster than the baseline).
        seed: seed of the random images and of the transform.

    Returns:
        ``{"size", "channels", "repeats", "ours_ms", "ours_best_ms", "scipy_ms", "scipy_best_ms", "speedup",
        "goal", "goal_met", "max_abs_diff", "augment_images_per_s", "augment_ms"}`` (also printed).
    """
    import torch
    from monai.data import MetaTensor

    from medssl.transforms.energy import (
        DEFAULT_SIGMAS,
        EnergyBandAugmentd,
        energy_bands,
        estimate_reference_energies,
    )

    size, repeats, channels = int(size), int(repeats), int(channels)
    if size < 2 or repeats < 1 or channels < 1:
        raise ValueError(f"energy: size={size} (>= 2), repeats={repeats} (>= 1), channels={channels} (>= 1)")
    sigmas = tuple(float(s) for s in (DEFAULT_SIGMAS if sigmas is None else sigmas))
    rng = np.random.RandomState(seed)
    warmup_image = rng.rand(channels, size, size).astype(np.float32)
    images = [rng.rand(channels, size, size).astype(np.float32) for _ in range(repeats)]

    def ours(image: np.ndarray) -> np.ndarray:
        return energy_bands(image, sigmas=sigmas, mode=mode, truncate=truncate)

    def baseline(image: np.ndarray) -> np.ndarray:
        return scipy_energy_bands(image, sigmas, mode=mode, truncate=truncate)

    print(
        f"== energy-band decomposition: {size}x{size}, {channels} channel(s), float32, sigmas "
        f"{', '.join(f'{s:g}' for s in sigmas)}, mode {mode}, {repeats} image(s) (median; one warm-up call each)",
        flush=True,
    )
    ours(warmup_image)
    baseline(warmup_image)
    ours_times, scipy_times, max_diff = [], [], 0.0
    for image in images:  # interleaved, so that a busy machine slows both alike
        t_ours, bands_ours = _timed(ours, image)
        t_scipy, bands_scipy = _timed(baseline, image)
        ours_times.append(t_ours)
        scipy_times.append(t_scipy)
        max_diff = max(max_diff, float(np.max(np.abs(bands_ours.astype(np.float64) - bands_scipy))))
    ours_ms, scipy_ms = 1e3 * float(np.median(ours_times)), 1e3 * float(np.median(scipy_times))
    speedup = scipy_ms / ours_ms if ours_ms > 0 else math.inf
    goal_met = speedup >= goal
    print(f"  {'medssl.transforms.energy_bands':44s}{ours_ms:10.2f} ms/image (best {1e3 * min(ours_times):.2f})")
    print(
        f"  {'scipy.ndimage.gaussian_filter cascade':44s}{scipy_ms:10.2f} ms/image (best {1e3 * min(scipy_times):.2f})"
        "  <- baseline"
    )
    print(f"  speed-up: {speedup:.2f}x (goal >= {goal:g}x: {'met' if goal_met else 'NOT met'})")
    print(f"  max |difference| of the bands: {max_diff:.3g} (image values in [0, 1])")

    # the whole augmentation, as the training pipeline calls it (MetaTensor in, one draw per call)
    samples = [{"image": MetaTensor(torch.from_numpy(image)), "modality": "CT"} for image in images]
    reference = estimate_reference_energies(
        [(image, "CT") for image in [warmup_image] + images], sigmas=sigmas, mode=mode, truncate=truncate
    )
    transform = EnergyBandAugmentd(keys="image", reference=reference, mode=mode, truncate=truncate)
    transform.set_random_state(seed=seed)
    transform({"image": MetaTensor(torch.from_numpy(warmup_image)), "modality": "CT"})
    augment_times = [_timed(transform, sample)[0] for sample in samples]
    augment_ms = 1e3 * float(np.median(augment_times))
    images_per_s = 1e3 / augment_ms if augment_ms > 0 else math.inf
    print(
        f"  EnergyBandAugmentd (bands + energies + recombination): {images_per_s:.1f} images/s "
        f"({augment_ms:.2f} ms/image)",
        flush=True,
    )
    return {
        "size": size,
        "channels": channels,
        "repeats": repeats,
        "ours_ms": ours_ms,
        "ours_best_ms": 1e3 * min(ours_times),
        "scipy_ms": scipy_ms,
        "scipy_best_ms": 1e3 * min(scipy_times),
        "speedup": speedup,
        "goal": float(goal),
        "goal_met": goal_met,
        "max_abs_diff": max_diff,
        "augment_images_per_s": images_per_s,
        "augment_ms": augment_ms,
    }


# --------------------------------------------------------------------------------------------------------------------
# training step
# --------------------------------------------------------------------------------------------------------------------


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def default_bundle() -> Path:
    """``bundles/ssl_swav_multimodal_pretrain`` when it exists, else the toy test-fixture bundle."""
    for bundle in DEFAULT_BUNDLES:
        if (bundle / "configs").is_dir():
            return bundle
    raise FileNotFoundError(f"no default bundle: none of {[str(b) for b in DEFAULT_BUNDLES]} exists; give --bundle")


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def resolve_configs(bundle: Path, config: str, override: Any) -> list[Path]:
    """The config files of a run: ``config`` then the overrides (names in ``bundle/configs`` or paths);
    ``override="auto"``: the bundle's demo.json, else smoke.json, else none; "none" / None: none."""
    configs_dir = bundle / "configs"

    def find(name: Any) -> Path:
        path = Path(str(name))
        for candidate in (path, configs_dir / path):
            if candidate.is_file():
                return candidate.resolve()
        raise FileNotFoundError(f"{bundle}: config file {name!r} not found (looked in {configs_dir} and as a path)")

    files = [find(config)]
    if isinstance(override, str) and override.lower() == "auto":
        files += [configs_dir / name for name in AUTO_OVERRIDES if (configs_dir / name).is_file()][:1]
    elif not (isinstance(override, str) and override.lower() == "none"):
        files += [find(name) for name in _as_list(override)]
    return files


def _ensure_import_paths(bundle: Path) -> None:
    """Bundle code importable: the bundle root (MONAI adds it only at run time) and, for the test-fixture bundles,
    ``tests/`` (the toy bundle's configs import ``toy_training``)."""
    paths = [bundle]
    tests_dir = REPO / "tests"
    if tests_dir in bundle.parents:
        paths.append(tests_dir)
    for path in paths:
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))


def run_bundle_steps(
    bundle: Path,
    configs: Sequence[Path],
    dataset_dir: Path,
    datalist: Path,
    out_dir: Path,
    iters: int,
    warmup: int,
    num_workers: int | None,
    trainer_id: str = "train#trainer",
    knn: bool = True,
):
    """Run ``warmup + iters`` iterations of a bundle's training workflow with a StepTimeProfiler attached to the
    trainer ``trainer_id``; returns ``(profiler, trainer)``. ``knn=False`` empties the bundle's ``knn#handlers``
    (when it has them): its kNN monitors embed the whole datalist at the start and the end, outside the measured
    iterations."""
    from monai.bundle import ConfigParser, ConfigWorkflow

    from medssl.engines.profiling import StepTimeProfiler

    _ensure_import_paths(bundle)
    overrides: dict[str, Any] = {
        "bundle_root": str(bundle),
        "dataset_dir": str(dataset_dir),
        "datalist": str(datalist),
        "output_dir": str(out_dir),
        "ckpt_dir": str(out_dir / "ckpt"),
        "epochs": warmup + iters + 1,  # each epoch has at least one iteration; the profiler stops the run
    }
    if num_workers is not None:
        overrides["num_workers"] = int(num_workers)
    if not knn:
        probe = ConfigParser()
        probe.read_config([str(c) for c in configs])
        if "knn#handlers" in probe:
            overrides["knn#handlers"] = []
    meta_file = bundle / "configs" / "metadata.json"
    workflow = ConfigWorkflow(
        config_file=[str(c) for c in configs],
        meta_file=str(meta_file) if meta_file.is_file() else None,
        logging_file=False,
        workflow_type=None,
        **overrides,
    )
    workflow.initialize()
    if trainer_id not in workflow.parser:
        raise KeyError(f"{configs[0]}: no trainer at id {trainer_id!r} (give --trainer-id)")
    trainer = workflow.parser.get_parsed_content(trainer_id)
    profiler = StepTimeProfiler(warmup_iters=warmup, stop_after=iters, log_summary=False)
    profiler.attach(trainer)
    try:
        workflow.run()
    finally:
        workflow.finalize()
    if not profiler.records:
        raise RuntimeError(
            f"{configs[0]}: the run recorded no iteration: does the 'run' section run the trainer {trainer_id!r}, "
            f"and does an epoch have more than {warmup} warm-up iterations in all?"
        )
    return profiler, trainer


def step(
    bundle: str | None = None,
    config: str = "train.json",
    override: Any = "auto",
    dataset_dir: str | None = None,
    datalist: str | None = None,
    iters: int = 20,
    warmup: int = 2,
    num_workers: Any = 0,
    trainer_id: str = "train#trainer",
    threads: int | None = None,
    knn: bool = True,
) -> dict:
    """Training-step breakdown (data wait vs compute) of a bundle's training on the demo data (or ``dataset_dir``).

    Args:
        bundle: bundle folder (default: bundles/ssl_swav_multimodal_pretrain, else the toy test-fixture bundle).
        config: the training config (in ``bundle/configs`` or a path).
        override: override config file(s): "auto" (demo.json, else smoke.json, when the bundle has them), "none",
            a name / path, or several separated by commas.
        dataset_dir: dataset folder; default: the demo dataset built in a temporary folder.
        datalist: datalist file; default ``dataset_dir/datalist.json``.
        iters: measured iterations.
        warmup: iterations run first and not measured.
        num_workers: DataLoader workers (the bundle's ``num_workers`` key); several values (``0,2``) = one run each,
            compared; None keeps the bundle's value.
        trainer_id: config id of the trainer.
        threads: ``torch.set_num_threads`` for the training process first (default: torch's own choice, printed);
            on a machine shared with other jobs, fewer threads than cores can be much faster.
        knn: keep the bundle's kNN monitors (``--knn false``: off; they embed the whole datalist at the start and
            the end of each run, outside the measured iterations, which on a large datalist takes minutes).

    Returns:
        ``{"bundle", "configs", "device", "runs": [{"num_workers", "summary"}, ...]}`` (also printed).
    """
    iters, warmup = int(iters), int(warmup)
    if iters < 1 or warmup < 0:
        raise ValueError(f"step: iters={iters} must be >= 1 and warmup={warmup} >= 0")
    bundle_path = Path(bundle).resolve() if bundle is not None else default_bundle()
    if not (bundle_path / "configs").is_dir():
        raise FileNotFoundError(f"{bundle_path}: not a bundle (no configs/ folder)")
    configs = resolve_configs(bundle_path, config, override)
    if threads is not None:
        import torch

        torch.set_num_threads(int(threads))
    worker_counts = _as_list(num_workers) if num_workers is not None else [None]
    worker_counts = [None if w is None else int(w) for w in worker_counts] or [None]

    with tempfile.TemporaryDirectory(prefix="medssl_benchmark_", ignore_cleanup_errors=True) as tmp:
        tmp_path = Path(tmp)
        if dataset_dir is None:
            from medssl.data.demo import build_demo_dataset

            started = time.perf_counter()
            built = Path(build_demo_dataset(tmp_path / "demo", learn=False))
            data_dir = built.parent
            data_text = f"demo dataset built in {data_dir} ({time.perf_counter() - started:.1f} s)"
        else:
            built = None
            data_dir = Path(dataset_dir).resolve()
            data_text = f"dataset {data_dir}"
        datalist_path = Path(datalist).resolve() if datalist else (built or data_dir / "datalist.json")
        rel = bundle_path.relative_to(REPO) if REPO in bundle_path.parents else bundle_path
        print(
            f"== training step breakdown: bundle {rel}, configs {' + '.join(c.name for c in configs)}; {data_text}; "
            f"datalist {datalist_path.name}; {warmup} warm-up + {iters} measured iterations; "
            f"torch threads {_torch_threads()}",
            flush=True,
        )
        runs, device = [], None
        for index, workers in enumerate(worker_counts):
            profiler, trainer = run_bundle_steps(
                bundle_path,
                configs,
                data_dir,
                datalist_path,
                tmp_path / f"run{index}",
                iters,
                warmup,
                workers,
                trainer_id,
                knn=as_bool(knn, "--knn"),
            )
            device = str(getattr(trainer.state, "device", None) or getattr(trainer, "device", "?"))
            loader = getattr(trainer, "data_loader", None)
            used_workers = getattr(loader, "num_workers", workers)
            title = f"num_workers {used_workers}, device {device}, epoch length {trainer.state.epoch_length}"
            print(profiler.format_summary(title=title), flush=True)
            runs.append({"num_workers": used_workers, "summary": profiler.summary()})
        if len(runs) > 1:
            print("  num_workers comparison (baseline: the first), mean ms per iteration:")
            base = runs[0]["summary"]["total"]["mean"]
            for measured in runs:
                s = measured["summary"]
                print(
                    f"    num_workers {measured['num_workers']}: data wait {1e3 * s['data_wait']['mean']:.2f}, "
                    f"total {1e3 * s['total']['mean']:.2f} (speed {base / s['total']['mean']:.2f}x the first), "
                    f"data wait fraction {100.0 * s['data_wait_fraction']:.1f}%"
                )
    return {"bundle": str(bundle_path), "configs": [str(c) for c in configs], "device": device, "runs": runs}


# --------------------------------------------------------------------------------------------------------------------
# mit
# --------------------------------------------------------------------------------------------------------------------


def mit(
    variant: str = "small",
    batch_2d: int = 2,
    batch_3d: int = 1,
    size_2d: int = 224,
    size_3d: Sequence[int] = (96, 96, 16),
    repeats: int = 3,
    amp: bool | None = None,
    threads: int | None = None,
    seed: int = 0,
) -> dict:
    """MiT forward + backward time on a 2D batch (``batch_2d`` × 3 × size_2d²) and a 3D batch (``batch_3d`` × 1 ×
    size_3d, depth last: UniMiSS's 16×96×96 crops are 96×96×16 here), with our attention
    (``torch.nn.functional.scaled_dot_product_attention``) against the explicit softmax(QKᵀ)V attention, in the
    same run on the same weights. On a GPU it runs under bf16 autocast (``amp`` default: on with CUDA).

    Returns ``{"device", "variant", "amp", "rows": [{"input", "attention", "ms", "best_ms"}...], "speedup_2d",
    "speedup_3d"}`` (also printed). The median of ``repeats`` timed iterations after one warm-up is reported.
    """
    import torch

    from medssl.networks.mit import mit_small, mit_tiny

    if threads:
        torch.set_num_threads(int(threads))
    factories = {"small": mit_small, "tiny": mit_tiny}
    if variant not in factories:
        raise ValueError(f"mit: variant must be one of {sorted(factories)}, got {variant!r}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = device.type == "cuda" if amp is None else bool(amp)
    torch.manual_seed(seed)
    size_3d = tuple(int(v) for v in size_3d)
    model = factories[variant](img_size_2d=int(size_2d), img_size_3d=size_3d).to(device)
    generator = torch.Generator().manual_seed(seed)
    inputs = {
        f"2D {batch_2d}x3x{size_2d}x{size_2d}": torch.randn(batch_2d, 3, size_2d, size_2d, generator=generator),
        f"3D {batch_3d}x1x{'x'.join(map(str, size_3d))}": torch.randn(batch_3d, 1, *size_3d, generator=generator),
    }

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step(x: torch.Tensor) -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        out.float().square().mean().backward()

    print(f"MiT-{variant} forward + backward on {device} (amp bf16: {amp}, torch threads {torch.get_num_threads()})")
    rows = []
    for name, x in inputs.items():
        x = x.to(device)
        for attention in ("sdpa", "explicit"):
            model.set_attention(attention)
            step(x)  # warm-up
            sync()
            times = []
            for _ in range(max(1, int(repeats))):
                start = time.perf_counter()
                step(x)
                sync()
                times.append(time.perf_counter() - start)
            row = {"input": name, "attention": attention, "ms": 1e3 * float(np.median(times)),
                   "best_ms": 1e3 * min(times)}
            rows.append(row)
            print(f"  {name:<24} {attention:<9} {row['ms']:9.1f} ms (best {row['best_ms']:.1f})")
    result = {"device": str(device), "variant": variant, "amp": amp, "rows": rows}
    for dim in ("2D", "3D"):
        ms = {r["attention"]: r["ms"] for r in rows if r["input"].startswith(dim)}
        result[f"speedup_{dim.lower()}"] = ms["explicit"] / ms["sdpa"]
        print(f"  {dim}: SDPA is {result[f'speedup_{dim.lower()}']:.2f}x the speed of the explicit attention")
    model.set_attention("sdpa")
    return result


# --------------------------------------------------------------------------------------------------------------------
# swav-step
# --------------------------------------------------------------------------------------------------------------------

# trunk: residual blocks per stage, base widths (bottleneck blocks, expansion 4)
SWAV_ARCHS = {"resnet50": ((3, 4, 6, 3), (64, 128, 256, 512)), "tiny": ((1, 1, 1, 1), (8, 16, 32, 64))}


def _plain_swav_model(layers: Sequence[int], widths: Sequence[int], in_channels: int, hidden_dim: int, feat_dim: int,
                      n_prototypes: int) -> Any:
    """The reference's network written out in plain PyTorch (torchvision is not a dependency): a torchvision-layout
    bottleneck ResNet (7×7 stem, max-pool, stride in the 3×3 convolution), global average pooling, the projection
    head Linear-BN-ReLU-Linear and the prototypes as a bias-free Linear."""
    import torch.nn as nn

    class Bottleneck(nn.Module):
        def __init__(self, cin: int, planes: int, stride: int) -> None:
            super().__init__()
            cout = planes * 4
            self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes)
            self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
            self.conv3, self.bn3 = nn.Conv2d(planes, cout, 1, bias=False), nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.shortcut = None
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            identity = x if self.shortcut is None else self.shortcut(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            return self.relu(self.bn3(self.conv3(out)) + identity)

    modules = [nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False), nn.BatchNorm2d(widths[0]),
               nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
    cin = widths[0]
    for stage, (blocks, planes) in enumerate(zip(layers, widths)):
        for block in range(blocks):
            modules.append(Bottleneck(cin, planes, 2 if stage > 0 and block == 0 else 1))
            cin = planes * 4
    model = nn.Module()
    model.trunk = nn.Sequential(*modules, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model.head = nn.Sequential(nn.Linear(cin, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                               nn.Linear(hidden_dim, feat_dim))
    model.prototypes = nn.Linear(feat_dim, n_prototypes, bias=False)
    return model


def _plain_sinkhorn(scores: Any, epsilon: float, iters: int) -> Any:
    """The reference's Sinkhorn-Knopp on one process: Q = exp(scores / ε)ᵀ, normalised, ``iters`` row / column
    rounds, columns summing to 1 (codes (B, K))."""
    import torch

    q = torch.exp(scores / epsilon).t()
    k, b = q.shape
    q /= q.sum()
    for _ in range(iters):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).t()


def _plain_swapped_loss(scores: Any, batch: int, n_crops: int, temperature: float, epsilon: float, iters: int,
                        crops_for_assign: Sequence[int] = (0, 1)) -> Any:
    """The reference's swapped prediction on view-major scores (n_crops·B, K): for each assignment crop, its
    Sinkhorn codes against the softmax(scores / τ) of every other crop, cross-entropy averaged over those crops and
    then over the assignment crops."""
    import torch
    import torch.nn.functional as F

    loss = 0.0
    for crop in crops_for_assign:
        with torch.no_grad():
            codes = _plain_sinkhorn(scores[batch * crop: batch * (crop + 1)].detach(), epsilon, iters)
        others = [v for v in range(n_crops) if v != crop]
        for view in others:
            log_p = F.log_softmax(scores[batch * view: batch * (view + 1)] / temperature, dim=1)
            loss = loss - torch.mean(torch.sum(codes * log_p, dim=1)) / len(others)
    return loss / len(crops_for_assign)


def _plain_swav_step(model: Any, crops: list, optimizer: Any, amp_dtype: Any, temperature: float, epsilon: float,
                     iters: int, crops_for_assign: Sequence[int] = (0, 1)) -> Any:
    """One step of the reference training loop (facebookresearch/swav ``main_swav.py``, without LARC and the
    queue): normalise the prototypes, run the crops through the trunk grouped by resolution, Sinkhorn codes of the
    assignment crops, the swapped cross-entropy over every other crop, backward, SGD step. Returns the loss."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        model.prototypes.weight.copy_(F.normalize(model.prototypes.weight, dim=1))
    device_type = crops[0].device.type
    batch = crops[0].shape[0]
    with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        features, start = [], 0
        while start < len(crops):  # consecutive crops of one resolution in one trunk call
            end = start
            while end < len(crops) and crops[end].shape[-1] == crops[start].shape[-1]:
                end += 1
            features.append(model.trunk(torch.cat(crops[start:end])))
            start = end
        embeddings = F.normalize(model.head(torch.cat(features)), dim=1)
        scores = model.prototypes(embeddings).float()
    loss = _plain_swapped_loss(scores, batch, len(crops), temperature, epsilon, iters, crops_for_assign)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def swav_step(
    arch: str = "resnet50",
    batch_size: int = 128,
    large: int = 224,
    small: int = 96,
    n_large: int = 2,
    n_small: int = 6,
    in_channels: int = 3,
    modes: Any = ("plain", "eager", "channels_last", "compiled"),
    iters: int = 10,
    warmup: int = 3,
    amp: bool | None = None,
    threads: int | None = None,
    seed: int = 0,
) -> dict:
    """The SwAV training step on a synthetic multi-crop batch, in images (items) per second: medssl's step
    (``medssl.methods.SwAV`` on ``ResNetBackbone``, what ``SSLTrainer`` runs) eager, with ``channels_last``
    (parameters and crops in NHWC) and compiled (``channels_last`` + ``compile_backbone``), against the plain-PyTorch
    step of the reference loop written in this file (``plain``: :func:`_plain_swav_step`), in the same run on the
    same batch, with the same sizes: head 2048 → 128, 3,000 prototypes, τ 0.1, ε 0.05, 3 Sinkhorn iterations, SGD
    with momentum. On a GPU every step runs under bf16 autocast (``amp`` default: on with CUDA). ``arch`` is
    ``resnet50`` or ``tiny`` (1 block per stage, widths 8-64: for a check on a CPU).

    Returns ``{"device", "arch", "amp", "batch_size", "rows": [{"mode", "ms", "best_ms", "images_per_s",
    "vs_plain"}...]}`` (also printed): the median of ``iters`` timed steps after ``warmup`` steps (compiling happens
    in the warm-up)."""
    import torch

    from medssl.engines.speed import _params_channels_last, compile_backbone, to_channels_last
    from medssl.methods import SwAV
    from medssl.networks import ResNetBackbone

    if arch not in SWAV_ARCHS:
        raise ValueError(f"swav-step: arch must be one of {sorted(SWAV_ARCHS)}, got {arch!r}")
    modes = [m.strip() for m in (modes.split(",") if isinstance(modes, str) else modes) if m.strip()]
    known = ("plain", "eager", "channels_last", "compiled")
    if not modes or any(m not in known for m in modes):
        raise ValueError(f"swav-step: modes must be among {', '.join(known)}, got {modes!r}")
    if int(batch_size) < 2 or int(n_large) < 2 or int(iters) < 1:
        raise ValueError(f"swav-step: batch_size={batch_size} (>= 2), n_large={n_large} (>= 2), iters={iters} (>= 1)")
    if threads:
        torch.set_num_threads(int(threads))
    layers, widths = SWAV_ARCHS[arch]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = device.type == "cuda" if amp is None else bool(amp)
    amp_dtype = torch.bfloat16 if amp else None
    sizes = [int(large)] * int(n_large) + [int(small)] * int(n_small)
    generator = torch.Generator().manual_seed(seed)
    crops = [torch.randn(int(batch_size), int(in_channels), s, s, generator=generator).to(device) for s in sizes]
    head = {"hidden_dim": 2048, "feat_dim": 128, "n_prototypes": 3000}
    loss_args = {"temperature": 0.1, "epsilon": 0.05}

    def build(mode: str) -> tuple[Any, Callable[[], Any]]:
        torch.manual_seed(seed)
        if mode == "plain":
            model = _plain_swav_model(layers, widths, int(in_channels), **head).to(device)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            return model, lambda: _plain_swav_step(model, crops, optimizer, amp_dtype, iters=3, **loss_args)
        backbone = ResNetBackbone(spatial_dims=2, in_channels=int(in_channels), layers=list(layers),
                                  block_inplanes=list(widths))
        method = SwAV(backbone, sinkhorn_iters=3, **head, **loss_args).to(device)
        batch = {"crops": crops}
        if mode in ("channels_last", "compiled"):
            _params_channels_last(method)
            batch = to_channels_last(batch)
        if mode == "compiled":
            compile_backbone(method.backbone)
        optimizer = torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9)

        def step() -> Any:
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp):
                loss = method(batch)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return loss.detach()

        return method, step

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    print(f"SwAV step, {arch}, batch {batch_size} x ({n_large} x {large}^2 + {n_small} x {small}^2) x {in_channels} "
          f"channel(s) on {device} (amp bf16: {amp}, torch threads {torch.get_num_threads()})")
    rows = []
    for mode in modes:
        model, step = build(mode)
        model.train()
        for _ in range(max(1, int(warmup))):
            loss = step()
        sync()
        times = []
        for _ in range(int(iters)):
            start = time.perf_counter()
            loss = step()
            sync()
            times.append(time.perf_counter() - start)
        ms = 1e3 * float(np.median(times))
        rows.append({"mode": mode, "ms": ms, "best_ms": 1e3 * min(times), "images_per_s": int(batch_size) / ms * 1e3,
                     "loss": float(loss)})
        del model, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    plain_ms = next((r["ms"] for r in rows if r["mode"] == "plain"), None)
    for row in rows:
        row["vs_plain"] = plain_ms / row["ms"] if plain_ms else None
        ratio = f"{row['vs_plain']:.2f}x the plain step" if plain_ms else ""
        print(f"  {row['mode']:<14}{row['ms']:9.1f} ms/step (best {row['best_ms']:.1f}) "
              f"{row['images_per_s']:9.1f} images/s  {ratio}")
    return {"device": str(device), "arch": arch, "amp": amp, "batch_size": int(batch_size), "rows": rows}


# --------------------------------------------------------------------------------------------------------------------
# loader
# --------------------------------------------------------------------------------------------------------------------


def _epoch_items_per_second(dataset: Any, sampler: Any, num_workers: int, collate_fn: Callable | None = None) -> float:
    """Items per second of one epoch through ``DataLoader(dataset, batch_sampler=sampler, collate_fn=...)`` (worker
    start-up included)."""
    from monai.data import DataLoader

    sampler.set_epoch(0)
    kwargs = {} if collate_fn is None else {"collate_fn": collate_fn}
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=int(num_workers), **kwargs)
    started = time.perf_counter()
    count = 0
    for batch in loader:
        count += len(batch["modality"]) if isinstance(batch, dict) and "modality" in batch else 1
    return count / (time.perf_counter() - started)


def loader(
    bundle: str | None = None,
    config: str = "train.json",
    dataset_dir: str | None = None,
    datalist: str | None = None,
    repeat: int = 4,
    batch_size: int | None = None,
    num_workers: Any = (0, 2),
    working_size: int = 128,
    threads: int | None = 1,
    cache_dir: str | None = None,
) -> dict:
    """Items/s of a bundle's data path, today's per-item path vs cache + batched augmentation (see the module doc).

    Args:
        bundle: a pretraining bundle with ``train#items``, ``train#preprocessing`` and ``train#multicrop`` (default:
            bundles/ssl_swav_multimodal_pretrain), or UniMiSS's (``train#views``; see :func:`_loader_unimiss`), or
            the joint image-volume bundle (``train#volume_transform``; see :func:`_loader_joint`).
        config: its full training config (no override files: the configuration measured is the config's own).
        dataset_dir: dataset folder; default: the demo dataset built in a temporary folder.
        datalist: datalist file; default ``dataset_dir/datalist.json``.
        repeat: times the training items are repeated in one epoch.
        batch_size: items per batch; default the config's ``batch_size``.
        num_workers: DataLoader workers, one or several (``0,2``); each is measured for both paths.
        working_size: side of the cached working-size images of the new path (longest side resized, padded).
        threads: ``torch.set_num_threads`` of the main process (None: torch's choice).
        cache_dir: the new path's cache folder (default: a temporary folder, filled by this run).

    Returns:
        ``{"bundle", "items", "batch_size", "working_size", "cache_fill_s", "rows": [{"num_workers", "variant",
        "today", "new", "ratio"}, ...]}`` (items/s; also printed as a table).
    """
    import torch
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    from medssl.data import ModalityBatchSampler
    from medssl.data.pipeline import loading_transforms, make_dataset
    from medssl.transforms import ClassLabeld, EnergyBandAugmentd, PlainTensord, RandGammad, RandLinearIntensityd
    from medssl.transforms.batched import BatchedMultiCrop, BatchedViewsCollate

    if threads is not None:
        torch.set_num_threads(int(threads))
    bundle_path = Path(bundle).resolve() if bundle is not None else default_bundle()
    config_path = resolve_configs(bundle_path, config, "none")[0]
    _ensure_import_paths(bundle_path)
    worker_counts = [int(w) for w in _as_list(num_workers)] or [0]

    with tempfile.TemporaryDirectory(prefix="medssl_loader_", ignore_cleanup_errors=True) as tmp:
        tmp_path = Path(tmp)
        if dataset_dir is None:
            from medssl.data.demo import build_demo_dataset

            built = Path(build_demo_dataset(tmp_path / "demo", learn=False))
            data_dir = built.parent
        else:
            built = None
            data_dir = Path(dataset_dir).resolve()
        datalist_path = Path(datalist).resolve() if datalist else (built or data_dir / "datalist.json")

        parser = ConfigParser()
        parser.read_config(str(config_path))
        parser["bundle_root"] = str(bundle_path)
        parser["dataset_dir"] = str(data_dir)
        parser["datalist"] = str(datalist_path)
        if "train#multicrop" not in parser and "train#views" in parser:  # UniMiSS: 2D and 3D views, see the doc
            return _loader_unimiss(parser, bundle_path, config_path, tmp_path, int(repeat), batch_size,
                                   worker_counts, int(working_size), cache_dir)
        if "train#volume_transform" in parser:  # the joint bundle's stage 1: slices of volumes + 2D images
            return _loader_joint(parser, bundle_path, config_path, int(repeat), batch_size, worker_counts,
                                 int(working_size))
        parser["dims"] = [2]
        items = [it for it in parser.get_parsed_content("train#items") if int(it.get("dim", 2)) == 2]
        if not items:
            raise ValueError(f"{datalist_path}: no 2D training item")
        repeated = [dict(it) for _ in range(int(repeat)) for it in items]
        per_item = parser.get_parsed_content("train#preprocessing")
        multicrop = parser.get_parsed_content("train#multicrop")
        size = int(batch_size) if batch_size is not None else int(parser.get_parsed_content("batch_size"))
        parts = int(parser.get_parsed_content("modality_parts")) if "modality_parts" in parser else 1
        channels = int(parser.get_parsed_content("in_channels")) if "in_channels" in parser else 1
        groups = [(count, crop) for count, crop, _ in multicrop.groups_for(2)]
        scales = [scale for _, _, scale in multicrop.groups_for(2)]
        set_a = list(getattr(multicrop.augment, "transforms", []))
        energy_t = next((t for t in set_a if isinstance(t, EnergyBandAugmentd)), None)
        gamma_t = next((t for t in set_a if isinstance(t, RandGammad)), None)
        linear_t = next((t for t in set_a if isinstance(t, RandLinearIntensityd)), None)
        augment_kwargs = dict(
            crops=groups, scales=scales,
            gamma_prob=gamma_t.prob if gamma_t else 0.0,
            gamma_range=gamma_t.gamma_range if gamma_t else (1.0, 1.0),
            gamma_reciprocal_prob=gamma_t.reciprocal_prob if gamma_t else 0.0,
            linear_prob=linear_t.prob if linear_t else 0.0,
            a_range=linear_t.a_range if linear_t else (1.0, 1.0),
            b_fraction=linear_t.b_fraction if linear_t else 0.0,
        )
        batched = {
            True: BatchedMultiCrop(**augment_kwargs, energy=copy.deepcopy(energy_t)),
            False: BatchedMultiCrop(**augment_kwargs),
        }
        without_energy = _without_energy_bands(multicrop.augment)

        cache = Path(cache_dir) if cache_dir else tmp_path / "cache"
        front = Compose(loading_transforms(channels=channels, working_size=int(working_size))
                        + [ClassLabeld(keys="label"), PlainTensord(keys="image")])
        new_ds = make_dataset(repeated, front, cache_dir=cache, seed_key="seed")
        started = time.perf_counter()
        for index in range(len(items)):  # fill the cache once (the repeats are the same entries)
            new_ds[index]
        fill_s = time.perf_counter() - started
        today_full = make_dataset(repeated, per_item)

        def sampler() -> Any:
            return ModalityBatchSampler([it["modality"] for it in repeated], size, parts=parts, seed=0)

        print(
            f"== data path throughput: bundle {bundle_path.name}, {config_path.name} (crops "
            f"{' + '.join(f'{c}x{s}' for c, s in groups)}, scale {scales[0]}); {len(items)} 2D items x {repeat} = "
            f"{len(repeated)} per epoch, batch {size} ({parts} modality parts); working size {working_size}; "
            f"cache filled in {fill_s:.1f} s ({len(items)} items); main-process torch threads {_torch_threads()}",
            flush=True,
        )
        rows = [
            row for workers in worker_counts for row in _energy_variant_rows(
                workers, multicrop, without_energy, lambda w: _epoch_items_per_second(today_full, sampler(), w),
                lambda w, energy: _epoch_items_per_second(new_ds, sampler(), w,
                                                          collate_fn=BatchedViewsCollate(batched[energy])))
        ]
        _print_ratio_table(rows, "new: cache + batched (items/s)")
    return {"bundle": str(bundle_path), "items": len(repeated), "batch_size": size, "working_size": int(working_size),
            "cache_fill_s": fill_s, "rows": rows}


def _without_energy_bands(augment: Any) -> Any:
    """The loader benchmarks' second variant: a set-A ``Compose`` without its energy-band transform."""
    from monai.transforms import Compose

    from medssl.transforms import EnergyBandAugmentd

    return Compose([t for t in getattr(augment, "transforms", []) if not isinstance(t, EnergyBandAugmentd)])


def _energy_variant_rows(workers: int, multicrop: Any, without_energy: Any, today: Any, new: Any) -> list[dict]:
    """Today's and the new path's items/s at ``workers`` DataLoader workers, with set A and without its energy bands
    (today's path switched by swapping its multi-crop ``augment``, restored after): one printed row each."""
    original = multicrop.augment
    rows = []
    for variant, with_energy in (("set A", True), ("set A without energy bands", False)):
        multicrop.augment = original if with_energy else without_energy
        try:
            today_rate = today(workers)
        finally:
            multicrop.augment = original
        new_rate = new(workers, with_energy)
        rows.append({"num_workers": workers, "variant": variant, "today": today_rate, "new": new_rate,
                     "ratio": new_rate / today_rate})
        print(f"  num_workers {workers}, {variant}: today {today_rate:.1f} items/s, new {new_rate:.1f} items/s, "
              f"ratio {new_rate / today_rate:.2f}x", flush=True)
    return rows


def _print_ratio_table(rows: list[dict], new_label: str) -> None:
    print()
    print(f"| num_workers | augmentations | today (items/s) | {new_label} | new / today |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['num_workers']} | {row['variant']} | {row['today']:.1f} | {row['new']:.1f} | "
              f"{row['ratio']:.2f}x |")


def _loader_unimiss(parser: Any, bundle_path: Path, config_path: Path, tmp_path: Path, repeat: int,
                    batch_size: int | None, worker_counts: list[int], working_size: int, cache_dir: str | None) -> dict:
    """``loader`` for a UniMiSS bundle (``train#views`` = ``unimiss_views``): one row per ``num_workers`` and spatial
    dimension, over that dimension's training items repeated ``repeat`` times, batched by the bundle's
    ``DimensionAlternatingBatchSampler`` (``batch_size`` / ``batch_size_3d``; ``batch_size`` here replaces the 2D
    one). Today: the bundle's ``train#preprocessing`` per item (decode, preset, ``unimiss_views``). Cache + per-item:
    the same with the decoded front cached on disk (``make_dataset(cache_dir=...)``), to separate the cache's share.
    New: the bundle's ``loading`` + ``UniMiSSWorkingSized(working_size)`` cached on disk, the views made on each
    collated batch by ``BatchedUniMiSSViews`` (train.json's view sizes and 2D scale) in ``UniMiSSViewsCollate``."""
    import warnings

    from monai.transforms import Compose

    from medssl.data import DimensionAlternatingBatchSampler
    from medssl.data.pipeline import make_dataset
    from medssl.transforms import PlainTensord
    from medssl.transforms.batched_unimiss import BatchedUniMiSSViews, UniMiSSViewsCollate, UniMiSSWorkingSized

    items = list(parser.get_parsed_content("train#items"))
    per_item = parser.get_parsed_content("train#preprocessing")
    batched = BatchedUniMiSSViews(
        n_views=int(parser.get_parsed_content("n_views")), size_2d=parser.get_parsed_content("image_size_2d"),
        size_3d=parser.get_parsed_content("volume_size"), scale_2d=parser.get_parsed_content("crop_scale_2d"))
    sizes = {2: int(batch_size) if batch_size is not None else int(parser.get_parsed_content("batch_size")),
             3: int(parser.get_parsed_content("batch_size_3d"))}
    front = Compose(list(parser.get_parsed_content("loading")) + [
        UniMiSSWorkingSized(keys="image", working_size=working_size), PlainTensord(keys="image")])
    cache = Path(cache_dir) if cache_dir else tmp_path / "cache"
    print(f"== data path throughput: bundle {bundle_path.name}, {config_path.name} ({batched.n_views} views: 2D "
          f"{batched.size_2d} scale {batched.scale_2d}, 3D {batched.size_3d}); training items x {repeat} per epoch, "
          f"batches 2D {sizes[2]} / 3D {sizes[3]}; 2D working size {working_size}; main-process torch threads "
          f"{_torch_threads()}", flush=True)
    rows = []
    for dim in (2, 3):
        unique = [it for it in items if int(it.get("dim", 2)) == dim]
        if len(unique) * repeat < sizes[dim]:
            print(f"  {dim}D: {len(unique)} items x {repeat} < one batch of {sizes[dim]}: skipped", flush=True)
            continue
        repeated = [dict(it) for _ in range(repeat) for it in unique]
        new_ds = make_dataset(repeated, front, cache_dir=cache / f"batched_{dim}d", seed_key="seed")
        cached_ds = make_dataset(repeated, per_item, cache_dir=cache / f"per_item_{dim}d")
        started = time.perf_counter()
        for index in range(len(unique)):  # fill both caches once (the repeats are the same entries)
            new_ds[index]
            cached_ds[index]
        fill_s = time.perf_counter() - started
        today_ds = make_dataset(repeated, per_item)

        def sampler() -> Any:
            with warnings.catch_warnings():  # one dimension on purpose: "the epoch is single-dimension"
                warnings.simplefilter("ignore")
                return DimensionAlternatingBatchSampler([dim] * len(repeated), batch_size_2d=sizes[2],
                                                        batch_size_3d=sizes[3], first=dim, seed=0)

        print(f"  {dim}D: {len(unique)} items x {repeat} = {len(repeated)} per epoch; caches filled in {fill_s:.1f} s",
              flush=True)
        for workers in worker_counts:
            today = _epoch_items_per_second(today_ds, sampler(), workers)
            cached = _epoch_items_per_second(cached_ds, sampler(), workers)
            new = _epoch_items_per_second(new_ds, sampler(), workers, collate_fn=UniMiSSViewsCollate(batched))
            rows.append({"num_workers": workers, "variant": f"{dim}D", "today": today, "cached": cached, "new": new,
                         "ratio": new / today, "cache_fill_s": fill_s})
            print(f"  num_workers {workers}, {dim}D: today {today:.1f} items/s, cache + per-item {cached:.1f}, new "
                  f"{new:.1f} items/s, ratio {new / today:.2f}x", flush=True)
    print()
    print("| num_workers | items | today (items/s) | cache + per-item views (items/s) | new: cache + batched (items/s) "
          "| new / today |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['num_workers']} | {row['variant']} | {row['today']:.1f} | {row['cached']:.1f} | "
              f"{row['new']:.1f} | {row['ratio']:.2f}x |")
    return {"bundle": str(bundle_path), "batch_size": sizes[2], "batch_size_3d": sizes[3],
            "working_size": working_size, "rows": rows}


def _loader_joint(parser: Any, bundle_path: Path, config_path: Path, repeat: int, batch_size: int | None,
                  worker_counts: list[int], working_size: int) -> dict:
    """``loader`` for the joint image-volume bundle's stage 1 (``train#volume_transform``,
    bundles/ssl_joint_image_volume_pretrain): its ``train#dataset`` (``bundle_slice_dataset``: every selected slice of
    the training volumes and every 2D image, the preset volumes cached in memory, ``cache_rate``) over the training
    items repeated ``repeat`` times, batched by ``make_slice_batch_sampler``. Today: the config's per-slice
    ``train#view_transform`` (``multicrop_views`` with set A on each crop) in the DataLoader workers. New: the bundle's
    ``configs/batched_views.json`` layered on the config -- each slice resized to ``working_size`` with its seed, the
    views made on the collated batch by its ``batched_views`` (``BatchedMultiCrop``) in ``BatchedViewsCollate``. Two
    rows per ``num_workers``: set A in full, and set A without the energy bands (both paths without them). No disk
    cache: both paths read the same in-memory volume cache, built (and timed) before the measurement."""
    from monai.bundle import ConfigParser

    from medssl.data import make_slice_batch_sampler
    from medssl.data.bundle_datasets import bundle_slice_dataset
    from medssl.transforms.batched import BatchedViewsCollate

    overlay = bundle_path / "configs" / "batched_views.json"
    batched_parser = ConfigParser()
    batched_parser.read_config([str(config_path), str(overlay)])
    for key in ("bundle_root", "dataset_dir", "datalist"):
        batched_parser[key] = parser[key]
    batched_parser["working_size"] = working_size
    batched_parser["device"] = "cpu"

    items = list(parser.get_parsed_content("train#items"))
    repeated = [dict(it) for _ in range(repeat) for it in items]
    size = int(batch_size) if batch_size is not None else int(parser.get_parsed_content("batch_size"))
    slice_kwargs = {"slices_per_volume": parser.get_parsed_content("slices_per_volume"),
                    "cache_rate": parser.get_parsed_content("cache_rate"), "index_key": "index"}
    multicrop = parser.get_parsed_content("train#multicrop")
    original_augment = multicrop.augment
    without_energy = _without_energy_bands(original_augment)
    batched = batched_parser.get_parsed_content("batched_views")
    batched_plain = copy.copy(batched)
    batched_plain.energy = None

    started = time.perf_counter()
    today_ds = bundle_slice_dataset(repeated, parser.get_parsed_content("train#volume_transform"),
                                    parser.get_parsed_content("train#view_transform"), **slice_kwargs)
    new_ds = bundle_slice_dataset(repeated, batched_parser.get_parsed_content("train#volume_transform"),
                                  batched_parser.get_parsed_content("train#view_transform"), **slice_kwargs)
    fill_s = time.perf_counter() - started
    n_volumes = sum(1 for it in items if int(it.get("dim", 2)) == 3)

    def sampler(dataset: Any) -> Any:
        return make_slice_batch_sampler(dataset, size, seed=0)

    groups = " + ".join(f"{count}x{crop}" for count, crop in batched.groups)
    print(f"== data path throughput: bundle {bundle_path.name}, {config_path.name} + {overlay.name} (stage 1, crops "
          f"{groups}, scale {batched.scales[0]}); {len(items)} training items ({n_volumes} volumes cut into slices) x "
          f"{repeat} = {len(today_ds)} samples per epoch, batch {size}; working size {working_size}; volume caches "
          f"built in {fill_s:.1f} s (both paths); main-process torch threads {_torch_threads()}", flush=True)
    rows = [
        row for workers in worker_counts for row in _energy_variant_rows(
            workers, multicrop, without_energy, lambda w: _epoch_items_per_second(today_ds, sampler(today_ds), w),
            lambda w, energy: _epoch_items_per_second(new_ds, sampler(new_ds), w, collate_fn=BatchedViewsCollate(
                batched if energy else batched_plain)))
    ]
    _print_ratio_table(rows, "new: batched (items/s)")
    return {"bundle": str(bundle_path), "items": len(today_ds), "batch_size": size, "working_size": working_size,
            "cache_fill_s": fill_s, "rows": rows}


# --------------------------------------------------------------------------------------------------------------------
# all
# --------------------------------------------------------------------------------------------------------------------


def all_benchmarks(
    size: int = 512,
    repeats: int = 5,
    channels: int = 1,
    goal: float = 3.0,
    bundle: str | None = None,
    config: str = "train.json",
    override: Any = "auto",
    dataset_dir: str | None = None,
    datalist: str | None = None,
    iters: int = 20,
    warmup: int = 2,
    num_workers: Any = (0, 2),
    trainer_id: str = "train#trainer",
    threads: int | None = None,
) -> dict:
    """Both benchmarks in one run: ``energy`` (size, repeats, channels, goal) then ``step`` (the other options;
    by default with ``num_workers`` 0 and 2, compared)."""
    energy_result = energy(size=size, repeats=repeats, channels=channels, goal=goal)
    print()
    step_result = step(
        bundle=bundle,
        config=config,
        override=override,
        dataset_dir=dataset_dir,
        datalist=datalist,
        iters=iters,
        warmup=warmup,
        num_workers=num_workers,
        trainer_id=trainer_id,
        threads=threads,
    )
    return {"energy": energy_result, "step": step_result}


COMMANDS = {"energy": energy, "step": step, "mit": mit, "swav-step": swav_step, "loader": loader,
            "all": all_benchmarks}


def main(argv: Sequence[str] | None = None) -> dict:
    """Command-line entry: ``all`` when no command is named; returns the command's result dict."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or (args[0] not in COMMANDS and args[0] not in ("-h", "--help")):
        args = ["all"] + args
    return run(COMMANDS, args, name="benchmark.py", serialize=lambda result: None)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
