"""Options of plane-model training, validated before anything is read or written.

:class:`PlaneTrainingOptions` is what both the CLI (``scorefusion train planes``) and the
Python API (:func:`ScoreFusionLib.train.train_planes`) take. Every check that needs no data
(names, ranges, divisibility of an explicit grid) happens in :meth:`validate`, so a typo
fails in milliseconds with a specific message instead of after loading a dataset.
Defaults follow method.md section 5.1 (Adam 5e-5, EMA 0.9999, batch 3, clip 1.0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from ..data.loading import PAPER_GRID_IJK
from ..data.records import canonical_contrast
from ..data.slices import PLANES, plane_axis
from ..data.task import NORMALIZATIONS, SR_NORMALIZATION_SOURCES, TASK_KINDS, TaskSpec
from ..errors import GeometryError, InputError
from ..nets.configs import NOISE_EMBEDDINGS, UNET2D_PRESETS, UNet2DConfig, unet2d_config

AMP_MODES = ("auto", "none", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
SLICE_PROFILES = ("gaussian", "box")
#: Default SR operator when neither ``factor`` nor a thick-slice axis is given (paper: 4x pool).
DEFAULT_SR_FACTOR = 4
_AXIS_NAMES = {"i": 0, "j": 1, "k": 2, "0": 0, "1": 1, "2": 2}
#: Spatial (D, H, W) axis -> IJK axis (arrays are (k, j, i)).
_DHW_TO_IJK = (2, 1, 0)


def split_list(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"a,b"`` or ``["a", "b"]`` -> ``("a", "b")``; blanks dropped, ``None`` -> ``()``."""
    if text is None:
        return ()
    items = text.split(",") if isinstance(text, str) else [str(t) for t in text]
    return tuple(t.strip() for t in items if t.strip())


def parse_factors(text: str | int | Sequence[int]) -> tuple[int, int, int]:
    """An SR factor: ``4`` (isotropic) or ``1,1,4`` (per IJK axis); each a positive integer."""
    if isinstance(text, int) and not isinstance(text, bool):
        parts: list = [text]
    else:
        parts = list(split_list(text)) if isinstance(text, str) else list(text)
    try:
        values = [int(p) for p in parts]
        if any(str(p).strip() != str(v) for p, v in zip(parts, values)):
            raise ValueError
    except (TypeError, ValueError):
        raise InputError(f"--factor must be an integer or three comma-separated integers, got {text!r}") from None
    if len(values) == 1:
        values *= 3
    if len(values) != 3 or min(values) < 1:
        raise InputError(f"--factor needs 1 or 3 positive integers (i, j, k), got {text!r}")
    if values == [1, 1, 1]:
        raise InputError("--factor 1 degrades nothing; use a factor > 1 on at least one axis")
    return (values[0], values[1], values[2])


def parse_grid(values: str | Sequence[str | int] | None) -> tuple[int, int, int] | None:
    """``native`` (or ``None``) keeps the file grid; otherwise three positive sizes (i, j, k)."""
    if values is None:
        return None
    if isinstance(values, str):
        values = values.replace(",", " ").split()
    items = [str(v).strip() for v in values]
    if len(items) == 1 and items[0].lower() == "native":
        return None
    try:
        sizes = tuple(int(v) for v in items)
    except ValueError:
        raise InputError(f"--grid takes 'native' or three integers I J K, got {' '.join(items)!r}") from None
    if len(sizes) != 3 or min(sizes) < 1:
        raise InputError(f"--grid takes 'native' or three positive integers I J K, got {' '.join(items)!r}")
    return (sizes[0], sizes[1], sizes[2])


def parse_axis(value: str | int) -> int:
    """An IJK axis given as ``i``/``j``/``k`` or ``0``/``1``/``2``."""
    key = str(value).strip().lower()
    if key not in _AXIS_NAMES:
        raise InputError(f"axis must be i, j, k (or 0, 1, 2), got {value!r}")
    return _AXIS_NAMES[key]


