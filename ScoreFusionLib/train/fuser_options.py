"""Options of a fuser-training run (``scorefusion train fuser``), checked before anything is read.

The defaults are the paper's (method.md 5.2-5.4): Adam at lr 1e-5, an effective batch of 4
(batch 1 with gradient accumulation 4), loss ``5 L1 + 150 MSE``, EMA 0.995 updated every 10
optimiser steps and simply copied from the raw weights before step 2000; phase ``crops`` on
random 64^3 crops without feature alignment, phase ``full`` on whole volumes with alignment,
starting from phase ``crops``' EMA weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import InputError
from ..nets.fuser_config import FUSER_PRESETS
from .options import AMP_MODES, DEVICES

PHASES = ("crops", "full")
LOSS_WEIGHTINGS = ("uniform", "min-snr")


def _whole(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    return value


def _number(name: str, value: object, minimum: float = 0.0, inclusive: bool = True) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or (value < minimum if inclusive else value <= minimum):
        raise InputError(f"{name} must be a number {'>=' if inclusive else '>'} {minimum}, got {value!r}")
    return float(value)


@dataclass
class FuserTrainingOptions:
    """Everything that defines a fuser-training run (see ``scorefusion train fuser --help``).

    Parameters
    ----------
    bundle : bundle folder with the trained plane models; the fuser is written into it.
    data : the dataset the planes were trained on (same split rule, same grid).
    phase : ``crops`` (phase A) or ``full`` (phase B, with feature alignment).
    config : fuser preset (``paper`` or ``tiny``); ``None``: ``paper`` for phase ``crops``, and
        phase ``crops``' configuration for phase ``full``.
    steps : optimiser steps of this phase.
    batch_size : items (crops or volumes) per optimiser step, over all processes; each
        process accumulates gradients over its share, one item per forward pass.
    crop_size : cube side of phase-A crops; for phase B, crops of this side (a multiple of 8)
        instead of whole volumes when given (``full_volume=False``).
    full_volume : phase B on whole volumes (the paper) rather than crops.
    lr, l1_weight, mse_weight, grad_clip : Adam learning rate (no weight decay: the zero-
        initialised head and alignment must not be pulled anywhere), loss weights, and the
        gradient-norm clip (0: off, as in the paper).
    loss_weighting : ``uniform`` over t (the paper) or ``min-snr`` (items near t = 0, whose noise
        is invisible and whose error hardly matters, are scaled down; see ``fuser.loss_weight``).
    ema_decay, ema_every, ema_start : EMA decay, update period in optimiser steps, and the
        step before which the EMA is a plain copy of the raw weights.
    plane_weights : plane weight set the fuser is trained with (and must later run with).
    from_scratch : allow phase ``full`` without a phase-``crops`` fuser to start from.
    gradient_checkpointing : recompute fuser activations in the backward pass (phase B).
    val_every, val_draws : validation period (0: only at the end) and the number of fixed
        noise levels per held-out case.
    """

    bundle: str
    data: str
    phase: str = "crops"
    config: str | None = None
    steps: int = 20000
    batch_size: int = 4
    crop_size: int = 64
    full_volume: bool = True
    lr: float = 1e-5
    l1_weight: float = 5.0
    mse_weight: float = 150.0
    loss_weighting: str = "uniform"
    grad_clip: float = 0.0
    ema_decay: float = 0.995
    ema_every: int = 10
    ema_start: int = 2000
    plane_weights: str = "ema"
    from_scratch: bool = False
    gradient_checkpointing: bool = False
    slice_batch: int = 16
    val_every: int = 500
    val_draws: int = 8
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    cache: str | None = None
    checkpoint_every: int = 500
    resume: bool = False
    overwrite: bool = False
    stop_after: int | None = None
    threads: int | None = None
    quiet: bool = False
    command_line: str | None = field(default=None, compare=False)

    def validate(self) -> FuserTrainingOptions:
        """Check every field that needs no data; returns ``self``."""
        if not str(self.bundle or "").strip():
            raise InputError("--bundle is required (the bundle with the trained plane models)")
        if not str(self.data or "").strip():
            raise InputError("--data is required (the dataset the plane models were trained on)")
        if self.phase not in PHASES:
            raise InputError(f"unknown --phase {self.phase!r}; use crops (phase A) or full (phase B)")
        if self.config is not None and self.config not in FUSER_PRESETS:
            raise InputError(f"unknown fuser --config {self.config!r}; use one of {', '.join(FUSER_PRESETS)}")
        for name in ("steps", "batch_size", "crop_size", "ema_every", "slice_batch", "val_draws"):
            _whole(f"--{name.replace('_', '-')}", getattr(self, name))
        for name in ("ema_start", "val_every", "checkpoint_every", "seed"):
            _whole(f"--{name.replace('_', '-')}", getattr(self, name), minimum=0)
        if self.crop_size % 8:
            raise InputError(
                f"--crop-size must be a multiple of 8 (the fuser's down-sampling grid), got {self.crop_size}"
            )
        _number("--lr", self.lr, inclusive=False)
        _number("--l1-weight", self.l1_weight)
        _number("--mse-weight", self.mse_weight)
        if self.l1_weight == 0 and self.mse_weight == 0:
            raise InputError("--l1-weight and --mse-weight cannot both be 0")
        _number("--grad-clip", self.grad_clip)
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise InputError(f"unknown --loss-weighting {self.loss_weighting!r}; use {' or '.join(LOSS_WEIGHTINGS)}")
        if not 0.0 <= _number("--ema-decay", self.ema_decay) < 1.0:
            raise InputError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if self.plane_weights not in ("ema", "raw"):
            raise InputError(f"--plane-weights must be ema or raw, got {self.plane_weights!r}")
        if self.device not in DEVICES:
            raise InputError(f"unknown --device {self.device!r}; use one of {', '.join(DEVICES)}")
        if self.amp not in AMP_MODES:
            raise InputError(f"unknown --amp {self.amp!r}; use one of {', '.join(AMP_MODES)}")
        if self.stop_after is not None:
            _whole("--stop-after", self.stop_after)
        if self.threads is not None:
            _whole("--threads", self.threads)
        if self.resume and self.overwrite:
            raise InputError("--resume and --overwrite contradict each other; pick one")
        if self.from_scratch and self.phase != "full":
            raise InputError("--from-scratch only applies to --phase full (phase crops always starts from scratch)")
        return self

    @property
    def aligned(self) -> bool:
        """Phase B trains the feature-alignment layers."""
        return self.phase == "full"

    def to_dict(self) -> dict:
        """JSON-friendly copy (provenance)."""
        return asdict(self)
