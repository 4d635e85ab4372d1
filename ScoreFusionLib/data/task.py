"""Task definitions and preparation of one case into normalised network arrays.

A :class:`TaskSpec` says what is translated into what: ``sr`` (the degraded target is the
condition), ``mt`` (other contrasts are the conditions) or ``both`` (degraded target first,
then other contrasts; method.md section 7.1). :func:`prepare_case` turns a case into a
:class:`PreparedCase`: float32 arrays in (D, H, W) = (k, j, i) order, the residual target
``r0 = (y - c_ref) / 2`` (section 2.1), the mask of the reference condition (section 3.2) and
the normalisation parameters needed to invert outputs.

SR normalisation [L] (pitfall 3): at inference only the degraded input is known, so by
default the normalisation is fitted on the **degraded input** and applied to both input and
target (the target may slightly exceed [-1, 1]); ``sr_normalization="target"`` reproduces
the paper, which normalises the target by its own range before degrading it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import DatasetError, InputError
from ..grid import Reorientation
from ..intensity import Normalization, fit_normalization, mask_channel
from ..volume import require_same_grid, require_usable_intensities
from .coords import coordinate_channels
from .loading import PAPER_GRID_IJK, LoadedCase, load_case
from .records import SEG, CaseRecord, canonical_contrast

TASK_KINDS = ("sr", "mt", "both")
NORMALIZATIONS = ("minmax", "percentile")
SR_NORMALIZATION_SOURCES = ("input", "target")


def _as_numpy32(x: Any) -> np.ndarray:
    """A degradation operator's output as float32 numpy (it may hand back torch tensors)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


