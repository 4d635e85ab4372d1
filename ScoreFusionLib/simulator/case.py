"""One simulated case end to end: anatomy, tumour, deformation, signals, scanner effects.

Randomness comes only from ``numpy.random.SeedSequence([seed, case_index])``, split into
independent streams (acquisition, deformation, tumour, noise). Switching one feature off
(``noise=False``, ``deform=False``) therefore leaves every other sampled value unchanged,
and no global random state is read or written.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import numpy as np

from .. import __version__
from ..errors import InputError
from ..labels import CONVENTIONS, labels_from_compartments
from ..volume import Volume
from . import augment, physics
from . import tumor as tumours
from .tissue import NILEARN_REQUIREMENT, TissueMaps, load_tissue_maps, validate_spacing

CASE_PREFIX = "ScoreFusionSim"
MAX_CASE_INDEX = 99999
STREAMS = ("acquisition", "deformation", "tumour", "noise")
#: where the T1w image comes from: the signal equation on the tissue fractions, or the real
#: ICBM152 T1 itself (warped with the same deformation, then scanner effects as usual)
T1_SOURCES = ("simulated", "icbm")


def case_id(case_index: int) -> str:
    """BraTS-2023-style id of a simulated case, e.g. ``ScoreFusionSim-00001``."""
    return f"{CASE_PREFIX}-{int(case_index):05d}"


def description(seed: int) -> str:
    """NIfTI ``descrip`` text that marks every written volume as simulated."""
    return f"SIMULATED ScoreFusion {__version__} seed={int(seed)}"


def validate_seed(seed: int) -> int:
    """Seeds are non-negative integers (what :class:`numpy.random.SeedSequence` accepts)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def validate_case_index(case_index: int) -> int:
    if isinstance(case_index, bool) or not isinstance(case_index, numbers.Integral):
        raise InputError(f"case index must be an integer, got {case_index!r}")
    if not 1 <= case_index <= MAX_CASE_INDEX:
        raise InputError(f"case index must be within 1-{MAX_CASE_INDEX}, got {case_index}")
    return int(case_index)


def validate_convention(convention: str) -> str:
    if convention not in CONVENTIONS:
        raise InputError(f"unknown label convention {convention!r}; use one of {sorted(CONVENTIONS)}")
    return convention


def validate_t1_source(t1_source: str, tumor: bool) -> str:
    if t1_source not in T1_SOURCES:
        raise InputError(f"unknown T1 source {t1_source!r}; choose one of {', '.join(T1_SOURCES)}")
    if t1_source == "icbm" and tumor:
        raise InputError("the real ICBM T1 has no tumour: the icbm T1 source cannot be combined with a tumour")
    return t1_source


def case_streams(seed: int, case_index: int) -> dict[str, np.random.Generator]:
    """Independent generators for each stage of case ``case_index`` of cohort ``seed``."""
    children = np.random.SeedSequence([int(seed), int(case_index)]).spawn(len(STREAMS))
    return {name: np.random.default_rng(child) for name, child in zip(STREAMS, children)}


@dataclass(frozen=True, eq=False)
class SimulatedCase:
    """A simulated case: contrast -> :class:`Volume` (float32, one shared grid), the label
    map (uint8, in ``params['label_convention']``) or None, the final tissue fractions and
    every sampled parameter (JSON-ready)."""

    case_id: str
    seed: int
    case_index: int
    images: dict[str, Volume]
    labels: Volume | None
    fractions: dict[str, np.ndarray] = field(repr=False)
    params: dict[str, object] = field(repr=False)

    @property
    def description(self) -> str:
        return description(self.seed)


