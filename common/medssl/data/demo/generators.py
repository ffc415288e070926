"""Deterministic synthetic images (numpy only): chest X-ray, ultrasound, fundus, histology, CT / MR phantoms and
chest CT volumes, each a pure function of its random generator; and the small numeric helpers they share."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .catalogue import CLASSES, CT_VOLUME_CLASSES

#: Shape of the class-labelled chest CT volumes (X, Y, Z).
_CT_NODULE_SHAPE = (48, 48, 32)


# --------------------------------------------------------------------------------------------------
# small numeric helpers (numpy only)
# --------------------------------------------------------------------------------------------------
def _rng(seed: int, group: int, index: int) -> np.random.Generator:
    """Independent generator of item ``index`` of a group: a pure function of (seed, group, index)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), group, index]))


def _gaussian_filter(array: np.ndarray, sigma: float | tuple[float, ...]) -> np.ndarray:
    """Gaussian low-pass of ``array`` (periodic boundary) through the FFT; ``sigma`` in voxels per axis."""
    sigmas = (sigma,) * array.ndim if np.isscalar(sigma) else tuple(sigma)
    spectrum = np.fft.rfftn(array)
    for axis, s in enumerate(sigmas):
        n = array.shape[axis]
        freq = np.fft.rfftfreq(n) if axis == array.ndim - 1 else np.fft.fftfreq(n)
        shape = [1] * array.ndim
        shape[axis] = freq.size
        spectrum = spectrum * np.exp(-2.0 * (math.pi * s * freq) ** 2).reshape(shape)
    return np.fft.irfftn(spectrum, s=array.shape, axes=tuple(range(array.ndim)))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std correlated noise with correlation length ``sigma`` voxels."""
    field = _gaussian_filter(rng.standard_normal(shape), sigma)
    return (field - field.mean()) / (field.std() + 1e-12)


def _block_mean(array: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """Area downscaling: mean over non-overlapping blocks (the array is cropped to a multiple of ``factors``).

    ``factors`` covers the leading axes; trailing axes (e.g. RGB) are kept.
    """
    lead = len(factors)
    crop = tuple(slice(0, (array.shape[a] // f) * f) for a, f in enumerate(factors))
    array = array[crop].astype(np.float64)
    shape: list[int] = []
    for a, f in enumerate(factors):
        shape += [array.shape[a] // f, f]
    array = array.reshape(*shape, *array.shape[lead:])
    return array.mean(axis=tuple(range(1, 2 * lead, 2)))


def _unit_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(v, u) coordinates in [-1, 1] of a size x size image; v = row (down), u = column (right)."""
    axis = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    return np.meshgrid(axis, axis, indexing="ij")


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


# --------------------------------------------------------------------------------------------------
# synthetic 2D images
# --------------------------------------------------------------------------------------------------
def rib_cage(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, torso: np.ndarray, soft: Any, spacing: float,
             start: float) -> tuple[np.ndarray, np.ndarray]:
    """Nine curved posterior ribs (``spacing`` apart from ``start`` in v, each jittered by one ``rng.normal`` draw)
    cut to the torso, and the clavicles: the bony overlay of the chest radiographs (``synthetic_chest_xr`` and the
    learnability set's). ``u``, ``v`` are the normalised grid, ``soft`` the soft indicator of a signed distance."""
    ribs = np.zeros_like(u)
    for k in range(9):
        v0 = start + k * spacing + rng.normal(0.0, 0.01)
        curve = v0 + 0.5 * (np.abs(u) - 0.1) ** 2 + 0.2 * np.abs(u) - 0.25 * np.maximum(np.abs(u) - 0.75, 0.0)
        ribs = np.maximum(ribs, np.exp(-(((v - curve) / 0.024) ** 2)))
    ribs *= soft(0.1 - np.abs(u)) * torso * soft((v - 0.55) / 3.0)
    clavicles = np.exp(-(((v - (-0.72 + 0.25 * (np.abs(u) - 0.45) ** 2)) / 0.03) ** 2)) * (np.abs(u) < 0.75)
    return ribs, clavicles


