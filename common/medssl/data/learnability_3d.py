"""The learnability set's 3D generators (64 x 64 x 64, axes (X, Y, Z) = (right, anterior, superior), depth last):
chest CT and brain MR volumes, one class-labelled volume per call (see :mod:`medssl.data.learnability`)."""

from __future__ import annotations

import numpy as np

from .learnability_common import LEARN_CLASSES, LEARN_SHAPE_3D, _noise_field

__all__ = ["learn_chest_ct", "learn_brain_mr"]


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

