"""Training of the plane models (method.md sections 2.4 and 5.1) into a model bundle.

Modules (one job each): :mod:`.options` (the run's options and their checks),
:mod:`.cases` (split, load and prepare the cases), :mod:`.seeding` (counter-based seeds),
:mod:`.ema` (weight averaging with warm-up), :mod:`.distributed` (torchrun/DDP helpers),
:mod:`.state` (resume checkpoints, safetensors + JSON), :mod:`.validation` (fixed held-out
slices, one-step denoising PSNR), :mod:`.outputs` (bundle folder, manifest, resume
signature) and :mod:`.planes` (the training loop, :func:`train_planes`).

Typical use::

    from ScoreFusionLib.train import PlaneTrainingOptions, train_planes
    bundle = train_planes(PlaneTrainingOptions(data="sim", out="bundle", task="sr", target="t2f",
                                               config="tiny", grid=None, steps=200))

Nothing here imports torch at module level.
"""

from __future__ import annotations

from .distributed import DistContext, init_distributed, shard_range, world_from_env
from .ema import EMA, ema_decay_at
from .options import PlaneTrainingOptions, parse_axis, parse_factors, parse_grid, split_list
from .outputs import ResumeError
from .planes import StepBatchSampler, TrainingError, train_planes
from .seeding import derive_seed
from .state import CheckpointError, load_training_state, save_training_state
from .validation import ValidationSet, build_validation_set, evaluate

__all__ = [
    "EMA",
    "CheckpointError",
    "DistContext",
    "PlaneTrainingOptions",
    "ResumeError",
    "StepBatchSampler",
    "TrainingError",
    "ValidationSet",
    "build_validation_set",
    "derive_seed",
    "ema_decay_at",
    "evaluate",
    "init_distributed",
    "load_training_state",
    "parse_axis",
    "parse_factors",
    "parse_grid",
    "save_training_state",
    "shard_range",
    "split_list",
    "train_planes",
    "world_from_env",
]