@dataclass(frozen=True)
class TaskSpec:
    """What a model translates, and how the data are normalised.

    Parameters
    ----------
    kind : ``sr``, ``mt`` or ``both``.
    inputs : condition contrasts, in condition order. For ``sr`` it may be empty (the
        degraded target is the only condition); for ``both`` it lists the extra contrasts
        (the degraded target is prepended if absent). After construction ``inputs[i]`` is
        the contrast behind condition ``i``, and for ``sr``/``both`` ``inputs[0] == target``.
    target : the contrast to produce.
    degradation : the operator of :mod:`ScoreFusionLib.degradation` (``sr``/``both`` only).
    normalization : ``minmax`` (paper) or ``percentile``.
    sr_normalization : ``input`` (fit on the degraded input, [L] default) or ``target``
        (paper [C]: the target's own range, before degradation).
    """

    kind: str
    inputs: Sequence[str]
    target: str
    degradation: Any = None
    normalization: str = "minmax"
    sr_normalization: str = "input"

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise InputError(f"unknown task kind {self.kind!r}; use one of {', '.join(TASK_KINDS)}")
        if isinstance(self.inputs, str):
            raise InputError(f"inputs must be a list of contrasts, not the string {self.inputs!r}")
        target = canonical_contrast(self.target)
        inputs = [canonical_contrast(c) for c in self.inputs]
        if target == SEG or SEG in inputs:
            raise InputError("the segmentation cannot be a task input or target")
        if len(set(inputs)) != len(inputs):
            raise InputError(f"task inputs {list(self.inputs)} name a contrast twice")
        if self.kind == "mt":
            if not inputs:
                raise InputError("an 'mt' task needs at least one input contrast")
            if target in inputs:
                raise InputError(f"an 'mt' task cannot use its target {target!r} as an input; use 'sr'")
            if self.degradation is not None:
                raise InputError("an 'mt' task takes no degradation operator (use kind 'both')")
        else:
            if target in inputs and inputs[0] != target:
                raise InputError(
                    f"in a '{self.kind}' task the degraded target {target!r} is the first condition; "
                    f"list it first or leave it out (got {inputs})"
                )
            others = [c for c in inputs if c != target]
            if self.kind == "sr" and others:
                raise InputError(f"an 'sr' task has only the degraded target as input; got extra {others} "
                                 "(use kind 'both')")
            if self.kind == "both" and not others:
                raise InputError("a 'both' task needs at least one input contrast besides the target")
            inputs = [target, *others]
            op = self.degradation
            if op is None:
                raise InputError(f"a '{self.kind}' task needs a degradation operator")
            for attr in ("degrade", "lift", "condition", "to_dict"):
                if not callable(getattr(op, attr, None)):
                    raise InputError(f"degradation {op!r} lacks the {attr}() method of the operator API")
        if self.normalization not in NORMALIZATIONS:
            raise InputError(
                f"unknown normalisation {self.normalization!r}; use one of {', '.join(NORMALIZATIONS)}"
            )
        if self.sr_normalization not in SR_NORMALIZATION_SOURCES:
            raise InputError(
                f"sr_normalization must be 'input' or 'target', got {self.sr_normalization!r}"
            )
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "inputs", tuple(inputs))

    @property
    def n_conditions(self) -> int:
        return len(self.inputs)

    @property
    def degraded_target(self) -> bool:
        """True when condition 0 is the degraded target (``sr`` and ``both``)."""
        return self.kind != "mt"

    @property
    def condition_names(self) -> tuple[str, ...]:
        """Readable names of the conditions, e.g. ``('t2f_degraded', 't1c')``."""
        names = list(self.inputs)
        if self.degraded_target:
            names[0] = f"{self.target}_degraded"
        return tuple(names)

    @property
    def contrasts(self) -> tuple[str, ...]:
        """Contrasts to load for this task (target first, then the other inputs)."""
        return (self.target, *(c for c in self.inputs if c != self.target))

    def to_dict(self) -> dict:
        """JSON-friendly form for checkpoints and bundles."""
        return {
            "kind": self.kind,
            "inputs": list(self.inputs),
            "target": self.target,
            "degradation": self.degradation.to_dict() if self.degradation is not None else None,
            "normalization": self.normalization,
            "sr_normalization": self.sr_normalization,
        }

    @classmethod
    def from_dict(cls, d: dict) -> TaskSpec:
        op = d.get("degradation")
        if op is not None:
            from ..degradation import degradation_from_dict

            op = degradation_from_dict(op)
        return cls(
            kind=d["kind"],
            inputs=list(d["inputs"]),
            target=d["target"],
            degradation=op,
            normalization=d.get("normalization", "minmax"),
            sr_normalization=d.get("sr_normalization", "input"),
        )


@dataclass(eq=False)
class PreparedCase:
    """One case as the networks see it; every array is float32 in (D, H, W) order.

    Attributes
    ----------
    conditions : (M, D, H, W) normalised conditions; ``conditions[0]`` is ``c_ref``.
    target : (D, H, W) normalised target ``y``.
    mask : (D, H, W) ``+1`` foreground / ``-1`` background of ``c_ref``.
    r0 : (D, H, W) residual target ``(y - c_ref) / 2``.
    normalizations : contrast -> :class:`Normalization` used for it (for SR the target's
        entry is the one shared by input and target).
    measurement : the normalised low-resolution array for ``sr``/``both`` (``None`` for mt).
    seg : (D, H, W) integer labels when loaded, else ``None``.
    affine : IJK->RAS matrix of the model grid.
    reorientation, original_affine, original_shape_ijk : how the model grid relates to the
        files read (see :class:`LoadedCase`), to write outputs back onto the input grid.
    """

    case_id: str
    spec: TaskSpec
    conditions: np.ndarray
    target: np.ndarray
    mask: np.ndarray
    r0: np.ndarray
    normalizations: dict[str, Normalization]
    affine: np.ndarray
    measurement: np.ndarray | None = None
    seg: np.ndarray | None = None
    label_convention: str | None = None
    simulated: bool = False
    reorientation: Reorientation | None = None
    original_affine: np.ndarray | None = None
    original_shape_ijk: tuple[int, int, int] | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """Grid shape (D, H, W)."""
        return tuple(int(s) for s in self.target.shape)

    @property
    def n_conditions(self) -> int:
        return int(self.conditions.shape[0])

    @property
    def coords(self) -> np.ndarray:
        """(3, D, H, W) coordinate channels (x, y, z) of the full grid (shared, read-only)."""
        return coordinate_channels(self.shape)

    @property
    def c_ref(self) -> np.ndarray:
        return self.conditions[0]

    @property
    def reference_normalization(self) -> Normalization:
        """Normalisation of ``c_ref``'s contrast: the one that maps outputs back to intensities."""
        return self.normalizations[self.spec.inputs[0]]