def _deform(
    fractions: dict[str, np.ndarray],
    labels: np.ndarray | None,
    tumour_box: tuple[slice, slice, slice] | None,
    maps: TissueMaps,
    rng: np.random.Generator,
) -> tuple[dict[str, np.ndarray], np.ndarray | None, tuple[slice, ...] | None, augment.DeformationParams]:
    """Warp every fraction (linear) and the labels (nearest) with one random deformation."""
    params = augment.sample_deformation(rng)
    disp = augment.displacement_field(params, maps.affine, maps.shape, maps.box_ras)
    support = augment.deformation_support(maps.brain, params.amplitude_mm, maps.spacing)
    warp = augment.Warp.from_displacement(disp, maps.affine, support)
    del disp
    warped = {
        name: warp.apply(frac, order=1, box=tumour_box if name in tumours.TUMOUR_COMPARTMENTS else None)
        for name, frac in fractions.items()
    }
    if labels is not None:
        labels = warp.apply(labels, order=0, box=tumour_box)
    if tumour_box is not None:
        reach = augment.reach_voxels(params.amplitude_mm, maps.spacing)
        tumour_box = augment.expand_box(tumour_box, reach, maps.shape)
    return warped, labels, tumour_box, params


def _real_t1_signal(reference_t1: np.ndarray, fractions: dict[str, np.ndarray], wm_signal: float) -> np.ndarray:
    """The real ICBM T1 rescaled so that its white matter has the simulated WM signal."""
    white = fractions["wm"] > 0.9
    level = float(reference_t1[white].mean()) if white.any() else float(reference_t1.max())
    return (reference_t1 * np.float32(wm_signal / max(level, 1e-6))).astype(np.float32)


def _acquire(
    fractions: dict[str, np.ndarray],
    signals: dict[str, float],
    acq: augment.AcquisitionParams,
    maps: TissueMaps,
    boxes: dict[str, tuple[slice, ...]] | None,
    noise_rng: np.random.Generator | None,
    base: np.ndarray | None = None,
) -> tuple[np.ndarray, float]:
    """One contrast: mixed signal (or ``base``) x gain x bias field, then Rician noise;
    returns (image, sigma)."""
    image = physics.mix(fractions, signals, boxes) if base is None else base
    image *= np.float32(acq.gain)
    image *= augment.bias_field(acq, maps.affine, maps.shape, maps.box_ras)
    sigma = signals["wm"] * acq.gain / acq.snr
    if noise_rng is not None:
        image = augment.add_rician_noise(image, sigma, noise_rng)
    np.maximum(image, 0.0, out=image)
    return image.astype(np.float32, copy=False), sigma