def _positive_int(name: str, value: object, allow_zero: bool = False) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value >= 1)
    if not ok:
        kind = "a non-negative" if allow_zero else "a positive"
        raise InputError(f"{name} must be {kind} integer, got {value!r}")
    return int(value)


def _positive_float(name: str, value: object, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise InputError(f"{name} must be {'non-negative' if allow_zero else 'positive'}, got {value!r}")
    return float(value)


@dataclass
class PlaneTrainingOptions:
    """Everything that defines a plane-training run (see ``scorefusion train planes --help``).

    Parameters
    ----------
    data : dataset folder (BraTS / ScoreFusionSim layout) or a ``.csv``/``.json`` manifest.
    out : bundle directory to write.
    target, task, inputs : what is translated (:class:`~ScoreFusionLib.data.TaskSpec`).
    planes : plane models to train, in order.
    config : U-Net preset (``tiny``, ``small``, ``paper``).
    factor : average-pool SR factors (i, j, k); ``thick_slice_*`` select the clinical
        thick-slice operator instead. With neither, ``sr``/``both`` use a 4x average pool.
    neighbors : 2.5D neighbours per side (0 or 2 in the paper).
    grid : model grid (i, j, k) reached by centred crop/pad; ``None`` keeps the native grid.
    steps : optimiser steps per plane (a resumed run trains unfinished planes up to it).
    batch_size : **global** batch (split evenly over DDP processes). The paper used 3 per
        GPU on 2 GPUs; 3 is the default here.
    lr, ema_decay, ema_warmup, grad_clip : Adam learning rate (no weight decay), EMA decay,
        the EMA warm-up ``min(decay, (1 + n) / (10 + n))`` and the gradient-norm clip (0: off).
    val_every, val_fraction, val_slices, val_psnr_gamma : validation period (0: only at the
        end), share of cases held out by the paper split (last ones by sorted id), number of
        fixed slices and the noise level of the one-step PSNR (:mod:`.validation`).
    seed : the run seed; all draws are functions of (seed, plane, step).
    device, amp : ``auto``/``cpu``/``cuda``; autocast ``auto``/``none``/``bf16``/``fp16``
        (CUDA only; ``auto`` = bf16 where supported, else none).
    cache : folder for prepared cases (memory-mapped ``.npy``; needed when the prepared
        training set does not fit in memory, about 90 MB per BraTS case).
    stop_after : stop (with a checkpoint) after this many steps in this invocation, summed
        over planes; continue later with ``resume`` (e.g. for time-limited jobs).
    """

    data: str
    out: str
    target: str
    task: str = "sr"
    inputs: Sequence[str] = ()
    planes: Sequence[str] = PLANES
    config: str = "paper"
    factor: Sequence[int] | None = None
    thick_slice_axis: int | None = None
    thick_slice_factor: int | None = None
    slice_fwhm: float | None = None
    slice_profile: str = "gaussian"
    neighbors: int = 0
    grid: Sequence[int] | None = PAPER_GRID_IJK
    normalization: str = "minmax"
    sr_normalization: str = "input"
    noise_embedding: str = "gamma-sinusoidal"
    dropout: float | None = None
    steps: int = 50000
    batch_size: int = 3
    lr: float = 5e-5
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    grad_clip: float = 1.0
    val_every: int = 1000
    val_fraction: float = 0.2
    val_slices: int = 32
    val_psnr_gamma: float = 0.5
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    kaiming_init: bool = False
    num_workers: int = 0
    cache: str | None = None
    checkpoint_every: int = 1000
    resume: bool = False
    overwrite: bool = False
    stop_after: int | None = None
    threads: int | None = None
    quiet: bool = False
    command_line: str | None = field(default=None, compare=False)

    # -- validation --------------------------------------------------------------------
    def validate(self) -> PlaneTrainingOptions:
        """Normalise and check every field that needs no data; returns ``self``."""
        if not str(self.data or "").strip():
            raise InputError("--data is required (a dataset folder or a manifest file)")
        if not str(self.out or "").strip():
            raise InputError("--out is required (the bundle directory to write)")
        if self.task not in TASK_KINDS:
            raise InputError(f"unknown task {self.task!r}; use one of {', '.join(TASK_KINDS)}")
        self.target = canonical_contrast(self.target)
        self.inputs = tuple(canonical_contrast(c) for c in split_list(self.inputs))
        planes = split_list(self.planes)
        if not planes:
            raise InputError(f"no plane given; use some of {', '.join(PLANES)}")
        for p in planes:
            plane_axis(p)  # raises "unknown plane ..."
        dup = sorted({p for p in planes if planes.count(p) > 1})
        if dup:
            raise InputError(f"plane(s) {dup} listed twice in --planes")
        self.planes = planes
        if self.config not in UNET2D_PRESETS:
            raise InputError(f"unknown --config {self.config!r}; use one of {', '.join(UNET2D_PRESETS)}")
        if self.neighbors not in (0, 1, 2, 3) or isinstance(self.neighbors, bool):
            raise InputError(
                f"--neighbors must be 0 (2D), 2 (the paper's 2.5D) or another k <= 3, got {self.neighbors!r}"
            )
        if self.normalization not in NORMALIZATIONS:
            raise InputError(f"unknown --normalization {self.normalization!r}; use {', '.join(NORMALIZATIONS)}")
        if self.sr_normalization not in SR_NORMALIZATION_SOURCES:
            raise InputError(f"--sr-normalization must be 'input' or 'target', got {self.sr_normalization!r}")
        if self.noise_embedding not in NOISE_EMBEDDINGS:
            raise InputError(f"--noise-embedding must be one of {', '.join(NOISE_EMBEDDINGS)}")
        if self.dropout is not None and not (0.0 <= float(self.dropout) < 1.0):
            raise InputError(f"--dropout must be in [0, 1), got {self.dropout}")
        self.grid = None if self.grid is None else parse_grid([str(v) for v in self.grid])
        self._validate_degradation()
        _positive_int("--steps", self.steps)
        _positive_int("--batch-size", self.batch_size)
        _positive_float("--lr", self.lr)
        if isinstance(self.ema_decay, bool) or not (0.0 <= float(self.ema_decay) < 1.0):
            raise InputError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        self.grad_clip = _positive_float("--grad-clip", self.grad_clip, allow_zero=True)
        _positive_int("--val-every", self.val_every, allow_zero=True)
        if isinstance(self.val_fraction, bool) or not (0.0 <= float(self.val_fraction) < 1.0):
            raise InputError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        _positive_int("--val-slices", self.val_slices)
        if isinstance(self.val_psnr_gamma, bool) or not (0.0 < float(self.val_psnr_gamma) < 1.0):
            raise InputError(f"--val-psnr-gamma must be in (0, 1), got {self.val_psnr_gamma}")
        _positive_int("--seed", self.seed, allow_zero=True)
        if self.device not in DEVICES:
            raise InputError(f"unknown --device {self.device!r}; use one of {', '.join(DEVICES)}")
        if self.amp not in AMP_MODES:
            raise InputError(f"unknown --amp {self.amp!r}; use one of {', '.join(AMP_MODES)}")
        _positive_int("--num-workers", self.num_workers, allow_zero=True)
        _positive_int("--checkpoint-every", self.checkpoint_every, allow_zero=True)
        if self.stop_after is not None:
            _positive_int("--stop-after", self.stop_after)
        if self.threads is not None:
            _positive_int("--threads", self.threads)
        if self.resume and self.overwrite:
            raise InputError("--resume and --overwrite contradict each other; pick one")
        self.plane_configs()  # divisibility of the net, channel counts
        if self.grid is not None:
            self.check_grid(self.grid, "--grid")
        return self

    def _validate_degradation(self) -> None:
        thick = self.thick_slice_axis is not None or self.thick_slice_factor is not None
        if self.task == "mt":
            if self.factor is not None or thick:
                raise InputError("an 'mt' task has no degradation; drop --factor/--thick-slice-* "
                                 "(use --task both for SR plus synthesis)")
            return
        if self.factor is not None and thick:
            raise InputError("give either --factor (average pool) or --thick-slice-axis/--thick-slice-factor, "
                             "not both")
        if thick:
            if self.thick_slice_axis is None or self.thick_slice_factor is None:
                raise InputError("thick-slice SR needs both --thick-slice-axis and --thick-slice-factor")
            self.thick_slice_axis = parse_axis(self.thick_slice_axis)
            self.thick_slice_factor = _positive_int("--thick-slice-factor", self.thick_slice_factor)
            if self.thick_slice_factor < 2:
                raise InputError("--thick-slice-factor must be at least 2")
            if self.slice_fwhm is not None:
                self.slice_fwhm = _positive_float("--slice-fwhm", self.slice_fwhm)
            if self.slice_profile not in SLICE_PROFILES:
                raise InputError(f"--slice-profile must be one of {', '.join(SLICE_PROFILES)}")
        else:
            if self.slice_fwhm is not None or self.slice_profile != "gaussian":
                raise InputError("--slice-fwhm/--slice-profile only apply with --thick-slice-axis")
            self.factor = parse_factors(DEFAULT_SR_FACTOR if self.factor is None else self.factor)

    # -- derived objects ---------------------------------------------------------------
    def degradation(self):  # -> SeparableDegradation | None
        """The SR operator of the task (``None`` for ``mt``)."""
        from ..degradation import AveragePool, ThickSlice

        if self.task == "mt":
            return None
        if self.thick_slice_axis is not None:
            return ThickSlice(int(self.thick_slice_axis), int(self.thick_slice_factor), self.slice_fwhm,
                              self.slice_profile)
        return AveragePool(list(self.factor))

    def degradation_factors(self) -> tuple[int, int, int]:
        """Per-IJK-axis factors the grid must be a multiple of ((1, 1, 1) for ``mt``)."""
        op = self.degradation()
        return (1, 1, 1) if op is None else tuple(int(f) for f in op.factors)

    def task_spec(self) -> TaskSpec:
        """The :class:`TaskSpec` these options describe (raises :class:`InputError` if inconsistent)."""
        return TaskSpec(kind=self.task, inputs=list(self.inputs), target=self.target,
                        degradation=self.degradation(), normalization=self.normalization,
                        sr_normalization=self.sr_normalization)

    def plane_config(self) -> UNet2DConfig:
        """The network configuration shared by every plane (they differ only in weights)."""
        from dataclasses import replace

        from ..data.slices import plane_input_channels

        spec = self.task_spec()
        cfg = unet2d_config(self.config, plane_input_channels(spec.n_conditions, self.neighbors))
        changes: dict = {"noise_embedding": self.noise_embedding}
        if self.dropout is not None:
            changes["dropout"] = float(self.dropout)
        return replace(cfg, **changes)

    def plane_configs(self) -> dict[str, UNet2DConfig]:
        """Plane name -> configuration."""
        cfg = self.plane_config()
        return {p: cfg for p in self.planes}

    def check_grid(self, grid_ijk: Sequence[int], what: str = "the grid") -> None:
        """Refuse a grid whose in-plane sides do not fit the net or whose axes the SR factors do not divide."""
        grid = tuple(int(n) for n in grid_ijk)
        divisor = self.plane_config().required_divisor
        names = "ijk"
        for plane in self.planes:
            ax = plane_axis(plane)
            for dhw in range(3):
                if dhw == ax:
                    continue
                a = _DHW_TO_IJK[dhw]
                if grid[a] % divisor:
                    raise GeometryError(
                        f"{what} {grid[0]}x{grid[1]}x{grid[2]} (i, j, k): axis {names[a]} has {grid[a]} voxels, "
                        f"not a multiple of {divisor} as the {self.config!r} net needs for {plane} slices; "
                        f"choose --grid sides that are multiples of {divisor}"
                    )
        for a, f in enumerate(self.degradation_factors()):
            if grid[a] % f:
                raise GeometryError(
                    f"{what} {grid[0]}x{grid[1]}x{grid[2]} (i, j, k): axis {names[a]} has {grid[a]} voxels, "
                    f"not a multiple of the SR factor {f}; choose --grid sides that are multiples of it"
                )

    def to_dict(self) -> dict:
        """JSON-friendly copy (provenance)."""
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d
