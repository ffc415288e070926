"""Demo data v3, the learnability set: class-labelled synthetic 2D images and 3D volumes whose class cue is
anatomical shape or texture, for measuring whether self-supervised pretraining learns anything.

Written by :func:`build_learnability_set` under ``DIR/learn/`` (``medssl.data.demo.build_demo_dataset`` calls it;
see ``DEMO_DATA.md``). Five modalities, three classes each (:data:`LEARN_CLASSES`):

- ``XR`` chest radiographs: ``normal`` / ``nodules`` (2-7 round opacities in both lungs) / ``effusion`` (basal
  opacity with a lateral meniscus, one or both sides);
- ``FUNDUS`` colour fundus photographs: ``normal`` / ``exudates`` (clusters of small bright yellow spots) /
  ``haemorrhages`` (scattered dark-red blots);
- ``PATH`` H&E tiles: ``round_nuclei`` (sheets of round nuclei) / ``spindle_cells`` (elongated nuclei in aligned
  fascicles) / ``glands`` (white lumens lined by a ring of nuclei);
- ``CT`` chest volumes (Hounsfield units): ``normal`` / ``nodules`` (3-7 spheres in the lungs) / ``linear_lesions``
  (3-6 thick bands, scar- or plate-atelectasis-like, of the nodules' density);
- ``MR`` brain volumes (T1-, T2- or FLAIR-like): ``normal`` / ``multifocal_lesions`` (8-16 small ovoid white-matter
  foci) / ``mass`` (one large lesion with a necrotic core and oedema).

Every class draws its nuisances from the same distributions -- global intensity, gamma and contrast, noise level,
blur, anatomy size, pose and position, background texture, stain or pigment colour -- and the lesions vary in
number, size, position and density, so the class is carried by shape and texture and not by brightness, contrast,
size or position (which a random network separates without learning anything). The cues are a few pixels wide at
128 px (voxels at 64^3) and spread over the image, so they survive 64-px resizing after crops of 30-40 % of the image
(64 x 64 x 16 for volumes), gamma / linear intensity changes and band-energy changes.

Labels: ONE label space for the whole set, a flat list of 15 class names (``"classes"``, the format every medssl tool
reads) with a disjoint range per modality -- XR 0-2, FUNDUS 3-5, PATH 6-8, CT 9-11, MR 12-14
(:data:`LABEL_OFFSETS`; ``"modality_classes"`` in the datalists gives the names per modality). Classify within one
modality (``medssl.data.load_items(..., modalities=["XR"])``): chance is 1/3.

Determinism: item ``i`` of modality group ``g`` draws everything from ``numpy.random.default_rng(SeedSequence([seed,
g, i]))``; PNG (pillow) and NIfTI (nibabel, gzip header time 0) writers embed no time stamps, so two builds with the
same seed are byte-identical. Only numpy, scipy.ndimage, pillow and nibabel are used (no ``torch``). The check that
the set is not trivially separable (kNN of raw pixels and of randomly initialised encoders) is
:mod:`medssl.evaluation.random_init`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from .demo.catalogue import DEMO_VERSION
from .demo.generators import _rng, _sigmoid, _smooth_noise, _to_uint8, rib_cage
from .demo.writers import _ras_affine, _save_nifti

__all__ = [
    "LEARN_CLASSES",
    "LABEL_OFFSETS",
    "LEARN_DATALISTS",
    "PER_CLASS_2D",
    "PER_CLASS_3D",
    "LEARN_SHAPE_3D",
    "learn_chest_xr",
    "learn_fundus",
    "learn_histology",
    "learn_chest_ct",
    "learn_brain_mr",
    "build_learnability_set",
    "learn_builder_info",
    "learn_datalists",
    "LEARN_DIMS",
]

#: Class names per modality (``label - LABEL_OFFSETS[modality]`` indexes them).
LEARN_CLASSES: dict[str, tuple[str, str, str]] = {
    "XR": ("normal", "nodules", "effusion"),
    "FUNDUS": ("normal", "exudates", "haemorrhages"),
    "PATH": ("round_nuclei", "spindle_cells", "glands"),
    "CT": ("normal", "nodules", "linear_lesions"),
    "MR": ("normal", "multifocal_lesions", "mass"),
}
#: First label of each modality in the flat label space (``"classes"`` of the learn datalists).
LABEL_OFFSETS: dict[str, int] = {"XR": 0, "FUNDUS": 3, "PATH": 6, "CT": 9, "MR": 12}
#: The datalists written next to ``datalist.json``: file name -> which learn items they hold.
LEARN_DATALISTS = {
    "datalist_learn.json": "all learnability items (2D and 3D)",
    "datalist_learn_2d.json": "the 2D learnability items (XR, FUNDUS, PATH)",
    "datalist_learn_3d.json": "the 3D learnability volumes (CT, MR)",
}
#: Items per class and section (training, validation, test): 2D per modality, 3D per modality.
PER_CLASS_2D = (240, 50, 50)  # x 3 classes x 3 modalities = 3,060 images
PER_CLASS_3D = (50, 15, 15)  # x 3 classes x 2 modalities = 480 volumes
LEARN_SIZE_2D = 128
LEARN_SHAPE_3D = (64, 64, 64)
SECTIONS = ("training", "validation", "test")
# random-stream groups (disjoint from those of medssl.data.demo, 1-9)
_GROUPS = {"XR": 21, "FUNDUS": 22, "PATH": 23, "CT": 24, "MR": 25}
_SPACING = {"CT": (5.5, 5.5, 5.0), "MR": (3.2, 3.6, 3.2)}


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _blur(array: np.ndarray, sigma: float | Sequence[float]) -> np.ndarray:
    return ndimage.gaussian_filter(array, sigma, mode="nearest", truncate=3.0)


def _grid2(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(v, u) float32 coordinates in [-1, 1] of a size x size image; v = row (down), u = column (right)."""
    axis = ((np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0).astype(np.float32)
    return axis[:, None] + np.zeros((1, size), np.float32), axis[None, :] + np.zeros((size, 1), np.float32)


def _noise_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std correlated noise (Gaussian-filtered white noise, correlation length ``sigma`` px; through
    the FFT, periodic, when ``sigma`` > 3)."""
    if sigma > 3.0:
        return _smooth_noise(rng, shape, sigma).astype(np.float32)
    field = _blur(rng.standard_normal(shape, dtype=np.float32), sigma)
    return (field - field.mean()) / (field.std() + 1e-6)


def _splat_ellipses(
    shape: tuple[int, int],
    rows: np.ndarray,
    cols: np.ndarray,
    along: np.ndarray,
    across: np.ndarray,
    angle: np.ndarray,
    edge: float = 0.8,
) -> np.ndarray:
    """Max-composite of soft-edged filled ellipses, all at once (no per-ellipse Python loop).

    Ellipse ``i`` is centred at (``rows[i]``, ``cols[i]``) px with semi-axes ``along[i]`` (in direction ``angle[i]``,
    radians from the row axis) and ``across[i]`` px; its edge ramps from 1 to 0 over about ``2 * edge`` px.
    Returns an (H, W) float32 map in [0, 1].
    """
    canvas = np.zeros(shape, dtype=np.float32)
    if len(rows) == 0:
        return canvas
    half = int(math.ceil(float(np.max(np.maximum(along, across))) + 2 * edge))
    offsets = np.arange(-half, half + 1)
    base_r, base_c = np.floor(rows).astype(int), np.floor(cols).astype(int)
    pr = base_r[:, None, None] + offsets[None, :, None]  # (N, K, 1)
    pc = base_c[:, None, None] + offsets[None, None, :]  # (N, 1, K)
    dr, dc = pr - rows[:, None, None], pc - cols[:, None, None]
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    a, b = along[:, None, None], across[:, None, None]
    u, w = dr * cos + dc * sin, -dr * sin + dc * cos
    radius = np.sqrt((u / a) ** 2 + (w / b) ** 2)  # 1 on the boundary
    value = np.clip(0.5 + (1.0 - radius) * np.minimum(a, b) / (2 * edge), 0.0, 1.0).astype(np.float32)
    pr, pc = np.broadcast_to(pr, value.shape), np.broadcast_to(pc, value.shape)
    keep = (pr >= 0) & (pr < shape[0]) & (pc >= 0) & (pc < shape[1]) & (value > 0)
    np.maximum.at(canvas, (pr[keep], pc[keep]), value[keep])
    return canvas


def _ellipse_points(rng: np.random.Generator, n: int, centre, radii, inner: float = 0.8):
    """``n`` points uniformly inside an ellipse of the given centre / radii, shrunk by ``inner``."""
    rho = inner * np.sqrt(rng.uniform(0.0, 1.0, n))
    phi = rng.uniform(0.0, 2 * math.pi, n)
    return centre[0] + radii[0] * rho * np.cos(phi), centre[1] + radii[1] * rho * np.sin(phi)


# --------------------------------------------------------------------------------------------------
# 2D generators (128 x 128)
# --------------------------------------------------------------------------------------------------
def learn_chest_xr(rng: np.random.Generator, class_index: int, size: int = LEARN_SIZE_2D) -> np.ndarray:
    """A chest-radiograph-like image (H, W) uint8 of class ``LEARN_CLASSES["XR"][class_index]``.

    Anatomy (all classes, every parameter random): torso, two lung fields with domed bases of unequal height,
    heart, spine / mediastinum, posterior ribs, clavicles, lung markings, optional breast shadows, a heel-effect
    gradient; random rotation, scale and shift, gamma, blur and noise. ``nodules``: 2-7 round opacities of radius
    2.5-6 px and variable density anywhere in both lungs; ``effusion``: a basal opacity with a meniscus rising
    laterally, in one lung (60 %) or both, of variable height.
    """
    if not 0 <= class_index < 3:
        raise ValueError(f"class_index {class_index} outside 0..2 ({LEARN_CLASSES['XR']})")
    v, u = _grid2(size)
    turn = rng.uniform(-0.08, 0.08)
    scale = rng.uniform(0.82, 1.05)
    shift_u, shift_v = rng.uniform(-0.08, 0.08, 2)
    u, v = (
        ((u - shift_u) * math.cos(turn) + (v - shift_v) * math.sin(turn)) / scale,
        (-(u - shift_u) * math.sin(turn) + (v - shift_v) * math.cos(turn)) / scale,
    )
    px = 2.0 / size / scale
    soft = lambda d: _sigmoid(-d / (1.5 * px))  # noqa: E731 - soft inside indicator of a signed distance

    torso = soft(np.sqrt((u / rng.uniform(0.85, 1.0)) ** 2 + ((v - 0.2) / 1.25) ** 2) - 1.0)
    image = 0.1 + 0.45 * torso
    lungs = np.zeros_like(u)
    lung_shapes = []
    for side in (-1.0, 1.0):
        cu = side * rng.uniform(0.36, 0.46)
        cv = rng.uniform(-0.14, 0.0)
        ru, rv = rng.uniform(0.24, 0.32), rng.uniform(0.5, 0.64)
        dome = rng.uniform(0.08, 0.16)
        base_shift = rng.uniform(0.62, 0.85)
        base = cv + rv * base_shift - dome * ((u - cu) / ru) ** 2
        lung = soft(np.sqrt(((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2) - 1.0) * soft((v - base) / 0.6)
        lung_shapes.append((lung, cu, cv, ru, rv, base_shift, dome))
        lungs = np.maximum(lungs, lung)
    image = image - rng.uniform(0.26, 0.36) * lungs
    heart = soft(np.sqrt(((u - 0.1) / rng.uniform(0.22, 0.34)) ** 2 + ((v - 0.3) / rng.uniform(0.2, 0.28)) ** 2) - 1)
    image = image + rng.uniform(0.16, 0.26) * heart * (0.3 + lungs)
    image = image + 0.18 * soft(np.abs(u) - rng.uniform(0.08, 0.12)) * torso  # spine and mediastinum
    spacing, start = rng.uniform(0.16, 0.21), rng.uniform(-0.8, -0.68)
    ribs, clavicles = rib_cage(rng, u, v, torso, soft, spacing, start)
    image = image + rng.uniform(0.04, 0.12) * ribs + 0.14 * clavicles * torso
    markings = _noise_field(rng, u.shape, rng.uniform(1.0, 2.0))
    image = image + rng.uniform(0.01, 0.07) * markings * lungs
    if rng.random() < 0.5:  # breast / pectoral soft-tissue shadows over the lower lateral fields
        for side in (-1.0, 1.0):
            shadow = soft(np.sqrt(((u - side * 0.5) / 0.38) ** 2 + ((v - 0.45) / 0.3) ** 2) - 1.0)
            image = image + rng.uniform(0.02, 0.08) * shadow * torso

    if class_index == 1:  # nodules
        for _ in range(int(rng.integers(2, 8))):
            lung, cu, cv, ru, rv, base_shift, dome = lung_shapes[int(rng.integers(0, 2))]
            nu, nv = _ellipse_points(rng, 1, (cu, cv), (ru, rv * min(1.0, 0.5 + 0.5 * base_shift)), inner=0.75)
            radius = rng.uniform(0.045, 0.09)
            distance = np.sqrt((u - nu[0]) ** 2 + (v - nv[0]) ** 2)
            image = image + rng.uniform(0.1, 0.28) * np.exp(-0.5 * (distance / (0.65 * radius)) ** 4) * (0.3 + lung)
    elif class_index == 2:  # effusion
        sides = [int(rng.integers(0, 2))] if rng.random() < 0.6 else [0, 1]
        for s in sides:
            lung, cu, cv, ru, rv, base_shift, dome = lung_shapes[s]
            level = cv + rv * (base_shift - rng.uniform(0.3, 0.7))
            rise = rng.uniform(0.25, 0.5)
            meniscus = level - rise * np.maximum(np.abs(u - cu) - 0.2 * ru, 0.0) * np.sign(u - cu) * np.sign(cu)
            fluid = lung * soft((meniscus - v) / 0.8)
            image = image + rng.uniform(0.18, 0.32) * fluid * (1.0 - 0.7 * heart)

    image = image + rng.uniform(-0.08, 0.08) * v + rng.uniform(-0.05, 0.05) * u  # heel effect / positioning
    image = _blur(image, rng.uniform(0.5, 1.3))
    image = image + rng.uniform(0.004, 0.04) * rng.standard_normal(image.shape)
    image = np.clip(image, 0.0, 1.0) ** rng.uniform(0.65, 1.5)
    low, high = np.percentile(image, [0.5, 99.5])
    image = (image - low) / max(high - low, 1e-6) * rng.uniform(0.6, 0.95) + rng.uniform(0.0, 0.1)
    return _to_uint8(image)


def _vessel_tree(rng: np.random.Generator, size: int, disc_rc: tuple[float, float], side: float) -> np.ndarray:
    """(H, W) map in [0, 1] of a retinal vessel tree: four arcades leaving the disc, each with random branches."""
    rows, cols, widths = [], [], []
    todo = [(disc_rc[0], disc_rc[1], sign * math.pi / 2 + side * turn, rng.uniform(1.1, 1.5), size * 0.95, 0)
            for sign in (1.0, -1.0) for turn in (-sign * rng.uniform(0.4, 0.8), sign * rng.uniform(1.7, 2.1))]
    while todo:
        r0, c0, angle, width, length, depth = todo.pop()
        n = max(int(length / 1.0), 2)
        angles = angle + np.cumsum(rng.normal(0.0, 0.07, n)) - 0.012 * side * np.arange(n) * np.sign(math.cos(angle))
        r = r0 + np.cumsum(np.sin(angles))
        c = c0 + np.cumsum(np.cos(angles))
        w = width * np.linspace(1.0, 0.6, n)
        inside = (r >= 0) & (r < size) & (c >= 0) & (c < size)
        stop = int(np.argmin(inside)) if not inside.all() else n
        rows.append(r[:stop]), cols.append(c[:stop]), widths.append(w[:stop])
        if depth < 2 and stop > 10:
            for k in rng.integers(5, stop, size=int(rng.integers(1, 4))):
                turn = rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 1.0)
                todo.append((r[k], c[k], angles[k] + turn, w[k] * 0.75, length * 0.45, depth + 1))
    r, c, w = np.concatenate(rows), np.concatenate(cols), np.concatenate(widths)
    return _splat_ellipses((size, size), r, c, w, w, np.zeros_like(w), edge=0.5)


def learn_fundus(rng: np.random.Generator, class_index: int, size: int = LEARN_SIZE_2D) -> np.ndarray:
    """A colour-fundus-like photograph (H, W, 3) uint8 of class ``LEARN_CLASSES["FUNDUS"][class_index]``.

    All classes: circular field of random size and position, random pigmentation (colour and brightness),
    vignetting, choroidal texture, optic disc of random size, darker macula, a random vessel tree, an optional
    sheen of light reflexes, random blur and noise. ``exudates``: 1-4 clusters of 3-10 sharp bright-yellow spots
    (radius 1-3 px) around the posterior pole; ``haemorrhages``: 3-12 dark-red blots (radius 2-5 px, round to
    oval) scattered over the retina.
    """
    if not 0 <= class_index < 3:
        raise ValueError(f"class_index {class_index} outside 0..2 ({LEARN_CLASSES['FUNDUS']})")
    v, u = _grid2(size)
    centre_u, centre_v = rng.uniform(-0.05, 0.05, 2)
    radius = rng.uniform(0.86, 0.98)
    field = np.hypot(u - centre_u, v - centre_v) / radius
    side = float(rng.choice([-1.0, 1.0]))
    disc_u, disc_v = centre_u + side * rng.uniform(0.35, 0.5), centre_v + rng.uniform(-0.1, 0.1)
    colour = np.array([rng.uniform(0.7, 0.95), rng.uniform(0.28, 0.45), rng.uniform(0.08, 0.2)])
    brightness = rng.uniform(0.65, 1.1)
    vignette = np.clip(1.0 - rng.uniform(0.3, 0.6) * field**2, 0.0, 1.0)
    texture = 1.0 + rng.uniform(0.02, 0.15) * _noise_field(rng, (size, size), rng.uniform(1.5, 4.0))
    shade = (vignette * texture * brightness).astype(np.float32)
    macula_u = disc_u - side * rng.uniform(0.45, 0.6)
    macula = np.exp(-((u - macula_u) ** 2 + (v - disc_v) ** 2) / rng.uniform(0.02, 0.04))
    shade = shade * (1.0 - rng.uniform(0.2, 0.4) * macula)
    rgb = shade[..., None] * colour
    disc_rc = ((disc_v + 1) * size / 2, (disc_u + 1) * size / 2)
    vessels = _vessel_tree(rng, size, disc_rc, side)
    vessel_colour = np.array([0.45, 0.06, 0.04]) * shade[..., None]
    alpha = rng.uniform(0.5, 0.8) * vessels[..., None]
    rgb = rgb * (1.0 - alpha) + alpha * vessel_colour
    if rng.random() < 0.5:  # sheen of light reflexes along the arcades (young retinas)
        sheen = _noise_field(rng, (size, size), 1.2) > 1.6
        sheen = _blur(sheen.astype(np.float32), 0.7) * np.exp(-(((u - disc_u) ** 2 + (v - disc_v) ** 2) / 0.3))
        rgb = rgb + rng.uniform(0.1, 0.3) * sheen[..., None]
    disc_r = rng.uniform(0.09, 0.14)
    disc = _sigmoid((disc_r - np.hypot(u - disc_u, v - disc_v)) / 0.012)[..., None]
    rgb = rgb * (1.0 - disc) + disc * np.array([1.0, 0.85, 0.6]) * rng.uniform(0.8, 1.0)

    if class_index == 1:  # exudates: clusters of small bright spots
        pr, pc, pa, pb = [], [], [], []
        for _ in range(int(rng.integers(1, 5))):
            cu, cv = _ellipse_points(rng, 1, (macula_u * 0.7, disc_v), (0.55, 0.55), inner=1.0)
            n = int(rng.integers(3, 11))
            spread = rng.uniform(0.05, 0.14)
            pr.append((cv + rng.normal(0, spread, n) + 1) * size / 2)
            pc.append((cu + rng.normal(0, spread, n) + 1) * size / 2)
            pa.append(rng.uniform(1.0, 3.0, n))
            pb.append(pa[-1] * rng.uniform(0.7, 1.0, n))
        a = np.concatenate(pa)
        spots = _splat_ellipses((size, size), np.concatenate(pr), np.concatenate(pc), a, np.concatenate(pb),
                                rng.uniform(0, math.pi, len(a)), edge=0.5)
        spots = spots * rng.uniform(0.6, 0.95)
        rgb = rgb * (1.0 - spots[..., None]) + spots[..., None] * np.array([0.98, 0.9, 0.5])
    elif class_index == 2:  # haemorrhages: dark-red blots
        n = int(rng.integers(3, 13))
        cu, cv = _ellipse_points(rng, n, (centre_u, centre_v), (radius, radius), inner=0.8)
        a = rng.uniform(2.0, 5.0, n)
        b = a / rng.uniform(1.0, 1.8, n)
        blots = _splat_ellipses((size, size), (cv + 1) * size / 2, (cu + 1) * size / 2, a, b,
                                rng.uniform(0, math.pi, n), edge=0.7)
        blots = blots * rng.uniform(0.6, 0.95)
        rgb = rgb * (1.0 - blots[..., None]) + blots[..., None] * np.array([0.3, 0.03, 0.02]) * shade[..., None]

    rgb = _blur(rgb, (rng.uniform(0.4, 1.0),) * 2 + (0.0,))
    rgb = rgb + rng.uniform(0.005, 0.04) * rng.standard_normal(rgb.shape)
    rgb = rgb * _sigmoid((1.0 - field) / 0.01)[..., None]
    return _to_uint8(rgb)


def learn_histology(rng: np.random.Generator, class_index: int, size: int = LEARN_SIZE_2D) -> np.ndarray:
    """An H&E-like tile (H, W, 3) uint8 of class ``LEARN_CLASSES["PATH"][class_index]``.

    All classes: eosin stroma with a fibre texture of random orientation, random stain colours and strengths,
    0-3 empty clear spaces (fat / tissue tears), nuclei of one random size scale (radius 3-4 px) and density
    (22-38 % of the tile), 20 % of them of the other nuclear kind (round / spindle), random blur and noise.
    ``round_nuclei``: round to slightly oval nuclei in random
    positions; ``spindle_cells``: nuclei of the same area but 2.5-4 times longer than wide, aligned along a smooth
    flow field (fascicles); ``glands``: 2-5 white lumens, each lined by a ring of nuclei, the rest scattered.
    """
    if not 0 <= class_index < 3:
        raise ValueError(f"class_index {class_index} outside 0..2 ({LEARN_CLASSES['PATH']})")
    shape = (size, size)
    v, u = _grid2(size)
    fibre_angle = rng.uniform(0, math.pi)
    fibres = _blur(rng.standard_normal(shape).astype(np.float32), (0.8, 3.5))
    fibres = ndimage.rotate(fibres, math.degrees(fibre_angle), reshape=False, order=1, mode="reflect")
    fibres = fibres / (fibres.std() + 1e-6)
    eosin = np.clip(rng.uniform(0.4, 0.7) + rng.uniform(0.08, 0.2) * fibres
                    + 0.1 * _noise_field(rng, shape, 8.0), 0.0, 1.0)
    clear = np.zeros(shape, dtype=np.float32)
    for _ in range(int(rng.integers(0, 4))):  # clear spaces of every class
        cr, cc = rng.uniform(0, size, 2)
        ra, rb = rng.uniform(4, 12, 2)
        clear = np.maximum(clear, _splat_ellipses(shape, np.array([cr]), np.array([cc]), np.array([ra]),
                                                  np.array([rb]), np.array([rng.uniform(0, math.pi)]), edge=1.0))
    radius = rng.uniform(3.0, 4.0)  # nuclear size scale (px): area pi r^2 for every kind of nucleus
    density = rng.uniform(0.22, 0.38)  # fraction of the tile covered by nuclei
    n = int(density * size * size / (math.pi * radius**2))
    kinds = np.full(n, class_index)
    mixed = rng.random(n) < 0.2
    kinds[mixed] = 1 - class_index if class_index < 2 else rng.integers(0, 2, size=int(mixed.sum()))
    rows, cols = rng.uniform(0, size, n), rng.uniform(0, size, n)
    area_r = radius * rng.uniform(0.8, 1.2, n)
    aspect = np.where(kinds == 1, rng.uniform(2.5, 4.0, n), rng.uniform(1.0, 1.35, n))
    along, across = area_r * np.sqrt(aspect), area_r / np.sqrt(aspect)
    angle = rng.uniform(0, math.pi, n)
    flow = _noise_field(rng, shape, 14.0) * rng.uniform(0.6, 1.2) + rng.uniform(0, math.pi)  # fascicle directions
    spindle = kinds == 1
    angle[spindle] = flow[rows[spindle].astype(int), cols[spindle].astype(int)] + rng.normal(0, 0.15, spindle.sum())
    lumen = np.zeros(shape, dtype=np.float32)
    if class_index == 2:
        n_glands = int(rng.integers(2, 6))
        gland_nuclei = np.flatnonzero(kinds == 2)
        used = 0
        for g in range(n_glands):
            gr, gc = rng.uniform(0.12, 0.88, 2) * size
            ga, gb = rng.uniform(6.0, 12.0), rng.uniform(6.0, 12.0)
            gt = rng.uniform(0, math.pi)
            lumen = np.maximum(lumen, _splat_ellipses(shape, np.array([gr]), np.array([gc]), np.array([ga]),
                                                      np.array([gb]), np.array([gt]), edge=1.0))
            perimeter = math.pi * (ga + gb) + 2 * math.pi * radius
            count = min(int(perimeter / (2.0 * radius * 0.9)), len(gland_nuclei) - used)
            if count <= 0:
                break
            chosen = gland_nuclei[used : used + count]
            used += count
            t = np.linspace(0, 2 * math.pi, count, endpoint=False) + rng.uniform(0, 2 * math.pi)
            ring_a, ring_b = ga + radius * 1.1, gb + radius * 1.1
            dr, dc = ring_a * np.cos(t), ring_b * np.sin(t)
            rows[chosen] = gr + dr * math.cos(gt) - dc * math.sin(gt)
            cols[chosen] = gc + dr * math.sin(gt) + dc * math.cos(gt)
            angle[chosen] = t + gt  # columnar cells point at the lumen
            along[chosen], across[chosen] = area_r[chosen] * 1.3, area_r[chosen] / 1.3
        kinds[gland_nuclei[used:]] = 0  # gland nuclei beyond the rings: scattered round nuclei
    nuclei = _splat_ellipses(shape, rows, cols, along, across, angle, edge=0.7)
    nuclei = nuclei * (1.0 - lumen)
    white = np.array([0.95, 0.93, 0.95])
    pink = np.array([0.9, 0.5, 0.72]) + rng.uniform(-0.08, 0.08, 3)
    purple = np.array([0.32, 0.18, 0.52]) + rng.uniform(-0.08, 0.08, 3)
    eosin_strength, haem_strength = rng.uniform(0.6, 1.1), rng.uniform(0.6, 1.0)
    stroma = white + (eosin * eosin_strength)[..., None] * (pink - white)
    empty = np.maximum(lumen, clear)[..., None]
    rgb = stroma * (1.0 - empty) + empty * white
    h = (nuclei * haem_strength)[..., None]
    rgb = rgb * (1.0 - h) + h * purple
    rgb = _blur(rgb, (rng.uniform(0.4, 1.0),) * 2 + (0.0,))
    rgb = rgb + rng.uniform(0.005, 0.03) * rng.standard_normal(rgb.shape)
    rgb = (rgb - 0.5) * rng.uniform(0.8, 1.1) + 0.5 + rng.uniform(-0.06, 0.06)
    return _to_uint8(rgb)


# --------------------------------------------------------------------------------------------------
# 3D generators (64 x 64 x 64, axes (X, Y, Z) = (right, anterior, superior), depth last)
# --------------------------------------------------------------------------------------------------
def _grid3(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    axes = [((np.arange(n, dtype=np.float32) + 0.5) / n * 2.0 - 1.0) for n in shape]
    return np.meshgrid(*axes, indexing="ij")


def _box(centre: np.ndarray, reach: float, shape: tuple[int, ...]) -> tuple[slice, ...] | None:
    """Index box of the voxels within ``reach`` of ``centre`` (voxels), clipped to ``shape``; None when empty."""
    lo = np.maximum(np.floor(centre - reach).astype(int), 0)
    hi = np.minimum(np.ceil(centre + reach).astype(int) + 1, shape)
    if np.any(hi <= lo):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _paint_capsule(
    volume: np.ndarray, start: np.ndarray, end: np.ndarray, radius: float, value: float, where: np.ndarray | None
) -> None:
    """Blend ``value`` into ``volume`` (in place) over the capsule of the segment [start, end] (voxel coordinates)
    of ``radius`` voxels, with a one-voxel partial-volume edge, only inside ``where`` when given."""
    centre = (start + end) / 2.0
    reach = float(np.linalg.norm(end - start)) / 2.0 + radius + 1.0
    box = _box(centre, reach, volume.shape)
    if box is None:
        return
    shapes = ((-1, 1, 1), (1, -1, 1), (1, 1, -1))  # voxel coordinates minus start, one broadcastable axis each
    offset = [(np.arange(b.start, b.stop, dtype=np.float32) - np.float32(start[a])).reshape(shapes[a])
              for a, b in enumerate(box)]
    direction = (end - start).astype(np.float32)
    length2 = max(float(direction @ direction), 1e-6)
    t = np.clip(sum(o * (d / length2) for o, d in zip(offset, direction)), 0.0, 1.0)
    distance = np.sqrt(sum((o - t * d) ** 2 for o, d in zip(offset, direction)))
    weight = np.clip(radius + 0.5 - distance, 0.0, 1.0)
    if where is not None:
        weight = weight * where[box]
    volume[box] = volume[box] * (1.0 - weight) + weight * np.float32(value)


def _pick(rng: np.random.Generator, region: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """A random voxel of ``region`` (of ``fallback`` when ``region`` is empty), as float coordinates."""
    candidates = np.argwhere(region if region.any() else fallback)
    return candidates[int(rng.integers(0, len(candidates)))].astype(np.float32) + rng.uniform(-0.5, 0.5, 3)


def learn_chest_ct(
    rng: np.random.Generator, class_index: int, shape: tuple[int, int, int] = LEARN_SHAPE_3D
) -> np.ndarray:
    """A chest CT volume in Hounsfield units (X, Y, Z) int16 of class ``LEARN_CLASSES["CT"][class_index]``.

    All classes: body of random size, ellipticity, taper and position (fat, muscle of random HU), two lungs of random
    size and height (-900..-780 HU with parenchymal texture), heart, spine, ribs, 8-14 pulmonary vessel trees (tubes
    of radius 1-1.5 voxels at the hila, tapering and branching outwards), correlated and white noise of random
    strength (8-30 HU), noise-free air outside the body. ``nodules``: 3-7 spheres of radius 3-5.5 voxels;
    ``linear_lesions``: 3-6 bands (tubes of radius 1.8-3 voxels, length 16-30 voxels, mostly in the axial plane so
    that they stay bands at 16 slices); both -50..80 HU, centred well inside the lungs.
    """
    if not 0 <= class_index < 3:
        raise ValueError(f"class_index {class_index} outside 0..2 ({LEARN_CLASSES['CT']})")
    x, y, z = _grid3(shape)
    cx, cy = rng.uniform(-0.08, 0.08), -0.05 + rng.uniform(-0.08, 0.08)
    rx, ry = rng.uniform(0.78, 0.95), rng.uniform(0.52, 0.72)
    body_e = np.sqrt(((x - cx) / (rx * (1.0 - rng.uniform(0.0, 0.12) * z))) ** 2 + ((y - cy) / ry) ** 2)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[body_e < 1.0] = rng.uniform(-120.0, -80.0)
    inner = body_e < rng.uniform(0.82, 0.9)
    hu[inner] = rng.uniform(35.0, 60.0)
    lungs = np.zeros(shape, dtype=bool)
    core = np.zeros(shape, dtype=bool)  # where lesions are centred: well inside the lungs
    lung_z = rng.uniform(-0.05, 0.2)
    for side in (1.0, -1.0):
        centre = (cx + side * rng.uniform(0.36, 0.46) * rx / 0.9, cy + 0.05, lung_z + rng.uniform(-0.05, 0.05))
        radii = (rng.uniform(0.25, 0.33) * rx / 0.9, rng.uniform(0.38, 0.46) * ry / 0.66, rng.uniform(0.65, 0.9))
        q = ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((z - centre[2]) / radii[2]) ** 2
        lungs |= (q < 1.0) & inner
        core |= q < 0.55
    heart_c = (cx - 0.1 + rng.uniform(-0.05, 0.05), cy + 0.22, lung_z - 0.4 + rng.uniform(-0.1, 0.1))
    heart_r = rng.uniform(0.24, 0.32), rng.uniform(0.22, 0.3), rng.uniform(0.32, 0.45)
    heart = (((x - heart_c[0]) / heart_r[0]) ** 2 + ((y - heart_c[1]) / heart_r[1]) ** 2
             + ((z - heart_c[2]) / heart_r[2]) ** 2) < 1.0
    lungs &= ~heart
    core &= lungs
    texture = _noise_field(rng, shape, rng.uniform(1.0, 2.0))
    hu[lungs] = rng.uniform(-900.0, -780.0) + rng.uniform(10.0, 40.0) * texture[lungs]
    hu[heart] = rng.uniform(35.0, 60.0)
    spine = np.hypot(x - cx, (y - cy + 0.45 * ry / 0.66) * 1.2)
    hu[spine < 0.13] = 700.0
    hu[spine < 0.09] = 250.0
    rib_levels = np.round((z + 1.0) * shape[2] / 2.0 - 0.5 + rng.integers(0, 5)) % 5 == 0
    hu[(body_e > 0.78) & (body_e < 0.86) & rib_levels & (y < cy + 0.4)] = 600.0

    scale = np.array(shape, dtype=np.float32) / 2.0
    to_voxel = lambda p: (np.asarray(p, dtype=np.float32) + 1.0) * scale - 0.5  # noqa: E731
    for _ in range(int(rng.integers(8, 15))):  # vessel trees: tapering, branching tubes running out from the hila
        side = float(rng.choice([-1.0, 1.0]))
        start = to_voxel((cx + side * 0.16, cy + 0.05, lung_z + rng.uniform(-0.35, 0.35)))
        direction = rng.normal(size=3) + np.array([side * 1.5, 0.0, 0.0])
        todo = [(start, direction / np.linalg.norm(direction), rng.uniform(1.0, 1.5), 0)]
        while todo:
            start, direction, radius, depth = todo.pop()
            direction = direction + rng.normal(0.0, 0.3, 3)
            direction /= np.linalg.norm(direction)
            end = start + rng.uniform(4.0, 8.0) * direction
            _paint_capsule(hu, start, end, radius, rng.uniform(0.0, 60.0), lungs)
            if radius > 0.6 and depth < 5:
                todo.append((end, direction, radius * 0.85, depth + 1))
                if rng.random() < 0.4:
                    todo.append((end, direction + rng.normal(0.0, 0.8, 3), radius * 0.7, depth + 1))
    if class_index == 1:  # nodules
        for _ in range(int(rng.integers(3, 8))):
            centre = _pick(rng, core, lungs)
            _paint_capsule(hu, centre, centre, rng.uniform(3.0, 5.5), rng.uniform(-50.0, 80.0), None)
    elif class_index == 2:  # linear lesions, mostly in the axial plane (band-like scars, plate atelectasis)
        for _ in range(int(rng.integers(3, 7))):
            centre = _pick(rng, core, lungs)
            direction = rng.normal(size=3) * np.array([1.0, 1.0, 0.3])
            half = rng.uniform(8.0, 15.0) * direction / np.linalg.norm(direction)
            _paint_capsule(hu, centre - half, centre + half, rng.uniform(1.8, 3.0), rng.uniform(-50.0, 80.0), lungs)
    noise_std = rng.uniform(8.0, 30.0)
    hu = hu + noise_std * (0.8 * _noise_field(rng, shape, 0.8) + 0.6 * rng.standard_normal(shape, dtype=np.float32))
    hu[body_e > 1.06] = -1000.0  # air outside the body without noise, as after a body mask (smaller files)
    return np.rint(np.clip(hu, -1024.0, 3071.0)).astype(np.int16)


#: Tissue intensities (scalp, skull, CSF, grey matter, white matter, lesion) of the MR contrasts.
_MR_CONTRASTS = {
    "T1": (700.0, 60.0, 180.0, 450.0, 650.0, 300.0),
    "T2": (350.0, 40.0, 900.0, 520.0, 380.0, 800.0),
    "FLAIR": (400.0, 40.0, 80.0, 480.0, 360.0, 850.0),
}


def learn_brain_mr(
    rng: np.random.Generator, class_index: int, shape: tuple[int, int, int] = LEARN_SHAPE_3D
) -> np.ndarray:
    """A head MR volume (X, Y, Z) int16 (arbitrary units) of class ``LEARN_CLASSES["MR"][class_index]``.

    All classes: a random contrast (T1-, T2- or FLAIR-like, tissue values jittered by 10 %), head of random size and
    position, scalp, skull, CSF, folded grey / white matter, two ventricles of random size, a smooth bias field of
    random strength and Rician noise of random level, background outside the head masked to 0.
    ``multifocal_lesions``: 8-16 small ovoid white-matter foci (radius 1.8-3.2 voxels), 60 % of them periventricular;
    ``mass``: one lesion of radius 6-10 voxels with a CSF-like necrotic core and a surrounding oedema rim.
    """
    if not 0 <= class_index < 3:
        raise ValueError(f"class_index {class_index} outside 0..2 ({LEARN_CLASSES['MR']})")
    contrast = ("T1", "T2", "FLAIR")[int(rng.integers(0, 3))]
    scalp, skull, csf, grey, white, lesion = np.array(_MR_CONTRASTS[contrast]) * rng.uniform(0.9, 1.1, 6)
    x, y, z = _grid3(shape)
    centre = (rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05), rng.uniform(-0.1, 0.05))
    radii = (rng.uniform(0.7, 0.82), rng.uniform(0.84, 0.95), rng.uniform(0.78, 0.9))
    head = np.sqrt(((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
                   + ((z - centre[2]) / radii[2]) ** 2)
    image = np.zeros(shape, dtype=np.float32)
    image[head < 1.0] = scalp
    image[head < 0.9] = skull
    image[head < 0.84] = csf
    brain_edge = rng.uniform(0.76, 0.8)
    brain = head < brain_edge
    image[brain] = grey
    folds = rng.uniform(0.05, 0.1) * _noise_field(rng, shape, 1.5)
    wm = (head + folds < rng.uniform(0.5, 0.6)) & brain
    image[wm] = white
    vent_size = rng.uniform(0.7, 1.4)
    ventricles = np.zeros(shape, dtype=bool)
    periventricular = np.zeros(shape, dtype=bool)  # within about 5 voxels of the ventricles
    margin = 10.0 / shape[0]
    for side in (-1.0, 1.0):
        vc = (centre[0] + side * 0.1 * vent_size, centre[1] + 0.05, centre[2] + 0.08)
        vr = (0.06 * vent_size, 0.28 * vent_size**0.5, 0.14 * vent_size)
        ventricles |= (((x - vc[0]) / vr[0]) ** 2 + ((y - vc[1]) / vr[1]) ** 2 + ((z - vc[2]) / vr[2]) ** 2) < 1.0
        periventricular |= (
            ((x - vc[0]) / (vr[0] + margin)) ** 2 + ((y - vc[1]) / (vr[1] + margin)) ** 2
            + ((z - vc[2]) / (vr[2] + margin)) ** 2
        ) < 1.0
    image[ventricles] = csf
    wm &= ~ventricles
    periventricular &= wm
    if class_index == 1:  # multifocal ovoid lesions, most of them periventricular
        for _ in range(int(rng.integers(8, 17))):
            c = _pick(rng, periventricular if rng.random() < 0.6 else wm, wm)
            direction = rng.normal(size=3)
            half = rng.uniform(0.5, 2.0) * direction / np.linalg.norm(direction)
            _paint_capsule(image, c - half, c + half, rng.uniform(1.8, 3.2), lesion * rng.uniform(0.85, 1.1), brain)
    elif class_index == 2:  # one mass: oedema, rim, necrotic core
        c = _pick(rng, head < brain_edge - 0.35, brain)
        r = rng.uniform(6.0, 10.0)
        _paint_capsule(image, c, c, r * rng.uniform(1.3, 1.6), 0.5 * (lesion + image[tuple(c.astype(int))]), brain)
        _paint_capsule(image, c, c, r, lesion, brain)
        _paint_capsule(image, c, c, r * rng.uniform(0.4, 0.65), csf, brain)
    bias_terms = rng.uniform(-1.0, 1.0, 6) * rng.uniform(0.05, 0.25)
    bias = np.exp(bias_terms[0] * x + bias_terms[1] * y + bias_terms[2] * z + bias_terms[3] * x * y
                  + bias_terms[4] * (x**2 - 0.33) + bias_terms[5] * (z**2 - 0.33))
    sigma = rng.uniform(8.0, 30.0)
    real = image * bias + rng.normal(0.0, sigma, shape).astype(np.float32)
    image = np.hypot(real, rng.normal(0.0, sigma, shape).astype(np.float32))  # Rician magnitude
    image[head > 1.08] = 0.0  # background outside the head masked, as in most preprocessed MR (smaller files)
    image = image * rng.uniform(0.7, 1.3)
    return np.rint(np.clip(image, 0, 32767)).astype(np.int16)


# --------------------------------------------------------------------------------------------------
# the build
# --------------------------------------------------------------------------------------------------
_GENERATORS = {
    "XR": learn_chest_xr,
    "FUNDUS": learn_fundus,
    "PATH": learn_histology,
    "CT": learn_chest_ct,
    "MR": learn_brain_mr,
}
#: The dimension of each modality's images (2: PNG images, 3: NIfTI volumes).
LEARN_DIMS: dict[str, int] = {"XR": 2, "FUNDUS": 2, "PATH": 2, "CT": 3, "MR": 3}


def _per_class(dim: int, per_class_2d: Sequence[int] | None, per_class_3d: Sequence[int] | None) -> tuple[int, ...]:
    value = (per_class_2d if per_class_2d is not None else PER_CLASS_2D) if dim == 2 else (
        per_class_3d if per_class_3d is not None else PER_CLASS_3D
    )
    value = tuple(int(n) for n in value)
    if len(value) != 3 or min(value) < 1:
        raise ValueError(f"per-class split {value} must be 3 positive counts (training, validation, test)")
    return value


def _plan(modality: str, split: tuple[int, ...]) -> list[tuple[str, int, int]]:
    """(section, item index, class index) of every item of a modality: classes alternate within each section."""
    plan, index = [], 0
    for section, n in zip(SECTIONS, split):
        for i in range(n * 3):
            plan.append((section, index, i % 3))
            index += 1
    return plan


def _write_item(job: tuple[str, str, int, int, int]) -> None:
    """Generate and write one item (a pure function of its arguments; run in worker processes too)."""
    modality, path, seed, index, class_index = job
    data = _GENERATORS[modality](_rng(seed, _GROUPS[modality], index), class_index)
    if LEARN_DIMS[modality] == 2:
        Image.fromarray(data).save(path)
    else:
        _save_nifti(data, _ras_affine(_SPACING[modality], data.shape), Path(path))


def build_learnability_set(
    out_dir: str | os.PathLike,
    seed: int = 0,
    per_class_2d: Sequence[int] | None = None,
    per_class_3d: Sequence[int] | None = None,
    workers: int = 1,
) -> dict[str, list[dict[str, Any]]]:
    """Write the learnability images under ``out_dir/learn/<modality>/`` and return their datalist sections.

    Args:
        out_dir: the dataset directory; item paths are relative to it.
        seed: seed of every image (item ``i`` of modality ``m``: ``SeedSequence([seed, group(m), i])``).
        per_class_2d: items per class in (training, validation, test) for each 2D modality (default
            :data:`PER_CLASS_2D`); smaller for tests.
        per_class_3d: the same for each 3D modality (default :data:`PER_CLASS_3D`).
        workers: processes writing items (1: this process). Every item is a pure function of (seed, modality,
            index), so the files do not depend on ``workers``.

    Returns:
        ``{"training": [...], "validation": [...], "test": [...]}``, items ``{"image", "modality", "dim", "label"}``
        with ``label`` in the flat label space (:data:`LABEL_OFFSETS`); classes alternate within each section.
    """
    out = Path(out_dir)
    sections: dict[str, list[dict[str, Any]]] = {s: [] for s in SECTIONS}
    jobs = []
    for modality, dim in LEARN_DIMS.items():
        folder = out / "learn" / modality.lower()
        folder.mkdir(parents=True, exist_ok=True)
        plan = _plan(modality, _per_class(dim, per_class_2d, per_class_3d))
        digits = max(3, len(str(len(plan) - 1)))
        for section, index, class_index in plan:
            name = f"{modality.lower()}_{index:0{digits}d}" + (".png" if dim == 2 else ".nii.gz")
            path = folder / name
            jobs.append((modality, str(path), int(seed), index, class_index))
            sections[section].append(
                {
                    "image": path.relative_to(out).as_posix(),
                    "modality": modality,
                    "dim": dim,
                    "label": LABEL_OFFSETS[modality] + class_index,
                }
            )
    if workers > 1:
        import multiprocessing

        with multiprocessing.get_context().Pool(int(workers)) as pool:  # the platform's start method
            for _ in pool.imap_unordered(_write_item, jobs, chunksize=8):
                pass
    else:
        for job in jobs:
            _write_item(job)
    return sections


def learn_builder_info(seed: int, per_class_2d: Sequence[int] | None = None,
                       per_class_3d: Sequence[int] | None = None) -> dict[str, Any]:
    """The ``"builder"`` entry of the learn datalists: what a build depends on (a reuse check compares it)."""
    return {
        "module": "medssl.data.demo",
        "part": "learn",
        "version": DEMO_VERSION,
        "seed": int(seed),
        "per_class_2d": list(_per_class(2, per_class_2d, per_class_3d)),
        "per_class_3d": list(_per_class(3, per_class_2d, per_class_3d)),
    }


def learn_datalists(sections: dict[str, list[dict[str, Any]]], builder: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The datalists of :data:`LEARN_DATALISTS` (file name -> JSON object) for the sections of a build."""
    classes = [f"{modality}: {name}" for modality, names in LEARN_CLASSES.items() for name in names]
    description = (
        "medssl demo data v3, the learnability set (see README.md, 'Learnability set'): synthetic class-labelled "
        "images whose class cue is anatomical shape or texture. 'label' indexes the flat 'classes' list, a disjoint "
        "range per modality ('label_offsets'; 'modality_classes' names them): classify within one modality, chance "
        "1/3."
    )
    out = {}
    for name, dims in zip(LEARN_DATALISTS, ((2, 3), (2,), (3,))):
        kept = {s: [item for item in sections[s] if item["dim"] in dims] for s in SECTIONS}
        modalities = [m for m in LEARN_CLASSES if LEARN_DIMS[m] in dims]
        out[name] = {
            "name": "medssl-demo-learn",
            "description": f"{LEARN_DATALISTS[name]}. {description}",
            "reference": "medssl.data.learnability",
            "licence": "Apache-2.0 (medssl; synthetic)",
            "builder": builder,
            "classes": classes,
            "modality_classes": {m: list(LEARN_CLASSES[m]) for m in modalities},
            "label_offsets": {m: LABEL_OFFSETS[m] for m in modalities},
            "numTraining": len(kept["training"]),
            "numValidation": len(kept["validation"]),
            "numTest": len(kept["test"]),
            **kept,
        }
    return out
