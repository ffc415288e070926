"""Build a one-modality "lesion shape" check set, independent of the demo generator: is a setting learning, or
only fitting ``tools/demo_data.py``'s images?

Usage:
    python tools/lesion_shapes.py --out DIR [--preset easy|hard] [--seed 0] [--per_class 300,100,100]

Each 128 x 128 grey PNG holds one lesion on a smooth textured background with a random intensity gradient and
noise; the class is the lesion's shape: ``disc``, ``square`` or ``triangle`` (labels 0, 1, 2; random size,
rotation, position, polarity and contrast). ``easy``: lesion radius 16-30 px, contrast 0.25-0.45, background
texture std 0.03-0.08; ``hard``: radius 9-20 px, contrast 0.15-0.35, texture 0.05-0.12. Every image is modality
``--modality`` (XR). ``DIR/datalist.json`` (medssl's datalist format, sections training / validation / test, per
class the counts of ``--per_class``) points at ``DIR/img/*.png``. The same seed gives byte-identical files.

Chance is 1/3. The demo generator's classes (nodules, effusion, exudates, ...) are anatomical; these are not, and
no default of medssl was tuned on them: the bundles' docs report what their demo settings reach here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from medssl.cli import run

CLASSES = ("disc", "square", "triangle")
SIZE = 128
PRESETS = {  # lesion radius (px), lesion contrast, background texture std
    "easy": {"radius": (16.0, 30.0), "contrast": (0.25, 0.45), "texture": (0.03, 0.08), "centre": (40.0, 88.0)},
    "hard": {"radius": (9.0, 20.0), "contrast": (0.15, 0.35), "texture": (0.05, 0.12), "centre": (32.0, 96.0)},
}


def _check_preset(preset: str) -> str:
    if preset not in PRESETS:
        raise ValueError(f"lesion_shapes: --preset must be one of {sorted(PRESETS)}, got {preset!r}")
    return preset


def lesion_image(rng: np.random.Generator, class_index: int, preset: str = "easy") -> np.ndarray:
    """One (128, 128) uint8 image whose lesion has the shape ``CLASSES[class_index]``."""
    if not 0 <= class_index < len(CLASSES):
        raise ValueError(f"lesion_shapes: class_index {class_index} outside 0..{len(CLASSES) - 1}")
    p = PRESETS[_check_preset(preset)]
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    texture = ndimage.gaussian_filter(rng.normal(size=(SIZE, SIZE)), rng.uniform(6, 14))
    texture *= rng.uniform(*p["texture"]) / (texture.std() + 1e-6)
    gx, gy = rng.uniform(-0.15, 0.15, 2)
    image = 0.45 + texture + gx * (xx / SIZE - 0.5) + gy * (yy / SIZE - 0.5)
    radius = rng.uniform(*p["radius"])
    cx, cy = rng.uniform(*p["centre"], 2)
    turn = rng.uniform(0.0, 2.0 * math.pi)
    u = (xx - cx) * math.cos(turn) + (yy - cy) * math.sin(turn)
    v = -(xx - cx) * math.sin(turn) + (yy - cy) * math.cos(turn)
    if class_index == 0:
        distance = np.hypot(u, v) - radius
    elif class_index == 1:
        distance = np.maximum(np.abs(u), np.abs(v)) - 0.85 * radius
    else:  # equilateral triangle: the largest of three half-plane distances
        distance = np.max([u * math.cos(a) + v * math.sin(a) for a in (0.0, 2 * math.pi / 3, 4 * math.pi / 3)], 0)
        distance = distance - 0.6 * radius
    mask = 1.0 / (1.0 + np.exp(np.clip(distance / 1.2, -50, 50)))
    image = image + rng.choice([-1.0, 1.0]) * rng.uniform(*p["contrast"]) * mask
    image = image + rng.normal(0.0, rng.uniform(0.01, 0.05), (SIZE, SIZE))
    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


def build(out: str, preset: str = "easy", seed: int = 0, per_class: str | tuple = "300,100,100",
          modality: str = "XR") -> str:
    """Write the images and ``datalist.json`` under ``out``; returns the datalist's path."""
    counts = [int(c) for c in (per_class.split(",") if isinstance(per_class, str) else per_class)]
    if len(counts) != 3 or any(c < 0 for c in counts):
        raise ValueError(f"lesion_shapes: --per_class needs 3 counts >= 0 (training, validation, test), got {per_class!r}")
    rng = np.random.default_rng([int(seed), sorted(PRESETS).index(_check_preset(preset))])
    root = Path(out)
    (root / "img").mkdir(parents=True, exist_ok=True)
    datalist = {
        "name": f"medssl-lesion-shapes-{preset}",
        "description": f"one-modality lesion-shape check set (tools/lesion_shapes.py, preset {preset}, seed {seed}); "
        "label = lesion shape, chance 1/3",
        "classes": list(CLASSES),
        "training": [], "validation": [], "test": [],
    }
    k = 0
    for section, n in zip(("training", "validation", "test"), counts):
        for _ in range(n):
            for label in range(len(CLASSES)):
                path = f"img/shape_{k:05d}.png"
                Image.fromarray(lesion_image(rng, label, preset)).save(root / path)
                datalist[section].append({"image": path, "modality": modality, "dim": 2, "label": label})
                k += 1
    path = root / "datalist.json"
    path.write_text(json.dumps(datalist, indent=1))
    print(f"lesion_shapes: {k} images ({preset}, seed {seed}) and {path}")
    return str(path)


def main(out: str, preset: str = "easy", seed: int = 0, per_class: str = "300,100,100", modality: str = "XR") -> None:
    """See the module docstring."""
    build(out, preset, seed, per_class, modality)


if __name__ == "__main__":
    run(main, name="lesion_shapes.py")
