"""Synthetic brain tumours: necrotic core, enhancing rim and oedema as soft fractions.

A tumour is described in millimetres (centre, radii, shape noise), so one seed gives the
same tumour at any spacing. Each compartment is the inside of a perturbed ellipsoidal
distance map, with a partial-volume ramp one voxel wide (at least 3 mm for the diffuse
oedema edge). The solid tumour replaces every normal tissue; oedema replaces
white matter fully and grey matter only partly (its spread follows WM) and never takes
CSF. An optional radial push (mass effect) moves the surrounding tissue outward before the
tumour is inserted, with the brain outline held fixed as the skull would hold it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from . import augment, fields, physics
from .physics import Relaxation
from .tissue import TissueMaps, load_tissue_maps

RADIUS_ENHANCING_MM = (8.0, 20.0)
CORE_RATIO = (0.3, 0.7)  # necrotic core radius / enhancing radius
CORE_OFFSET = 0.5  # core centre shifted by up to this share of the rim thickness
EDEMA_RATIO = (1.5, 3.0)  # oedema radius / enhancing radius
BRAIN_MARGIN_MM = 10.0  # centre at least this deep inside the brain mask
CSF_CLEARANCE = 0.6  # prefer centres at least this many r_e away from CSF-dominant voxels
AXIS_LOG_RANGE = 0.2  # ellipsoid semi-axes within exp(+-0.2), volume preserving
IRREGULARITY = {"necrotic": (0.15, 0.35), "enhancing": (0.15, 0.30), "edema": (0.20, 0.35)}
#: Shape-noise control points per axis, spread over each compartment's own extent, so a
#: boundary gets a few lobes whatever its size.
SHAPE_CONTROL_POINTS = 7
SHAPE_NOISE_STD = 0.5  # of the shape field, clipped to +-1; boundary radius varies by +-irregularity
GM_EDEMA_WEIGHT = (0.2, 0.4)  # share of grey matter that oedema replaces (WM: all)
EDEMA_EDGE_MM = 3.0
MASS_EFFECT_FRACTION = (0.2, 0.7)  # share of the solid volume that displaces tissue
PLACEMENT_SPACING_MM = 2.0

TUMOUR_COMPARTMENTS = ("edema", "necrotic", "enhancing")


@dataclass(frozen=True, eq=False)
class TumourParams:
    """Everything that defines one tumour (mm, RAS); see :func:`sample_tumour`."""

    centre_ras: np.ndarray
    core_offset_mm: np.ndarray  # necrotic core centre relative to ``centre_ras``
    radius_enhancing_mm: float
    radius_core_mm: float
    radius_edema_mm: float
    semi_axes: np.ndarray  # relative scale of the three ellipsoid axes (product 1)
    rotation: np.ndarray  # 3x3, columns are the ellipsoid axes in RAS
    irregularity: dict[str, float]
    shape_coeffs: dict[str, np.ndarray]
    tissues: dict[str, Relaxation]
    t1c_factor: float
    gm_edema_weight: float
    mass_effect_fraction: float | None

    def radius_mm(self, compartment: str) -> float:
        """Nominal radius of a compartment's outer boundary."""
        return {
            "necrotic": self.radius_core_mm,
            "enhancing": self.radius_enhancing_mm,
            "edema": self.radius_edema_mm,
        }[compartment]

    def reach_mm(self, compartment: str) -> float:
        """Largest distance from the centre at which a compartment's perturbed boundary can
        lie; its shape noise is defined over a box of this half-size."""
        stretch = self.semi_axes.max() / (1.0 - self.irregularity[compartment])
        return float(self.radius_mm(compartment) * stretch)

    def as_dict(self) -> dict[str, object]:
        return {
            "centre_ras_mm": [float(v) for v in self.centre_ras],
            "core_offset_mm": [float(v) for v in self.core_offset_mm],
            "radii_mm": {
                "enhancing": self.radius_enhancing_mm,
                "necrotic_core": self.radius_core_mm,
                "edema": self.radius_edema_mm,
            },
            "semi_axis_scales": [float(v) for v in self.semi_axes],
            "rotation_columns_ras": [[float(v) for v in row] for row in self.rotation],
            "irregularity": dict(self.irregularity),
            "relaxation": {name: t.as_dict() for name, t in self.tissues.items()},
            "t1c_enhancing_T1_factor": self.t1c_factor,
            "gm_edema_weight": self.gm_edema_weight,
            "mass_effect_volume_fraction": self.mass_effect_fraction,
        }


