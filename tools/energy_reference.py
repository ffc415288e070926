"""Estimate the per-modality reference band energies of Ghesu et al.'s energy-based augmentation (2022).

    python tools/energy_reference.py --datalist F [--out ref.json] [--section training] [--dataset-dir D]
        [--max-items-per-modality 1000] [--seed 0] [--channels 1] [--sigma-unit relative] [--skip-bad True]

Loads the items of one datalist section the way training does (medssl.data.LoadMedicalImaged, then the modality
intensity preset medssl.data.ModalityIntensityd, optionally medssl.data.EnsureChannelsd), takes up to R items per
modality (a seeded random subset; R = 1000 in Ghesu et al.), measures each image's band energies over the whole image
and writes the mean and std per band and modality (medssl.transforms.energy.estimate_reference_energies) to a JSON file,
by default ``energy_reference.json`` next to the datalist. ``EnergyBandAugmentd(reference=FILE)`` loads it; the
decomposition settings (sigmas, sigma unit, border mode) must match the transform's and are recorded in the file.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from medssl.cli import run
from medssl.data.datalist import load_datalist


def select_items(items: Sequence[dict], max_items_per_modality: int, seed: int) -> dict[str, list[dict]]:
    """Up to ``max_items_per_modality`` items per modality: a seeded random subset, kept in datalist order."""
    by_modality: dict[str, list[dict]] = {}
    for item in items:
        by_modality.setdefault(str(item["modality"]), []).append(item)
    rng = np.random.RandomState(seed)
    selected = {}
    for modality in sorted(by_modality):
        group = by_modality[modality]
        if len(group) > max_items_per_modality:
            keep = np.sort(rng.choice(len(group), size=max_items_per_modality, replace=False))
            group = [group[i] for i in keep]
        selected[modality] = group
    return selected


def estimate(
    datalist: str,
    out: str | None = None,
    section: str = "training",
    dataset_dir: str | None = None,
    max_items_per_modality: int = 1000,
    seed: int = 0,
    channels: int | None = None,
    sigmas: Sequence[float] | None = None,
    sigma_unit: str = "relative",
    mode: str = "reflect",
    skip_bad: bool = True,
    progress_every: int = 50,
) -> dict:
    """Estimate reference energies and write them as JSON; returns the written dict.

    Args:
        datalist: datalist JSON file.
        out: output JSON file (default: ``energy_reference.json`` in the datalist's folder).
        section: datalist section to read ("training", "validation" or "test").
        dataset_dir: directory that relative image paths are resolved against (default: the datalist's rule).
        max_items_per_modality: R, the most images used per modality (seeded random subset when there are more).
        seed: seed of that subset.
        channels: convert images to 1 (grey) or 3 (RGB) channels first, as the training pipeline does; None = as read.
        sigmas: σ of the Gaussian cascade (default: medssl.transforms.energy.DEFAULT_SIGMAS).
        sigma_unit: "relative" (default), "voxel" or "mm"; see medssl.transforms.energy.image_spacing_for_sigmas.
        mode: border mode of the Gaussian filters.
        skip_bad: print and skip items that cannot be read (default); False: stop at the first one.
        progress_every: print a progress line every this many images.
    """
    from medssl.data.presets import ModalityIntensityd
    from medssl.data.readers import EnsureChannelsd, ImageReadError, LoadMedicalImaged
    from medssl.transforms.energy import DEFAULT_SIGMAS, estimate_reference_energies

    if int(max_items_per_modality) < 1:
        raise ValueError(f"--max-items-per-modality must be >= 1, got {max_items_per_modality}")
    datalist_path = Path(datalist)
    items = load_datalist(datalist_path, section=section, dataset_dir=dataset_dir)
    if not items:
        raise ValueError(f"{datalist_path}: section {section!r} has no items")
    selected = select_items(items, int(max_items_per_modality), int(seed))
    total = sum(len(group) for group in selected.values())
    print(
        f"{datalist_path} [{section}]: {len(items)} items; using {total}: "
        + ", ".join(f"{m} {len(g)}" for m, g in selected.items()),
        flush=True,
    )

    steps = [LoadMedicalImaged(keys="image"), ModalityIntensityd(keys="image")]
    if channels is not None:
        steps.append(EnsureChannelsd(keys="image", channels=int(channels)))
    skipped: list[str] = []
    start_time = time.monotonic()

    def loaded() -> Iterator[dict]:
        done = 0
        for modality, group in selected.items():
            for item in group:
                sample = {"image": item["image"], "modality": modality, "dim": item.get("dim")}
                try:
                    for step in steps:
                        sample = step(sample)
                except (ImageReadError, ValueError, OSError) as err:
                    if not skip_bad:
                        raise
                    skipped.append(f"{item['image']}: {err}")
                    print(f"  skipped {item['image']}: {err}", flush=True)
                    continue
                done += 1
                if progress_every and (done % int(progress_every) == 0 or done == total):
                    elapsed = time.monotonic() - start_time
                    print(f"  {done}/{total} images ({modality}), {elapsed:.1f} s", flush=True)
                yield sample

    reference = estimate_reference_energies(
        loaded(), sigmas=DEFAULT_SIGMAS if sigmas is None else sigmas, sigma_unit=sigma_unit, mode=mode
    )
    if not reference["modalities"]:
        raise ValueError(f"{datalist_path}: no image of section {section!r} could be read ({len(skipped)} skipped)")
    reference["datalist"] = str(datalist_path)
    reference["section"] = section
    reference["max_items_per_modality"] = int(max_items_per_modality)
    reference["seed"] = int(seed)
    if skipped:
        reference["skipped"] = skipped

    out_path = Path(out) if out is not None else datalist_path.parent / "energy_reference.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(reference, indent=2) + "\n", encoding="utf-8")

    bands = reference["bands"]
    print(f"wrote {out_path} ({time.monotonic() - start_time:.1f} s, {len(skipped)} skipped)")
    print("band energies, mean ± std over the images")
    print(f"{'modality':8s} {'n':>6s}" + "".join(f"{name:>20s}" for name in bands))
    for modality, stats in reference["modalities"].items():
        cells = "".join(f"{f'{m:.4g} ± {s:.2g}':>20s}" for m, s in zip(stats["mean"], stats["std"]))
        print(f"{modality:8s} {stats['n']:6d}{cells}")
    return reference


if __name__ == "__main__":
    run(estimate, serialize=lambda result: None)  # the summary is printed; don't dump the returned dict
