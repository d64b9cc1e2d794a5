"""Synthetic chest radiograph phantoms: pure numpy drawing, no I/O.

The demo dataset (:mod:`covidcxr.datasets.demo`) is made of these. Each phantom is built as a map of
X-ray density (body, lungs, mediastinum, heart, spine, ribs, clavicles, diaphragm), turned into a
display image with air dark, then given a site's look (exposure, contrast, gamma, noise, blur and a
burned-in marker). Frontal phantoms come with the exact lung mask they were drawn from.

The lung mask is decided by correctly rounded IEEE operations only (+, -, *, /, sqrt, comparisons,
after one cos/sin of the pose angle), so it is the same on every machine; ``exp`` and ``power``
only shade the image. All drawing is seeded: the same generator state gives the same phantom.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

PROJECTIONS = ("frontal", "lateral")
FINDINGS = ("none", "nodule", "consolidation")
CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
# float64 on purpose: exp/power may differ by an ULP or two between CPUs (SIMD vs libm). In float64
# such a difference moves a 12-bit output value with odds of about 1e-12 per pixel; in float32, 1e-3.
_FLOAT = np.float64

# 5x7 bitmap glyphs for burned-in markers (rows top to bottom, "#" = lit).
_GLYPHS: dict[str, tuple[str, ...]] = {
    "A": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "C": (".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."),
    "D": ("####.", "#...#", "#...#", "#...#", "#...#", "#...#", "####."),
    "L": ("#....", "#....", "#....", "#....", "#....", "#....", "#####"),
    "P": ("####.", "#...#", "#...#", "####.", "#....", "#....", "#...."),
    "R": ("####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"),
    "X": ("#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
}


@dataclass(frozen=True)
class SiteStyle:
    """How one site's equipment renders a chest: exposure, tone curve, noise, blur and marker.

    ``exposure`` scales the attenuation (higher: brighter body), ``brightness``/``contrast``/``gamma``
    shape the tone curve, ``noise`` is white noise and ``mottle`` low-frequency noise (both in
    display units), ``blur`` a gaussian sigma in pixels at 256 px. ``marker`` is the burned-in text
    ("" for none), drawn at ``marker_corner`` with intensity ``marker_value``, boxed if ``marker_box``.
    """

    exposure: float = 1.0
    brightness: float = 0.0
    contrast: float = 1.0
    gamma: float = 1.0
    noise: float = 0.015
    mottle: float = 0.01
    blur: float = 0.0
    marker: str = ""
    marker_corner: str = "top-left"
    marker_value: float = 0.97
    marker_box: bool = False

    def __post_init__(self) -> None:
        if self.marker_corner not in CORNERS:
            raise ValueError(f"marker_corner must be one of {CORNERS}, got {self.marker_corner!r}")
        unknown = sorted(set(self.marker) - set(_GLYPHS))
        if unknown:
            raise ValueError(f"marker {self.marker!r} uses characters without a glyph: {unknown}")
        if self.gamma <= 0 or self.contrast <= 0 or self.exposure <= 0:
            raise ValueError("exposure, contrast and gamma must be positive")


@dataclass(frozen=True)
class Anatomy:
    """One patient's body, in fractions of the image side (so follow-up images look alike)."""

    body_half_width: float  # half width of the trunk below the shoulders
    lung_top: float  # apex height
    lung_base: float  # height of the costophrenic angles
    lung_width: float  # lateral reach of each lung from the midline
    mediastinum: float  # half width of the upper mediastinum
    heart_rx: float
    heart_ry: float
    heart_shift: float  # heart centre to the image right (patient's left) of the midline
    dome: float  # height of the diaphragm domes above the costophrenic angles
    rib_spacing: float
    rib_phase: float
    lung_density: float  # how much air the lungs hold (darkness)
    vessels: float  # strength of hilar vascular markings