@functools.lru_cache(maxsize=1)
def _placement_candidates() -> tuple[np.ndarray, np.ndarray]:
    """Centres (N, 3 RAS mm) of 2 mm cells deep in WM/GM, and their distance to CSF (mm).

    Computed once from the 2 mm maps whatever the output spacing, so placement does not
    depend on it.
    """
    maps = load_tissue_maps(PLACEMENT_SPACING_MM)
    s = maps.spacing
    brain = maps.brain >= 0.5
    depth = ndimage.distance_transform_edt(brain, sampling=s)
    dist_csf = ndimage.distance_transform_edt(maps.csf < 0.5, sampling=s)
    ok = (depth >= BRAIN_MARGIN_MM) & (maps.wm + maps.gm >= 0.5)
    k, j, i = np.nonzero(ok)
    ijk1 = np.stack([i, j, k, np.ones_like(i)]).astype(np.float64)
    centres = (maps.affine @ ijk1)[:3].T
    return centres, dist_csf[ok].astype(np.float64)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def sample_tumour(rng: np.random.Generator, mass_effect: bool = True) -> TumourParams:
    """Draw a tumour: size, placement deep in WM/GM away from CSF, shape and tissue values."""
    r_e = float(rng.uniform(*RADIUS_ENHANCING_MM))
    r_core = r_e * float(rng.uniform(*CORE_RATIO))
    r_ed = r_e * float(rng.uniform(*EDEMA_RATIO))
    centres, dist_csf = _placement_candidates()
    preferred = np.flatnonzero(dist_csf >= CSF_CLEARANCE * r_e)
    if preferred.size < 20:  # large tumours: fall back to the cells farthest from CSF
        preferred = np.argsort(dist_csf)[-max(20, dist_csf.size // 20):]
    pick = int(preferred[rng.integers(preferred.size)])
    centre = centres[pick] + rng.uniform(-0.5, 0.5, size=3) * PLACEMENT_SPACING_MM
    log_axes = rng.uniform(-AXIS_LOG_RANGE, AXIS_LOG_RANGE, size=3)
    semi_axes = np.exp(log_axes - log_axes.mean())
    rotation = _random_rotation(rng)
    direction = rng.standard_normal(3)
    core_offset = direction / np.linalg.norm(direction) * rng.uniform(0.0, CORE_OFFSET) * (r_e - r_core)
    irregularity = {name: float(rng.uniform(*IRREGULARITY[name])) for name in TUMOUR_COMPARTMENTS}
    n = SHAPE_CONTROL_POINTS
    shape_coeffs = {
        name: fields.random_coefficients(rng, (n, n, n), std=SHAPE_NOISE_STD).astype(np.float32)
        for name in TUMOUR_COMPARTMENTS
    }
    tissues, t1c_factor = physics.sample_tumour_tissues(rng)
    gm_weight = float(rng.uniform(*GM_EDEMA_WEIGHT))
    me = float(rng.uniform(*MASS_EFFECT_FRACTION))
    return TumourParams(
        centre_ras=centre,
        core_offset_mm=core_offset,
        radius_enhancing_mm=r_e,
        radius_core_mm=r_core,
        radius_edema_mm=r_ed,
        semi_axes=semi_axes,
        rotation=rotation,
        irregularity=irregularity,
        shape_coeffs=shape_coeffs,
        tissues=tissues,
        t1c_factor=t1c_factor,
        gm_edema_weight=gm_weight,
        mass_effect_fraction=me if mass_effect else None,
    )


def _box(centre: np.ndarray, radius_mm: float, maps: TissueMaps) -> tuple[slice, slice, slice]:
    """(k, j, i) slices of the voxels whose centres lie within ``radius_mm`` of ``centre``."""
    xs, ys, zs = fields.axis_centres(maps.affine, maps.shape)
    out = []
    for coords, c in ((zs, centre[2]), (ys, centre[1]), (xs, centre[0])):
        inside = np.flatnonzero(np.abs(coords - c) <= radius_mm)
        if inside.size == 0:
            inside = np.array([int(np.argmin(np.abs(coords - c)))])
        out.append(slice(int(inside[0]), int(inside[-1]) + 1))
    return tuple(out)


def _box_centres(maps: TissueMaps, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, ...]:
    xs, ys, zs = fields.axis_centres(maps.affine, maps.shape)
    return xs[box[2]], ys[box[1]], zs[box[0]]


def _offsets(centres: tuple[np.ndarray, ...], centre: np.ndarray) -> list[np.ndarray]:
    """Broadcastable (k, j, i) arrays of x, y and z offsets from ``centre`` (mm)."""
    xs, ys, zs = centres
    return [
        (xs - centre[0]).astype(np.float32)[None, None, :],
        (ys - centre[1]).astype(np.float32)[None, :, None],
        (zs - centre[2]).astype(np.float32)[:, None, None],
    ]


def _mass_effect_radius(r_e: float) -> float:
    """Beyond this the tapered push is below a few hundredths of a millimetre."""
    return 3.5 * r_e


def _pushed_from(r: np.ndarray, r_e: float, k: float) -> np.ndarray:
    """Radius the tissue now at ``r`` came from: an incompressible push by ``k`` tumour
    volumes, tapered with a Gaussian of width ``2 r_e`` so it fades inside the brain.

    ``r - source`` decreases with ``r`` and so does the taper, hence the map is monotonic
    (no folding)."""
    source = np.cbrt(np.maximum(r**3 - k * r_e**3, 0.0))
    return r - (r - source) * np.exp(-((r / (2.0 * r_e)) ** 2))


def apply_mass_effect(fractions: dict[str, np.ndarray], params: TumourParams, maps: TissueMaps) -> float:
    """Push normal tissue radially away from the tumour centre, in place.

    Each voxel is then rescaled to its original brain fraction, so the brain outline stays
    where it was (the skull does not move); tissue pushed against it is compressed.
    Returns the displacement (mm) at the enhancing rim's nominal radius.
    """
    k = params.mass_effect_fraction
    if not k:
        return 0.0
    r_e = params.radius_enhancing_mm
    box = _box(params.centre_ras, _mass_effect_radius(r_e), maps)
    dx, dy, dz = _offsets(_box_centres(maps, box), params.centre_ras)
    r = np.sqrt(dx * dx + dy * dy + dz * dz)
    inside = np.zeros(maps.shape, dtype=bool)
    inside[box] = (r <= _mass_effect_radius(r_e)) & (maps.brain[box] > 0)
    flat, kji = augment.support_points(inside)
    step = np.diag(maps.affine[:3, :3])[::-1]  # (k, j, i) mm per voxel
    centre_kji = ((params.centre_ras - maps.affine[:3, 3]) / np.diag(maps.affine[:3, :3]))[::-1]
    offsets = (kji - centre_kji[:, None]) * step[:, None]  # mm, (k, j, i) rows
    radius = np.sqrt((offsets**2).sum(axis=0))
    scale = np.where(radius > 1e-6, _pushed_from(radius, r_e, k) / np.maximum(radius, 1e-6), 0.0)
    coords = centre_kji[:, None] + offsets * scale / step[:, None]
    warp = augment.Warp(maps.shape, flat, coords)
    for name in list(fractions):
        fractions[name] = warp.apply(fractions[name], order=1, out=fractions[name].copy())
    total = sum(frac[box] for frac in fractions.values())
    brain = maps.brain[box]
    ratio = np.where(total > 1e-6, brain / np.maximum(total, 1e-6), 0.0).astype(np.float32)
    for name in fractions:
        fractions[name][box] *= ratio
    empty = (total <= 1e-6) & (brain > 0)
    fractions["csf"][box][empty] = brain[empty]
    return float(r_e - _pushed_from(np.array(r_e), r_e, k))


def _ellipsoid_distance(offsets: list[np.ndarray], rotation: np.ndarray, semi_axes: np.ndarray) -> np.ndarray:
    """Distance (mm) in the ellipsoid's frame, each axis divided by its relative scale."""
    dx, dy, dz = offsets
    rot = rotation.astype(np.float32)
    dist2 = np.zeros(np.broadcast_shapes(dx.shape, dy.shape, dz.shape), dtype=np.float32)
    for a in range(3):
        along = (rot[0, a] * dx + rot[1, a] * dy + rot[2, a] * dz) / np.float32(semi_axes[a])
        dist2 += along * along
    return np.sqrt(dist2)


def _ramp(t: np.ndarray) -> np.ndarray:
    """Partial-volume occupancy: 0.5 on the boundary, linear over one edge width."""
    return np.clip(t + 0.5, 0.0, 1.0)


@dataclass(frozen=True, eq=False)
class TumourInsertion:
    """Result of :func:`insert_tumour`: the box holding the tumour and its hard masks."""

    box: tuple[slice, slice, slice]
    masks: dict[str, np.ndarray]  # full-size boolean maps per compartment
    mass_effect_mm: float


def insert_tumour(
    fractions: dict[str, np.ndarray], params: TumourParams, maps: TissueMaps
) -> TumourInsertion:
    """Add ``edema``, ``necrotic`` and ``enhancing`` fractions to ``fractions`` (in place),
    scaling the normal tissues down so every voxel still sums to its brain fraction."""
    mass_mm = apply_mass_effect(fractions, params, maps)
    radius = params.reach_mm("edema")
    edge = np.float32(maps.spacing)
    edema_edge = np.float32(max(maps.spacing, EDEMA_EDGE_MM))
    box = _box(params.centre_ras, radius + float(edema_edge), maps)
    centres = _box_centres(maps, box)
    noisy = {}
    for name in TUMOUR_COMPARTMENTS:
        centre = params.centre_ras + (params.core_offset_mm if name == "necrotic" else 0.0)
        dist = _ellipsoid_distance(_offsets(centres, centre), params.rotation, params.semi_axes)
        reach = params.reach_mm(name)
        shape_box = np.stack([params.centre_ras - reach, params.centre_ras + reach])
        noise = np.clip(fields.field_on_grid(params.shape_coeffs[name], shape_box, centres), -1.0, 1.0)
        noisy[name] = dist * (1.0 + np.float32(params.irregularity[name]) * noise)
    brain = maps.brain[box]
    solid = _ramp((params.radius_enhancing_mm - noisy["enhancing"]) / edge)
    core = np.minimum(_ramp((params.radius_core_mm - noisy["necrotic"]) / edge), solid)
    spread = np.maximum(_ramp((params.radius_edema_mm - noisy["edema"]) / edema_edge), solid)
    share = np.where(solid < 1.0, (spread - solid) / np.maximum(1.0 - solid, 1e-6), 0.0)

    wm, gm, csf = (fractions[name][box] * (1.0 - solid) for name in ("wm", "gm", "csf"))
    beta = np.float32(params.gm_edema_weight)
    edema = share * (wm + beta * gm)
    new = {
        "wm": wm * (1.0 - share),
        "gm": gm * (1.0 - beta * share),
        "csf": csf,
        "edema": edema,
        "necrotic": core * brain,
        "enhancing": (solid - core) * brain,
    }
    for name in TUMOUR_COMPARTMENTS:
        fractions[name] = np.zeros(maps.shape, dtype=np.float32)
    for name, value in new.items():
        fractions[name][box] = value

    inside = brain >= 0.5
    necrotic = (core >= 0.5) & inside
    enhancing = (solid >= 0.5) & ~necrotic & inside
    oedema = (edema >= 0.5) & ~(solid >= 0.5)
    masks = {}
    for name, m in (("edema", oedema), ("enhancing", enhancing), ("necrotic", necrotic)):
        full = np.zeros(maps.shape, dtype=bool)
        full[box] = m
        masks[name] = full
    return TumourInsertion(box=box, masks=masks, mass_effect_mm=mass_mm)