def simulate_case(
    seed: int,
    case_index: int,
    spacing: float = 1.0,
    tumor: bool = False,
    convention: str = "brats2023",
    deform: bool = True,
    noise: bool = True,
    mass_effect: bool = True,
    t1_source: str = "simulated",
) -> SimulatedCase:
    """Simulate case ``case_index`` (1-based) of the cohort drawn with ``seed``.

    Parameters
    ----------
    spacing : isotropic voxel size in mm (1-8); see :mod:`.tissue` for the grid rule.
    tumor : add a synthetic tumour and return its label map.
    convention : label values of the map, ``brats2023`` (default) or ``brats2021``.
    deform : apply the smooth random deformation (anatomy varies between cases).
    noise : add Rician noise; without it the background stays exactly zero.
    mass_effect : let the tumour push the surrounding tissue outward.
    t1_source : ``simulated`` (signal equation) or ``icbm``: the t1n image is the real ICBM152
        T1 under the case's deformation, bias field, gain and noise (real anatomy contrast for
        T1 super-resolution). It has no tumour, so it cannot be combined with ``tumor``.
    """
    seed = validate_seed(seed)
    case_index = validate_case_index(case_index)
    spacing = validate_spacing(spacing)
    convention = validate_convention(convention)
    t1_source = validate_t1_source(t1_source, tumor)
    maps = load_tissue_maps(spacing)
    rngs = case_streams(seed, case_index)

    tissues = physics.jitter_tissues(rngs["acquisition"])
    sequences = physics.sample_sequences(rngs["acquisition"], tissues["csf"].t1_ms)
    acquisition: dict[str, augment.AcquisitionParams] = {}
    for contrast in physics.CONTRASTS:
        shared = acquisition["t1n"] if contrast == "t1c" else None
        acquisition[contrast] = augment.sample_acquisition(rngs["acquisition"], shared_with=shared)

    fractions = maps.fractions()
    if t1_source == "icbm":
        fractions["reference_t1"] = maps.reference_t1.copy()
    labels = tumour_box = tumour_info = None
    t1c_factors = None
    if tumor:
        tumour = tumours.sample_tumour(rngs["tumour"], mass_effect=mass_effect)
        inserted = tumours.insert_tumour(fractions, tumour, maps)
        tumour_box = inserted.box
        labels = labels_from_compartments(inserted.masks, convention)
        tissues = {**tissues, **tumour.tissues}
        t1c_factors = {"enhancing": tumour.t1c_factor}
        tumour_info = tumour.as_dict()
        tumour_info["mass_effect_displacement_at_rim_mm"] = inserted.mass_effect_mm

    deformation = None
    if deform:
        fractions, labels, tumour_box, deformation = _deform(
            fractions, labels, tumour_box, maps, rngs["deformation"]
        )
    boxes = {name: tumour_box for name in tumours.TUMOUR_COMPARTMENTS} if tumour_box else None
    reference_t1 = fractions.pop("reference_t1", None)

    images: dict[str, Volume] = {}
    contrast_info: dict[str, dict[str, object]] = {}
    for contrast in physics.CONTRASTS:
        acq = acquisition[contrast]
        signals = physics.tissue_signals(
            tissues, sequences[contrast], t1c_factors if contrast == "t1c" else None
        )
        base = None
        if contrast == "t1n" and reference_t1 is not None:
            base = _real_t1_signal(reference_t1, fractions, signals["wm"])
        image, sigma = _acquire(fractions, signals, acq, maps, boxes, rngs["noise"] if noise else None, base)
        images[contrast] = Volume(image, maps.affine)
        contrast_info[contrast] = {
            **sequences[contrast].as_dict(),
            **acq.as_dict(),
            "wm_signal": signals["wm"] * acq.gain,
            "noise_sigma": sigma if noise else 0.0,
            "tissue_signals": {name: value * acq.gain for name, value in signals.items()},
        }

    label_volume = Volume(labels.astype(np.uint8, copy=False), maps.affine) if labels is not None else None
    params: dict[str, object] = {
        "simulated": True,
        "simulator": "ScoreFusionLib.simulator",
        "simulator_version": __version__,
        "case_id": case_id(case_index),
        "seed": seed,
        "case_index": case_index,
        "random_streams": f"numpy SeedSequence([{seed}, {case_index}]).spawn({len(STREAMS)}): "
        + ", ".join(STREAMS),
        "source_maps": f"ICBM152 2009a nonlinear symmetric T1/GM/WM from the {NILEARN_REQUIREMENT} wheel",
        "spacing_mm": [spacing] * 3,
        "shape_ijk": [int(n) for n in maps.shape[::-1]],
        "affine_ras": [[float(v) for v in row] for row in maps.affine],
        "label_convention": convention,
        "t1_source": t1_source,
        "tissue_jitter": physics.TISSUE_JITTER,
        "tissues": {name: t.as_dict() for name, t in tissues.items() if name in physics.NORMAL_TISSUE},
        "contrasts": contrast_info,
        "deformation": {"enabled": True, **deformation.as_dict()} if deformation else {"enabled": False},
        "noise": {"enabled": bool(noise), "model": "rician", "sigma": "wm_signal / snr"},
        "tumour": tumour_info,
    }
    return SimulatedCase(
        case_id=case_id(case_index),
        seed=seed,
        case_index=case_index,
        images=images,
        labels=label_volume,
        fractions=fractions,
        params=params,
    )
