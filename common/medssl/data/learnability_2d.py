"""The learnability set's 2D generators (128 x 128): chest radiographs, colour fundus photographs and H&E tiles,
one class-labelled image per call (see :mod:`medssl.data.learnability`)."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from .demo.generators import _sigmoid, _to_uint8, rib_cage
from .learnability_common import (
    LEARN_CLASSES,
    LEARN_SIZE_2D,
    _blur,
    _ellipse_points,
    _grid2,
    _noise_field,
    _splat_ellipses,
)

__all__ = ["learn_chest_xr", "learn_fundus", "learn_histology"]


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