def _check_loaded(case: LoadedCase, spec: TaskSpec) -> None:
    for c in spec.contrasts:
        if c not in case.volumes:
            raise DatasetError(
                f"case {case.case_id} lacks contrast {c!r} needed by the {spec.kind} task "
                f"(loaded: {', '.join(case.volumes) or 'none'})"
            )
    require_same_grid({f"{case.case_id} {c}": case.volumes[c] for c in spec.contrasts})


def prepare_case(
    case: CaseRecord | LoadedCase,
    spec: TaskSpec,
    grid_shape_ijk: Sequence[int] | None = PAPER_GRID_IJK,
    reorient: bool = False,
    seg: bool = False,
) -> PreparedCase:
    """Normalise (and for SR degrade) one case according to ``spec``.

    ``case`` is a record (loaded here with ``grid_shape_ijk``, ``reorient`` and ``seg``) or
    an already :class:`LoadedCase` (used as is). Degradation requires grid sides that are
    multiples of the operator's factors (the operator raises :class:`GeometryError`).
    """
    if isinstance(case, CaseRecord):
        case = load_case(case, spec.contrasts, grid_shape_ijk=grid_shape_ijk, seg=seg, reorient=reorient)
    _check_loaded(case, spec)
    raw = {}
    for c in spec.contrasts:
        arr = np.asarray(case.volumes[c].array)
        require_usable_intensities(arr, f"case {case.case_id} {c}")
        raw[c] = arr.astype(np.float64)

    method = spec.normalization
    norms: dict[str, Normalization] = {}
    conditions: list[np.ndarray] = []
    measurement = None
    y = raw[spec.target]
    if spec.degraded_target:
        op = spec.degradation
        if spec.sr_normalization == "input":
            lr = _as_numpy32(op.degrade(y)).astype(np.float64)
            norm = fit_normalization(lr, method, name=f"case {case.case_id} {spec.target} (degraded input)")
            measurement = norm.apply(lr)
            cond = _as_numpy32(op.lift(measurement))
        else:
            norm = fit_normalization(y, method, name=f"case {case.case_id} {spec.target}")
            measurement = _as_numpy32(op.degrade(norm.apply(y)))
            cond = _as_numpy32(op.lift(measurement))
        norms[spec.target] = norm
        target = norm.apply(y)
        conditions.append(cond)
        others = spec.inputs[1:]
    else:
        norms[spec.target] = fit_normalization(y, method, name=f"case {case.case_id} {spec.target}")
        target = norms[spec.target].apply(y)
        others = spec.inputs
    for c in others:
        norms[c] = fit_normalization(raw[c], method, name=f"case {case.case_id} {c}")
        conditions.append(norms[c].apply(raw[c]))

    stacked = np.stack(conditions).astype(np.float32)
    target = target.astype(np.float32)
    r0 = ((target - stacked[0]) / 2.0).astype(np.float32)
    return PreparedCase(
        case_id=case.case_id,
        spec=spec,
        conditions=stacked,
        target=target,
        mask=mask_channel(stacked[0]),
        r0=r0,
        normalizations=norms,
        affine=np.array(case.affine, dtype=np.float64),
        measurement=measurement,
        seg=np.asarray(case.seg.array) if case.seg is not None else None,
        label_convention=case.label_convention,
        simulated=case.simulated,
        reorientation=case.reorientation,
        original_affine=case.original_affine,
        original_shape_ijk=case.original_shape_ijk,
    )