def draw_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one adult's anatomy (used for every image of that patient)."""
    u = rng.uniform
    return Anatomy(
        body_half_width=u(0.40, 0.45),
        lung_top=u(0.14, 0.18),
        lung_base=u(0.70, 0.76),
        lung_width=u(0.36, 0.41),
        mediastinum=u(0.045, 0.06),
        heart_rx=u(0.15, 0.17),
        heart_ry=u(0.10, 0.125),
        heart_shift=u(0.055, 0.075),
        dome=u(0.05, 0.08),
        rib_spacing=u(0.052, 0.06),
        rib_phase=u(0.0, 0.012),
        lung_density=u(0.58, 0.68),
        vessels=u(0.12, 0.2),
    )


def chest_phantom(
    rng: np.random.Generator,
    size: int,
    *,
    projection: str,
    covid: bool,
    site: SiteStyle | dict,
    finding: str = "none",
    severity: float | None = None,
    anatomy: Anatomy | None = None,
    ap: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Draw one chest radiograph phantom.

    Returns a float image in [0, 1] (air dark, bone bright) and, for frontal phantoms, the bool lung
    mask (both lungs) the image was drawn from; ``None`` for lateral ones. ``covid`` adds bilateral,
    peripheral, lower-zone ground-glass opacities of extent ``severity`` (0-1, drawn when None);
    ``finding`` adds a non-COVID finding ("nodule" or "consolidation"). Every finding lies inside
    the lungs. ``ap`` draws an AP view (larger heart, shallower inspiration, higher clavicles).

    Anatomy, pose, findings and noise use separate streams drawn from ``rng``, so the same ``rng``
    state with and without ``covid`` gives images that differ only inside the lungs.
    """
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    if finding not in FINDINGS:
        raise ValueError(f"finding must be one of {FINDINGS}, got {finding!r}")
    if size < 64:
        raise ValueError(f"size must be at least 64 pixels, got {size}")
    style = site if isinstance(site, SiteStyle) else SiteStyle(**site)
    anat_rng, pose_rng, find_rng, tex_rng = (np.random.default_rng(s) for s in rng.integers(0, 2**63, size=4))
    anat = anatomy if anatomy is not None else draw_anatomy(anat_rng)
    if severity is None:
        severity = float(find_rng.uniform(0.25, 1.0))
    if not 0.0 <= severity <= 1.0:
        raise ValueError(f"severity must be in [0, 1], got {severity}")
    u, v = _grid(size, pose_rng)
    if projection == "frontal":
        if ap:
            anat = replace(anat, heart_rx=anat.heart_rx * 1.12, heart_ry=anat.heart_ry * 1.08,
                           lung_base=anat.lung_base - 0.03)
        density, lung = _frontal(u, v, anat, ap, tex_rng, size)
        mask = lung
    else:
        density, lung = _lateral(u, v, anat, tex_rng, size)
        mask = None
    lesions = np.zeros_like(density)
    if covid:
        lesions += _ground_glass(find_rng, lung, u, v, severity, size, projection)
    if finding == "nodule":
        lesions += _nodule(find_rng, lung, size)
    elif finding == "consolidation":
        lesions += _consolidation(find_rng, lung, u, v, size)
    image = _render(density, lesions * _soft(lung, size) * lung, style, tex_rng, size)
    return image, mask


# ---------------------------------------------------------------- geometry helpers


def _grid(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in image fractions, with a small random patient pose."""
    shift_u, shift_v = rng.uniform(-0.02, 0.02, size=2)
    angle = rng.uniform(-0.05, 0.05)
    scale = rng.uniform(0.97, 1.03)
    c = (np.arange(size, dtype=_FLOAT) + 0.5) / size - 0.5
    x, y = np.meshgrid(c, c)
    cos, sin = math.cos(angle), math.sin(angle)
    u = (cos * x + sin * y) / scale + 0.5 - shift_u
    v = (-sin * x + cos * y) / scale + 0.5 - shift_v
    return u, v


def _smoothstep(t: np.ndarray) -> np.ndarray:
    """Hermite step from 0 (t <= 0) to 1 (t >= 1). Overwrites ``t``: callers pass a temporary array."""
    np.clip(t, 0.0, 1.0, out=t)
    square = t * t
    t *= -2.0
    t += 3.0
    square *= t
    return square


def _band(distance: np.ndarray, half: float, soft: float) -> np.ndarray:
    """1 within ``half`` of a centre line, falling to 0 over ``soft`` (all in image fractions)."""
    return _smoothstep((half + soft - np.abs(distance)) / soft)


def _nearest_rib(height: np.ndarray, first: float, spacing: float, count: int) -> np.ndarray:
    """Offset of each pixel from the nearest of ``count`` ribs of one shape, ``first + i * spacing``.

    ``height`` is the pixel height minus the rib shape's own height at that pixel; drawing all ribs
    from their nearest one is one pass over the image instead of one per rib.
    """
    index = np.clip(np.rint((height - first) / spacing), 0, count - 1)
    return height - (first + index * spacing)


def _ellipse(u: np.ndarray, v: np.ndarray, cu: float, cv: float, ru: float, rv: float) -> np.ndarray:
    """Squared normalised radius: < 1 inside the ellipse."""
    return ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2


def _soft(mask: np.ndarray, size: int, sigma: float = 0.8) -> np.ndarray:
    return ndimage.gaussian_filter(mask.astype(_FLOAT), sigma * size / 256)


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Unit-variance gaussian-filtered noise (sigma in pixels at 256 px).

    Coarse noise (sigma of 3 px or more) is filtered at a quarter of the size and upsampled: the
    same look for a fraction of the cost.
    """
    sigma = sigma * size / 256
    if sigma >= 3.0 and size >= 64:
        small = ndimage.gaussian_filter(rng.standard_normal((size // 4, size // 4), dtype=_FLOAT), sigma / 4)
        field = ndimage.zoom(small, size / (size // 4), order=1, grid_mode=True, mode="nearest")
    else:
        field = ndimage.gaussian_filter(rng.standard_normal((size, size), dtype=_FLOAT), sigma)
    return (field - field.mean()) / max(float(field.std()), 1e-12)


# ---------------------------------------------------------------- frontal view


def _rounded_border(t: np.ndarray, start: float, end: float, reach: float) -> np.ndarray:
    """A border that leaves ``start`` at t = 0 on a quarter ellipse and reaches ``end`` at t = ``reach``."""
    s = np.clip(t / reach, 0.0, 1.0)
    return start + (end - start) * np.sqrt(1.0 - (1.0 - s) ** 2)


def _heart(u: np.ndarray, v: np.ndarray, a: Anatomy) -> np.ndarray:
    """Squared normalised radius of the heart: an ellipse tilted down towards the patient's left."""
    cos, sin = 12.0 / 13.0, 5.0 / 13.0
    du = u - (0.5 + a.heart_shift)
    dv = v - (a.lung_base - 0.8 * a.heart_ry - 0.01)
    return ((cos * du + sin * dv) / a.heart_rx) ** 2 + ((-sin * du + cos * dv) / a.heart_ry) ** 2


def _knob(u: np.ndarray, v: np.ndarray, a: Anatomy) -> np.ndarray:
    """Squared normalised radius of the aortic knob, on the patient's left of the upper mediastinum."""
    return _ellipse(u, v, 0.5 + a.mediastinum + 0.01, a.lung_top + 0.17 * (a.lung_base - a.lung_top), 0.032, 0.028)


def _frontal_lungs(u: np.ndarray, v: np.ndarray, a: Anatomy) -> np.ndarray:
    """Both lung fields: rounded apices, mediastinal borders, costophrenic angles, heart and knob cut out."""
    height = a.lung_base - a.lung_top
    t = (v - a.lung_top) / height
    lungs = np.zeros(u.shape, dtype=bool)
    cut = (_heart(u, v, a) < 1.0) | (_knob(u, v, a) < 1.0)
    for side in (-1.0, 1.0):
        d = side * (u - 0.5)  # distance from the midline, positive towards this lung's lateral wall
        inner = a.mediastinum + (0.01 if side < 0 else 0.0)
        apex = 0.47 * a.lung_width
        outer = _rounded_border(t, apex, a.lung_width * (0.94 + 0.06 * t), 0.55)
        medial = _rounded_border(t, apex, inner, 0.2)
        centre = 0.5 * (inner + a.lung_width)
        k = (d - centre) / (0.525 * (a.lung_width - inner))
        dome = a.lung_base - a.dome * (1.0 - k * k) - (0.015 if side < 0 else 0.0)
        lungs |= _largest_component((t >= 0.0) & (d > medial) & (d < outer) & (v < dome) & ~cut)
    return lungs


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected part of ``mask`` (drops stray pixels at a sharp costophrenic tip)."""
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    return labels == int(np.argmax(np.bincount(labels.ravel())[1:])) + 1


def _frontal(
    u: np.ndarray, v: np.ndarray, a: Anatomy, ap: bool, rng: np.random.Generator, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Density map of a PA/AP chest and its lung mask."""
    d = np.abs(u - 0.5)
    height = a.lung_base - a.lung_top
    # Trunk: neck, shoulders, then a slowly tapering cylinder (thinner tissue at the edges).
    shoulder = _smoothstep((v + 0.02) / 0.22)
    half_w = 0.1 + (a.body_half_width - 0.1) * shoulder - 0.03 * np.clip(v - 0.5, 0, None)
    body_edge = _smoothstep((half_w - d) / 0.012)
    depth = np.sqrt(np.clip(1.0 - (d / half_w) ** 2, 0.0, 1.0))
    density = body_edge * (0.55 + 0.45 * depth)
    # Humeral heads at the shoulders.
    for side in (-1.0, 1.0):
        r2 = _ellipse(u, v, 0.5 + side * (a.body_half_width - 0.04), a.lung_top - 0.01, 0.04, 0.045)
        density += 0.35 * _smoothstep((1.0 - r2) / 0.3)
    lungs = _frontal_lungs(u, v, a)
    density -= a.lung_density * _soft(lungs, size)
    # Vascular markings: denser towards the hila, plus fine texture.
    for side in (-1.0, 1.0):
        hilum = _ellipse(u, v, 0.5 + side * (a.mediastinum + 0.06), a.lung_top + 0.42 * height, 0.09, 0.14)
        density += a.vessels * np.exp(-hilum) * lungs
    density += 0.045 * _smooth_noise(rng, size, 1.2) * lungs
    # Mediastinum, heart (bulging to the patient's left, image right), aortic knob, spine, trachea.
    mediastinum = 0.28 * _band(u - 0.5, a.mediastinum - 0.01, 0.012) * (v < a.lung_base + 0.05)
    heart = 0.3 * _smoothstep((1.0 - _heart(u, v, a)) / 0.15)
    knob = 0.25 * _smoothstep((1.0 - _knob(u, v, a)) / 0.3)
    density += np.maximum(np.maximum(mediastinum, heart), knob)
    disc = ((v - a.rib_phase) / (a.rib_spacing * 0.9)) % 1.0
    vertebra = 0.75 + 0.25 * _smoothstep((disc - 0.08) / 0.1)
    density += 0.14 * vertebra * _band(u - 0.5, 0.028, 0.008)
    carina = a.lung_top + 0.3 * height
    density -= 0.2 * _band(u - 0.5, 0.011, 0.005) * _smoothstep((carina - v) / 0.02) * (v > 0.02)
    # Ribs: posterior ones arch up from the spine and curve down the chest wall; anterior ones are
    # fainter and slope down towards the midline. Only over the chest, not the neck or abdomen.
    thorax = _smoothstep((half_w - 0.015 - d) / 0.02) * (d > 0.025)
    dome_line = a.lung_base + 0.02
    first = a.lung_top - 0.035 + a.rib_phase
    offset = _nearest_rib(v - (-0.25 * d + 1.6 * d * d), first, a.rib_spacing, 11)
    below_dome = _smoothstep((dome_line + 0.03 - (v - offset)) / 0.04)
    density += 0.11 * _band(offset, 0.009, 0.005) * thorax * below_dome
    offset = _nearest_rib(v - (0.03 + 0.35 * (0.42 - d)), first, a.rib_spacing, 11)
    density += 0.05 * _band(offset, 0.008, 0.004) * thorax * (d > 0.1) * (v - offset < dome_line)
    # Clavicles: from the sternal notch, out and slightly up to the shoulders.
    clav_y = a.lung_top - (0.015 if ap else -0.005)
    dc = d - 0.03
    clav = clav_y - 0.12 * dc + 0.35 * dc * dc
    density += 0.32 * _band(v - clav, 0.012, 0.006) * (d > 0.03) * (d < a.body_half_width - 0.04)
    # Gastric bubble under the left dome.
    bubble = _ellipse(u, v, 0.5 + 0.17, a.lung_base + 0.04, 0.05, 0.025)
    density -= 0.25 * _smoothstep((1.0 - bubble) / 0.4) * body_edge
    return np.clip(density, 0.0, None), lungs


# ---------------------------------------------------------------- lateral view


def _lateral(
    u: np.ndarray, v: np.ndarray, a: Anatomy, rng: np.random.Generator, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Density map of a left lateral chest (anterior to the image left) and its single lung field."""
    depth = 0.29 + 0.12 * (a.body_half_width - 0.40) / 0.05  # half the antero-posterior diameter
    cu = 0.52
    front = cu - depth + 0.05 * ((v - 0.5) / 0.5) ** 2  # chest wall bulges forward at mid height
    back = cu + depth
    # Trunk: an upright slab, thicker in the middle; shoulders and raised arms over the top.
    edge = _smoothstep((u - front) / 0.02) * _smoothstep((back - u) / 0.02)
    rel = (u - 0.5 * (front + back)) / (0.5 * (back - front))
    density = edge * (0.75 + 0.25 * np.sqrt(np.clip(1.0 - rel * rel, 0.0, 1.0)))
    density += 0.3 * edge * _smoothstep((0.2 - v) / 0.15)
    # One field for both superimposed lungs: rounded apex, anterior border behind the sternum,
    # posterior border along the spine, diaphragm sloping down to the posterior sulcus.
    top = a.lung_top - 0.02
    height = a.lung_base + 0.04 - top
    t = (v - top) / height
    lf, lb = cu - depth + 0.07, back - 0.13
    apex = lf + 0.55 * (lb - lf)
    anterior = _rounded_border(t, apex, lf + 0.03 * t, 0.45)
    posterior = _rounded_border(t, apex, lb, 0.3)
    k = (u - lf) / (lb - lf)
    diaphragm = a.lung_base - a.dome - 0.03 + 0.1 * k - 0.05 * (2.0 * k - 1.0) ** 2 + 0.04
    lung = (t >= 0.0) & (u > anterior) & (u < posterior) & (v < diaphragm)
    density -= 0.85 * a.lung_density * _soft(lung, size)
    density += 0.045 * _smooth_noise(rng, size, 1.2) * lung
    hilum = _ellipse(u, v, apex, top + 0.42 * height, 0.08, 0.1)
    density += a.vessels * np.exp(-hilum) * lung
    # Heart: anterior and low, behind the sternum, resting on the diaphragm.
    heart = _ellipse(u, v, lf + 0.13, a.lung_base - a.dome - 0.05, 0.14, 0.12)
    density += 0.28 * _smoothstep((1.0 - heart) / 0.2)
    # Spine at the back: vertebral bodies separated by discs, posterior elements behind.
    spine_u = back - 0.09
    disc = ((v - a.rib_phase) / (a.rib_spacing * 0.95)) % 1.0
    vertebra = 0.6 + 0.4 * _smoothstep((disc - 0.08) / 0.06) * _smoothstep((0.94 - disc) / 0.06)
    density += 0.3 * vertebra * _band(u - spine_u, 0.03, 0.008)
    density += 0.12 * _band(u - (spine_u + 0.055), 0.015, 0.01)
    # Sternum at the front, slightly tilted.
    sternum_u = front + 0.025
    density += 0.28 * _band(u - sternum_u, 0.009, 0.005) * _band(v - 0.4, 0.2, 0.03)
    # Trachea: dark band running down and back to the hila.
    trachea_u = apex - 0.1 + 0.25 * v
    density -= 0.18 * _band(u - trachea_u, 0.014, 0.006) * _smoothstep((top + 0.3 * height - v) / 0.03)
    # Posterior ribs: faint oblique arcs behind the lung.
    offset = _nearest_rib(v - (0.3 * (spine_u - u) - 0.5 * (spine_u - u) ** 2), top + a.rib_phase, a.rib_spacing, 10)
    density += 0.06 * _band(offset, 0.008, 0.005) * (u < spine_u) * (u > apex - 0.1) * edge
    return np.clip(density, 0.0, None), lung


# ---------------------------------------------------------------- findings


def _lung_sides(lung: np.ndarray) -> list[np.ndarray]:
    """The lung split into its left and right halves of the image (one per lung on frontal views)."""
    half = lung.shape[1] // 2
    left, right = lung.copy(), lung.copy()
    left[:, half:] = False
    right[:, :half] = False
    return [s for s in (left, right) if s.any()]


def _pick(rng: np.random.Generator, weight: np.ndarray, n: int) -> np.ndarray:
    """``n`` pixel indices drawn with probability proportional to ``weight``."""
    flat = weight.ravel().astype(np.float64)
    return rng.choice(flat.size, size=n, p=flat / flat.sum())


def _add_blob(field: np.ndarray, row: int, col: int, sigma: float, weight: float) -> None:
    """Add a gaussian blob (cut at 4 sigma) to ``field`` in place."""
    reach = int(math.ceil(4.0 * sigma))
    r0, r1 = max(row - reach, 0), min(row + reach + 1, field.shape[0])
    c0, c1 = max(col - reach, 0), min(col + reach + 1, field.shape[1])
    rows = (np.arange(r0, r1, dtype=_FLOAT)[:, None] - row) ** 2
    cols = (np.arange(c0, c1, dtype=_FLOAT)[None, :] - col) ** 2
    field[r0:r1, c0:c1] += weight * np.exp(-(rows + cols) / (2.0 * sigma * sigma))


def _ground_glass(
    rng: np.random.Generator, lung: np.ndarray, u: np.ndarray, v: np.ndarray, severity: float,
    size: int, projection: str,
) -> np.ndarray:
    """Bilateral, peripheral, lower-zone hazy opacities (density increase, inside the lungs)."""
    rows = np.nonzero(lung.any(axis=1))[0]
    top, bottom = rows[0] / size, (rows[-1] + 1) / size
    low = np.clip((v - top) / (bottom - top), 0.0, 1.0) ** 2
    if projection == "frontal":
        outer = np.clip((np.abs(u - 0.5) - 0.05) / 0.3, 0.0, 1.0) ** 2  # lateral lung borders
    else:
        cols = np.nonzero(lung.any(axis=0))[0]
        outer = np.clip((u - cols[0] / size) / ((cols[-1] - cols[0]) / size), 0.0, 1.0) ** 2  # posterior
    weight = lung * (0.05 + low) * (0.1 + outer)
    field = np.zeros(lung.shape, dtype=_FLOAT)
    n_per_side = 2 + int(round(severity * 7))
    for side in _lung_sides(lung) if projection == "frontal" else [lung]:
        for idx in _pick(rng, weight * side, n_per_side):
            row, col = divmod(int(idx), size)
            sigma = rng.uniform(0.025, 0.055) * size
            _add_blob(field, row, col, sigma, rng.uniform(0.6, 1.0))
    patchy = np.clip(0.75 + 0.35 * _smooth_noise(rng, size, 4.0), 0.2, None)
    amplitude = 0.35 + 0.4 * severity
    return amplitude * (1.0 - np.exp(-field * patchy))


def _nodule(rng: np.random.Generator, lung: np.ndarray, size: int) -> np.ndarray:
    """One small round, well-defined opacity, well inside one lung."""
    radius = rng.uniform(0.012, 0.022) * size
    room = ndimage.distance_transform_edt(lung) > radius + 3
    if not room.any():
        room = lung
    row, col = divmod(int(_pick(rng, room.astype(np.float64), 1)[0]), size)
    rr = np.sqrt((np.arange(size)[:, None] - row) ** 2 + (np.arange(size)[None, :] - col) ** 2)
    return 0.5 * _smoothstep((radius - rr) / 1.5)


def _consolidation(
    rng: np.random.Generator, lung: np.ndarray, u: np.ndarray, v: np.ndarray, size: int
) -> np.ndarray:
    """Dense opacity filling the upper or lower lobe of one lung, bounded by a fissure."""
    sides = _lung_sides(lung)
    side = sides[int(rng.integers(len(sides)))]
    rows = np.nonzero(side.any(axis=1))[0]
    top, bottom = rows[0] / size, (rows[-1] + 1) / size
    fissure = top + rng.uniform(0.4, 0.6) * (bottom - top) + rng.uniform(-0.15, 0.15) * (u - 0.5)
    lobe = (v > fissure) if rng.uniform() < 0.7 else (v < fissure)
    region = _soft(side & lobe, size, 2.0)
    texture = np.clip(0.9 + 0.15 * _smooth_noise(rng, size, 2.0), 0.5, None)
    return rng.uniform(0.35, 0.5) * region * texture


# ---------------------------------------------------------------- rendering


def _render(
    density: np.ndarray, lesions: np.ndarray, style: SiteStyle, rng: np.random.Generator, size: int
) -> np.ndarray:
    """Density to a site-styled display image in [0, 1] (air dark) with the burned-in marker.

    The site's blur acts on the anatomy only; ``lesions`` (zero outside the lungs, already smooth)
    are added after it, so that no finding spreads beyond the lung mask.
    """
    if style.blur > 0:
        density = ndimage.gaussian_filter(density, style.blur * size / 256)
    image = 1.0 - np.exp(-1.35 * style.exposure * (density + lesions))
    image = np.clip(style.brightness + 0.5 + style.contrast * (image - 0.5), 0.0, 1.0) ** style.gamma
    image = image + style.noise * rng.standard_normal(image.shape, dtype=_FLOAT)
    image = image + style.mottle * _smooth_noise(rng, size, 6.0)
    image = np.clip(image, 0.0, 1.0)
    if style.marker:
        _burn_marker(image, style)
    return image


def _burn_marker(image: np.ndarray, style: SiteStyle) -> None:
    """Burn the site's marker text into a corner, in place."""
    size = image.shape[0]
    cell = max(1, round(size / 96))
    glyph_w, glyph_h, gap = 5 * cell, 7 * cell, cell
    width = len(style.marker) * (glyph_w + gap) - gap
    pad = 2 * cell if style.marker_box else 0
    margin = round(0.035 * size)
    top = margin if style.marker_corner.startswith("top") else size - margin - glyph_h - pad
    left = margin if style.marker_corner.endswith("left") else size - margin - width - pad
    if style.marker_box:
        image[top - pad : top + glyph_h + pad, left - pad : left + width + pad] = 0.0
        image[top - pad : top + glyph_h + pad, [left - pad, left + width + pad - 1]] = style.marker_value
        image[[top - pad, top + glyph_h + pad - 1], left - pad : left + width + pad] = style.marker_value
    for k, char in enumerate(style.marker):
        bitmap = np.array([[c == "#" for c in row] for row in _GLYPHS[char]])
        lit = np.kron(bitmap, np.ones((cell, cell), dtype=bool))
        x0 = left + k * (glyph_w + gap)
        image[top : top + glyph_h, x0 : x0 + glyph_w][lit] = style.marker_value