def synthetic_chest_xr(rng: np.random.Generator, class_index: int, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """A chest-radiograph-like image of class ``CLASSES[class_index]`` and its lesion mask.

    Anatomy: torso, two lung fields with domed bases, heart shadow, spine, posterior ribs and clavicles,
    random pose / size / exposure. ``nodule``: 2-4 round opacities inside the lungs; ``effusion``: a
    basal opacity with a lateral meniscus in one lung. Returns (image uint8 (H, W), mask uint8 (H, W),
    1 on the lesion, all 0 for ``normal``). Bones are bright, air dark (MONOCHROME2 display).
    """
    image, lesion, _organs = _chest_xr(rng, class_index, size)
    return image, lesion


def synthetic_chest_xr_organs(rng: np.random.Generator, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """A ``normal`` chest-radiograph-like image (see :func:`synthetic_chest_xr`) and its JSRT / SCR-style organ mask.

    Returns (image uint8 (H, W), mask uint8 (H, W)) with the values of ``MASK_CLASSES["XR"]``: 0 background,
    1 lungs (left and right, ending at the heart border), 2 heart, 3 clavicles (over the lungs where they cross):
    the fields the image is drawn from, thresholded at one half.
    """
    image, _lesion, organs = _chest_xr(rng, CLASSES.index("normal"), size)
    return image, organs


def _chest_xr(rng: np.random.Generator, class_index: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, lesion mask, organ mask) of :func:`synthetic_chest_xr` / :func:`synthetic_chest_xr_organs`."""
    if not 0 <= class_index < len(CLASSES):
        raise ValueError(f"class_index {class_index} outside 0..{len(CLASSES) - 1} ({CLASSES})")
    v, u = _unit_grid(size)
    px = 2.0 / size  # one pixel in unit coordinates
    shift_u, shift_v = rng.uniform(-0.04, 0.04, 2)
    scale = rng.uniform(0.94, 1.04)
    u = (u - shift_u) / scale
    v = (v - shift_v) / scale
    soft = lambda d: _sigmoid(-d / (1.5 * px))  # noqa: E731 - soft inside indicator of a signed distance

    torso = soft(np.sqrt((u / 0.95) ** 2 + ((v - 0.2) / 1.25) ** 2) - 1.0)
    image = 0.08 + 0.47 * torso
    lungs = np.zeros_like(u)
    lung_masks = []
    for side in (-1.0, 1.0):
        cu = side * rng.uniform(0.38, 0.46)
        cv = rng.uniform(-0.12, -0.02)
        ru, rv = rng.uniform(0.26, 0.32), rng.uniform(0.52, 0.62)
        base = cv + rv * 0.75 - 0.12 * ((u - cu) / ru) ** 2  # domed diaphragm
        ellipse = np.sqrt(((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2) - 1.0
        lung = soft(ellipse) * soft((v - base) / 0.6)
        lung_masks.append((lung, cu, cv, ru, rv, base))
        lungs = np.maximum(lungs, lung)
    image = image - 0.33 * lungs
    heart = soft(np.sqrt(((u - 0.12) / rng.uniform(0.26, 0.32)) ** 2 + ((v - 0.3) / 0.24) ** 2) - 1.0)
    image = image + 0.22 * heart * (0.3 + lungs)
    image = image + 0.18 * soft(np.abs(u) - 0.1) * torso  # spine and mediastinum
    spacing = rng.uniform(0.17, 0.2)
    start = rng.uniform(-0.78, -0.7)
    ribs, clavicles = rib_cage(rng, u, v, torso, soft, spacing, start)
    image = image + 0.08 * ribs + 0.14 * clavicles * torso

    mask = np.zeros(u.shape, dtype=bool)
    if CLASSES[class_index] == "nodule":
        for _ in range(int(rng.integers(2, 5))):
            lung, cu, cv, ru, rv, _base = lung_masks[int(rng.integers(0, 2))]
            for _attempt in range(50):  # rejection sampling of a centre well inside the lung
                nu, nv = cu + rng.uniform(-0.7, 0.7) * ru, cv + rng.uniform(-0.7, 0.6) * rv
                row = int(np.clip((nv * scale + shift_v + 1.0) / px, 0, size - 1))
                col = int(np.clip((nu * scale + shift_u + 1.0) / px, 0, size - 1))
                if lung[row, col] > 0.9:
                    break
            radius = rng.uniform(0.07, 0.11)
            distance = np.sqrt((u - nu) ** 2 + (v - nv) ** 2)
            image = image + rng.uniform(0.28, 0.38) * np.exp(-0.5 * (distance / (0.6 * radius)) ** 4)
            mask |= distance < radius
    elif CLASSES[class_index] == "effusion":
        lung, cu, cv, ru, rv, _base = lung_masks[int(rng.integers(0, 2))]
        level = cv + rv * rng.uniform(-0.1, 0.3)
        meniscus = level - 0.35 * np.maximum(np.abs(u - cu) - 0.2 * ru, 0.0) * np.sign(u - cu) * np.sign(cu)
        fluid = lung * soft((meniscus - v) / 0.8)
        image = image + 0.36 * fluid * (1.0 - 0.6 * heart)
        mask = fluid > 0.5

    organs = np.zeros(u.shape, dtype=np.uint8)  # JSRT / SCR-style: lungs 1, heart 2, clavicles 3
    organs[lungs > 0.5] = 1
    organs[(heart > 0.5) & (torso > 0.5)] = 2  # the lung fields end at the heart border, as in SCR
    organs[(clavicles > 0.5) & (torso > 0.5)] = 3

    image = _gaussian_filter(image, 0.8)
    image = image * rng.uniform(0.92, 1.08) + rng.uniform(-0.03, 0.03)
    image = image + 0.03 * _smooth_noise(rng, image.shape, 12.0) + rng.normal(0.0, 0.015, image.shape)
    image = np.clip(image, 0.0, 1.0) ** rng.uniform(0.9, 1.1)
    return _to_uint8(image), mask.astype(np.uint8), organs


def synthetic_us_lesion(rng: np.random.Generator, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """A B-mode ultrasound-like sector image with one hypoechoic lesion, and the lesion mask.

    Sector (curvilinear probe, apex above the image), layered tissue echogenicity, bright fascia lines,
    Rayleigh speckle, depth attenuation, log compression, posterior acoustic enhancement behind the
    lesion. Returns (image uint8 (H, W), mask uint8 (H, W) with 1 on the lesion).
    """
    rows, cols = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64), indexing="ij")
    apex_row, apex_col = -0.12 * size, size / 2.0
    radius = np.hypot(rows - apex_row, cols - apex_col)
    theta = np.arctan2(cols - apex_col, rows - apex_row)
    half_angle = rng.uniform(0.5, 0.62)
    r_min, r_max = 0.2 * size, 1.08 * size
    sector = (np.abs(theta) < half_angle) & (radius > r_min) & (radius < r_max)

    echo = 0.55 + 0.12 * _smooth_noise(rng, (size, size), 6.0)
    for _ in range(int(rng.integers(2, 4))):  # fascia: bright curved lines at constant depth
        depth = rng.uniform(r_min + 5, r_max - 10)
        echo = echo + rng.uniform(0.3, 0.6) * np.exp(-(((radius - depth) / 1.2) ** 2))
    lesion_r = rng.uniform(0.4, 0.75) * size
    lesion_t = rng.uniform(-0.5, 0.5) * half_angle
    centre_row = apex_row + lesion_r * math.cos(lesion_t)
    centre_col = apex_col + lesion_r * math.sin(lesion_t)
    a, b = rng.uniform(0.06, 0.13, 2) * size
    angle = rng.uniform(0, math.pi)
    dr, dc = rows - centre_row, cols - centre_col
    along = dr * math.cos(angle) + dc * math.sin(angle)
    across = -dr * math.sin(angle) + dc * math.cos(angle)
    lesion = ((along / a) ** 2 + (across / b) ** 2 < 1.0) & sector
    echo = np.where(lesion, echo * rng.uniform(0.15, 0.3), echo)
    behind = (np.abs(theta - lesion_t) < max(a, b) / lesion_r) & (radius > lesion_r)
    echo = echo * np.where(behind & ~lesion, 1.3, 1.0)

    field = _gaussian_filter(rng.standard_normal((size, size)), 0.7) + 1j * _gaussian_filter(
        rng.standard_normal((size, size)), 0.7
    )
    speckle = np.abs(field) / np.abs(field).mean()
    envelope = echo * speckle * np.exp(-0.9 * (radius - r_min) / size) * rng.uniform(0.9, 1.1)
    image = np.log1p(15.0 * np.clip(envelope, 0, None)) / math.log1p(15.0 * 2.5)
    image = np.where(sector, image, 0.0)
    return _to_uint8(image), lesion.astype(np.uint8)


def synthetic_fundus(rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """A colour-fundus-like photograph (H, W, 3) uint8: red-orange retina in a black circular field,
    vignetting, a bright optic disc, a darker macula and a dark-red vessel tree growing from the disc."""
    v, u = _unit_grid(size)
    side = rng.choice([-1.0, 1.0])  # left or right eye
    disc_u, disc_v = side * rng.uniform(0.38, 0.5), rng.uniform(-0.08, 0.08)
    field = np.hypot(u, v)
    vignette = np.clip(1.0 - 0.45 * field**2, 0, 1) * (1.0 + 0.06 * _smooth_noise(rng, (size, size), 8.0))
    rgb = np.stack([0.82 * vignette, 0.36 * vignette, 0.14 * vignette], axis=-1)
    macula = np.exp(-(((u + side * 0.1) ** 2 + v**2) / 0.03))
    rgb *= (1.0 - 0.35 * macula)[..., None]

    vessels = np.zeros((size, size))
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    main_angles = [sign * math.pi / 2 + side * turn for sign in (1.0, -1.0) for turn in (-sign * 0.6, sign * 1.9)]
    stack = [((disc_v + 1) * size / 2, (disc_u + 1) * size / 2, angle, 2.2) for angle in main_angles]
    while stack:
        row, col, angle, width = stack.pop()
        for _step in range(int(size * 0.9)):
            row, col = row + 1.5 * math.sin(angle), col + 1.5 * math.cos(angle)
            angle += rng.normal(0.0, 0.12) - 0.02 * side * math.cos(angle)
            width *= 0.992
            if not (0 <= row < size and 0 <= col < size) or width < 0.6:
                break
            r0, r1 = int(max(row - 3, 0)), int(min(row + 4, size))
            c0, c1 = int(max(col - 3, 0)), int(min(col + 4, size))
            d = np.hypot(rows[r0:r1, c0:c1] - row, cols[r0:r1, c0:c1] - col)
            vessels[r0:r1, c0:c1] = np.maximum(vessels[r0:r1, c0:c1], _sigmoid((width / 2 - d) * 3.0))
            if rng.random() < 0.025 and width > 1.0:
                stack.append((row, col, angle + rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 0.9), width * 0.75))
    blood = vessels[..., None] * np.array([0.15, 0.0, 0.0]) * vignette[..., None]
    rgb = rgb * (1.0 - 0.55 * vessels[..., None]) + blood
    disc = _sigmoid((0.12 - np.hypot(u - disc_u, v - disc_v)) / 0.012)
    rgb = rgb * (1.0 - disc[..., None]) + disc[..., None] * np.array([1.0, 0.86, 0.58])
    rgb = _gaussian_filter(rgb, (0.6, 0.6, 0.0)) + rng.normal(0.0, 0.012, rgb.shape)
    rgb *= (field < 0.96)[..., None]
    return _to_uint8(rgb)


def synthetic_histology(rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """An H&E-like histology tile (H, W, 3) uint8: pink eosin stroma with fibre texture, glands (white
    lumen lined by a ring of nuclei) and scattered purple haematoxylin nuclei."""
    rows, cols = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64), indexing="ij")
    fibres = _gaussian_filter(rng.standard_normal((size, size)), (0.8, 4.0) if rng.random() < 0.5 else (4.0, 0.8))
    fibres = fibres / (fibres.std() + 1e-12)
    eosin = np.clip(0.55 + 0.2 * fibres + 0.15 * _smooth_noise(rng, (size, size), 10.0), 0.0, 1.0)
    lumen = np.zeros((size, size))
    nuclei = np.zeros((size, size))
    centres: list[tuple[float, float, float, float, float]] = []  # row, col, radius a, radius b, angle
    for _ in range(int(rng.integers(1, 4))):  # glands
        gr, gc = rng.uniform(0.15, 0.85, 2) * size
        ga, gb = rng.uniform(0.08, 0.16, 2) * size
        d = np.hypot((rows - gr) / ga, (cols - gc) / gb)
        lumen = np.maximum(lumen, _sigmoid((0.75 - d) * 12.0))
        for t in np.linspace(0, 2 * math.pi, int(rng.integers(14, 22)), endpoint=False):
            centres.append((gr + 0.9 * ga * math.sin(t), gc + 0.9 * gb * math.cos(t), 2.2, 1.4, t))
    for _ in range(int(rng.integers(40, 80))):  # stromal nuclei
        row, col = rng.uniform(0, size, 2)
        centres.append((row, col, rng.uniform(1.5, 2.8), rng.uniform(1.0, 1.8), rng.uniform(0, math.pi)))
    for r0, c0, a, b, t in centres:
        lo_r, hi_r = int(max(r0 - 5, 0)), int(min(r0 + 6, size))
        lo_c, hi_c = int(max(c0 - 5, 0)), int(min(c0 + 6, size))
        if lo_r >= hi_r or lo_c >= hi_c:
            continue
        dr, dc = rows[lo_r:hi_r, lo_c:hi_c] - r0, cols[lo_r:hi_r, lo_c:hi_c] - c0
        along, across = dr * math.cos(t) + dc * math.sin(t), -dr * math.sin(t) + dc * math.cos(t)
        inside = _sigmoid((1.0 - np.hypot(along / a, across / b)) * 6.0)
        nuclei[lo_r:hi_r, lo_c:hi_c] = np.maximum(nuclei[lo_r:hi_r, lo_c:hi_c], inside)
    white, pink, purple = np.array([0.96, 0.94, 0.96]), np.array([0.92, 0.55, 0.75]), np.array([0.33, 0.2, 0.55])
    stroma = white + eosin[..., None] * (pink - white)
    rgb = stroma * (1.0 - lumen[..., None]) + lumen[..., None] * white
    rgb = rgb * (1.0 - nuclei[..., None]) + nuclei[..., None] * purple
    rgb = _gaussian_filter(rgb, (0.5, 0.5, 0.0)) + rng.normal(0.0, 0.015, rgb.shape)
    return _to_uint8(rgb)


# --------------------------------------------------------------------------------------------------
# synthetic 3D phantoms
# --------------------------------------------------------------------------------------------------
def _volume_grid(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    axes = [(np.arange(n) + 0.5) / n * 2.0 - 1.0 for n in shape]
    return np.meshgrid(*axes, indexing="ij")


def _ellipsoid(x, y, z, centre, radii) -> np.ndarray:
    return ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((z - centre[2]) / radii[2]) ** 2


def _place_spheres(
    rng: np.random.Generator, region: np.ndarray, count: int, radius_range: tuple[float, float]
) -> np.ndarray:
    """Boolean mask of ``count`` spheres (radii in voxels) whose centres lie inside ``region``."""
    out = np.zeros(region.shape, dtype=bool)
    candidates = np.argwhere(region)
    if len(candidates) == 0:
        return out
    grid = np.indices(region.shape, dtype=np.float64)
    for _ in range(count):
        centre = candidates[int(rng.integers(0, len(candidates)))]
        radius = rng.uniform(*radius_range)
        distance = np.sqrt(sum((grid[a] - centre[a]) ** 2 for a in range(3)))
        out |= (distance < radius) & region
    return out


def synthetic_ct_phantom(
    rng: np.random.Generator, shape: tuple[int, int, int] = (64, 64, 32)
) -> tuple[np.ndarray, np.ndarray]:
    """A torso CT phantom in Hounsfield units and its mask.

    Array axes (X, Y, Z) = (patient right, anterior, superior) - RAS+, depth (axial slices) LAST.
    Air -1000, subcutaneous fat -100, soft tissue / muscle 40-50, lungs -850 (upper half), heart 45,
    liver 60 (lower half, patient right), 1-3 hypodense liver lesions (spheres, ~10 HU), spine
    (cortical 700 HU, cancellous 250 HU) and ribs (600 HU), plus correlated and white noise.
    Returns (hu int16 (X, Y, Z), mask uint8 (X, Y, Z): 0 background, 1 liver, 2 lesion).
    """
    x, y, z = _volume_grid(shape)
    j = lambda s: rng.uniform(-s, s)  # noqa: E731 - jitter
    body_r = (0.9 + j(0.04), 0.66 + j(0.04))
    body_e = np.sqrt((x / body_r[0]) ** 2 + ((y + 0.05) / body_r[1]) ** 2) * (1.0 - 0.04 * z)
    body = body_e < 1.0
    hu = np.full(shape, -1000.0)
    hu[body] = -100.0  # fat shell
    inner = body_e < 0.88
    hu[inner] = 45.0
    lung_centres = [(0.42 + j(0.04), 0.02, 0.55), (-0.45 + j(0.04), 0.02, 0.55)]
    for c in lung_centres:
        hu[_ellipsoid(x, y, z, c, (0.3 + j(0.03), 0.45 + j(0.03), 0.55)) < 1.0] = -850.0
    hu[_ellipsoid(x, y, z, (-0.12 + j(0.04), 0.22, 0.42), (0.3, 0.28, 0.3)) < 1.0] = 45.0  # heart
    other = np.zeros(shape, dtype=bool)  # structures the liver must not overlap
    for centre in ((0.55, -0.3, -0.55), (-0.55, -0.3, -0.5)):  # kidneys
        kidney = _ellipsoid(x, y, z, centre, (0.12, 0.16, 0.25)) < 1.0
        hu[kidney] = 150.0
        other |= kidney
    aorta = (np.hypot(x + 0.1, y + 0.22) < 0.07) & (z < 0.3)
    hu[aorta] = 180.0  # contrast-enhanced
    spine = np.hypot(x, (y + 0.5) * 1.2)
    hu[spine < 0.13] = 700.0  # cortical bone
    hu[spine < 0.09] = 250.0  # cancellous bone
    rib_levels = (np.round((z + 1.0) * shape[2] / 2.0 - 0.5) % 4 == 0) & (z > -0.3)
    ribs = (body_e > 0.8) & (body_e < 0.88) & rib_levels & (y < 0.35)
    hu[ribs] = 600.0
    other |= aorta | (spine < 0.13) | ribs
    liver_ellipsoid = _ellipsoid(x, y, z, (0.33 + j(0.05), 0.05 + j(0.05), -0.35 + j(0.05)), (0.45, 0.42, 0.42))
    liver = (liver_ellipsoid < 1.0) & inner & ~other
    hu[liver] = 60.0
    core = liver.copy()
    for _ in range(2):  # erode the liver by two voxels (6-neighbourhood) so that lesions stay inside it
        core[1:-1, 1:-1, 1:-1] &= core[:-2, 1:-1, 1:-1] & core[2:, 1:-1, 1:-1] & core[1:-1, :-2, 1:-1]
        core[1:-1, 1:-1, 1:-1] &= core[1:-1, 2:, 1:-1] & core[1:-1, 1:-1, :-2] & core[1:-1, 1:-1, 2:]
    lesions = _place_spheres(rng, core, int(rng.integers(1, 4)), (2.5, 4.5)) & liver
    hu[lesions] = 10.0
    soft_tissue = inner & (hu > -500.0) & (hu < 200.0)
    hu[soft_tissue] += 8.0 * _smooth_noise(rng, shape, 2.0)[soft_tissue]  # organ texture
    noise = 10.0 * _smooth_noise(rng, shape, 0.8) + rng.normal(0.0, 8.0, shape)
    hu = np.clip(hu + noise, -1024.0, 3071.0)
    mask = np.zeros(shape, dtype=np.uint8)
    mask[liver] = 1
    mask[lesions] = 2
    return np.rint(hu).astype(np.int16), mask


def _segment_distance(grid: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Distance (voxels) of every voxel of ``grid`` (3, X, Y, Z) to the segment [start, end]."""
    direction = end - start
    offset = grid - start.reshape(3, 1, 1, 1)
    t = np.clip(np.tensordot(direction, offset, axes=1) / max(float(direction @ direction), 1e-9), 0.0, 1.0)
    return np.sqrt(((offset - t[None] * direction.reshape(3, 1, 1, 1)) ** 2).sum(0))


def synthetic_chest_ct_nodules(
    rng: np.random.Generator, class_index: int, shape: tuple[int, int, int] = _CT_NODULE_SHAPE
) -> np.ndarray:
    """A chest CT phantom in Hounsfield units of class ``CLASSES[class_index]``, ``normal`` or ``nodule``.

    Array axes (X, Y, Z) = (patient right, anterior, superior) - RAS+, depth (axial slices) LAST.
    Both classes: a body of random size, ellipticity and position (fat -100, muscle 45), two lungs of random size
    (-850 HU with smooth parenchymal texture), 6-12 pulmonary vessels (thin tubes of radius 0.6-1.2 voxels,
    20-60 HU, random positions and directions inside the lungs), heart 45, spine 700 / 250, ribs 600, correlated
    and white noise of random strength. ``nodule``: 1-3 spherical nodules (radius 1.5-3.5 voxels, solid to
    part-solid: -400..60 HU, partial-volume edge) at random positions inside the lungs; ``normal``: none. The
    classes differ only by the nodules, which are larger and rounder than the vessels but of similar density: with
    generators in the same state, the two classes give the same volume except at the nodules.
    Returns hu int16 (X, Y, Z).
    """
    if class_index not in CT_VOLUME_CLASSES:
        raise ValueError(
            f"class_index {class_index} is not a CT volume class {[CLASSES[c] for c in CT_VOLUME_CLASSES]}"
        )
    x, y, z = _volume_grid(shape)
    grid = np.indices(shape, dtype=np.float64)
    j = lambda s: rng.uniform(-s, s)  # noqa: E731 - jitter
    centre_x, centre_y = j(0.06), -0.05 + j(0.06)
    body_r = (rng.uniform(0.8, 0.95), rng.uniform(0.55, 0.72))
    body_e = np.sqrt(((x - centre_x) / body_r[0]) ** 2 + ((y - centre_y) / body_r[1]) ** 2)
    hu = np.full(shape, -1000.0)
    hu[body_e < 1.0] = -100.0  # fat shell
    inner = body_e < 0.86
    hu[inner] = 45.0
    lungs = np.zeros(shape, dtype=bool)
    for side in (1.0, -1.0):
        centre = (centre_x + side * rng.uniform(0.36, 0.46) * body_r[0] / 0.9, centre_y + 0.05, 0.05 + j(0.1))
        radii = (rng.uniform(0.25, 0.33) * body_r[0] / 0.9, rng.uniform(0.38, 0.46) * body_r[1] / 0.66, 0.8 + j(0.1))
        lungs |= (_ellipsoid(x, y, z, centre, radii) < 1.0) & inner
    heart = _ellipsoid(x, y, z, (centre_x - 0.1 + j(0.04), centre_y + 0.22, -0.35 + j(0.1)), (0.28, 0.26, 0.4)) < 1.0
    lungs &= ~heart
    hu[lungs] = -850.0 + 25.0 * _smooth_noise(rng, shape, 2.0)[lungs]
    hu[heart] = 45.0
    spine = np.hypot(x - centre_x, (y - centre_y + 0.45 * body_r[1] / 0.66) * 1.2)
    hu[spine < 0.13] = 700.0  # cortical bone
    hu[spine < 0.09] = 250.0  # cancellous bone
    rib_levels = np.round((z + 1.0) * shape[2] / 2.0 - 0.5) % 4 == int(rng.integers(0, 4))
    hu[(body_e > 0.78) & (body_e < 0.86) & rib_levels & (y < centre_y + 0.4)] = 600.0
    candidates = np.argwhere(lungs)
    for _ in range(int(rng.integers(6, 13))):  # vessels: thin tubes inside the lungs
        start = candidates[int(rng.integers(0, len(candidates)))].astype(np.float64)
        direction = rng.normal(size=3)
        end = start + rng.uniform(4.0, 12.0) * direction / np.linalg.norm(direction)
        vessel = (_segment_distance(grid, start, end) < rng.uniform(0.6, 1.2)) & lungs
        hu[vessel] = rng.uniform(20.0, 60.0)
    noise_std = rng.uniform(8.0, 20.0)  # drawn before the nodules: both classes of one seed share it
    noise = noise_std * (_smooth_noise(rng, shape, 0.8) + rng.normal(0.0, 0.8, shape))
    if CLASSES[class_index] == "nodule":
        core = lungs.copy()
        for _ in range(2):  # erode by two voxels (6-neighbourhood): the nodules lie inside the lungs
            core[1:-1, 1:-1, 1:-1] &= core[:-2, 1:-1, 1:-1] & core[2:, 1:-1, 1:-1] & core[1:-1, :-2, 1:-1]
            core[1:-1, 1:-1, 1:-1] &= core[1:-1, 2:, 1:-1] & core[1:-1, 1:-1, :-2] & core[1:-1, 1:-1, 2:]
        inside = np.argwhere(core) if core.any() else candidates
        for _ in range(int(rng.integers(1, 4))):
            centre = inside[int(rng.integers(0, len(inside)))].astype(np.float64)
            radius = rng.uniform(1.5, 3.5)
            distance = np.sqrt(((grid - centre.reshape(3, 1, 1, 1)) ** 2).sum(0))
            weight = np.clip(radius + 0.5 - distance, 0.0, 1.0)  # partial-volume edge
            hu = hu * (1.0 - weight) + weight * rng.uniform(-400.0, 60.0)
    hu = hu + noise
    return np.rint(np.clip(hu, -1024.0, 3071.0)).astype(np.int16)


def synthetic_mr_phantom(
    rng: np.random.Generator, shape: tuple[int, int, int] = (64, 64, 32), contrast: str = "T1"
) -> tuple[np.ndarray, np.ndarray]:
    """A head MR phantom (T1- or T2-like contrast, arbitrary units) and its mask.

    Array axes (X, Y, Z) = (right, anterior, superior) - RAS+, depth LAST. Scalp, skull, CSF, grey and
    white matter with a folded boundary, two ventricles, 1-4 white-matter lesions (T1 dark / T2 bright),
    a smooth multiplicative bias field and Rician noise.
    Returns (intensity int16 (X, Y, Z), mask uint8 (X, Y, Z): 0 background, 1 brain, 2 lesion).
    """
    if contrast not in ("T1", "T2"):
        raise ValueError(f"contrast {contrast!r} must be 'T1' or 'T2'")
    tissue = {  # scalp, skull, csf, grey, white, lesion
        "T1": (700.0, 60.0, 180.0, 450.0, 650.0, 300.0),
        "T2": (350.0, 40.0, 900.0, 520.0, 380.0, 800.0),
    }[contrast]
    x, y, z = _volume_grid(shape)
    j = lambda s: rng.uniform(-s, s)  # noqa: E731
    head = _ellipsoid(x, y, z, (0.0, j(0.03), -0.05), (0.8 + j(0.04), 0.92 + j(0.04), 0.92))
    image = np.zeros(shape)
    image[head < 1.0] = tissue[0]
    image[head < 0.86] = tissue[1]
    image[head < 0.74] = tissue[2]
    brain = head < 0.66
    folds = 0.06 * _smooth_noise(rng, shape, 1.5)
    image[brain] = tissue[3]
    white = (head + folds < 0.42) & brain
    image[white] = tissue[4]
    for side in (-1.0, 1.0):
        image[_ellipsoid(x, y, z, (side * 0.12, 0.05, 0.05), (0.08, 0.3, 0.18)) < 1.0] = tissue[2]
    lesions = _place_spheres(rng, white & (head < 0.3), int(rng.integers(1, 5)), (1.2, 2.8))
    image[lesions] = tissue[5]
    bias = np.exp(0.12 * _smooth_noise(rng, shape, 12.0))
    sigma = 18.0
    image = np.hypot(image * bias + rng.normal(0.0, sigma, shape), rng.normal(0.0, sigma, shape))
    mask = np.zeros(shape, dtype=np.uint8)
    mask[brain] = 1
    mask[lesions] = 2
    return np.rint(image).astype(np.int16), mask


