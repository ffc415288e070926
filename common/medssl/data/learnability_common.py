"""What the learnability set's 2D and 3D generators (:mod:`medssl.data.learnability_2d`,
:mod:`medssl.data.learnability_3d`) share: the class names, the image sizes and the noise / blur / ellipse helpers.
The set and its build: :mod:`medssl.data.learnability`."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import ndimage

from .demo.generators import _smooth_noise

#: Class names per modality (``label - LABEL_OFFSETS[modality]`` indexes them).
LEARN_CLASSES: dict[str, tuple[str, str, str]] = {
    "XR": ("normal", "nodules", "effusion"),
    "FUNDUS": ("normal", "exudates", "haemorrhages"),
    "PATH": ("round_nuclei", "spindle_cells", "glands"),
    "CT": ("normal", "nodules", "linear_lesions"),
    "MR": ("normal", "multifocal_lesions", "mass"),
}
LEARN_SIZE_2D = 128
LEARN_SHAPE_3D = (64, 64, 64)


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

