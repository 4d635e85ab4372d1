"""Diffusion core: noise schedules, time grids, the x0 hook and the reverse samplers.

Importing this package does not import torch: the schedule tables are numpy float64, and the
tensor code in :mod:`.schedule`, :mod:`.samplers` and :mod:`.hooks` imports torch inside
its functions. See method.md sections 2 and 6.
"""

from __future__ import annotations

from .hooks import make_x0_hook
from .samplers import METHODS, sample, sample_ddim, sample_ddpm, sample_dpmpp_2m
from .schedule import (
    CLEAN,
    FusedSchedule,
    PlaneTrainingSchedule,
    ddpm_respaced_steps,
    logsnr_steps,
    normalize_steps,
    uniform_steps,
)

__all__ = [
    "CLEAN",
    "METHODS",
    "FusedSchedule",
    "PlaneTrainingSchedule",
    "ddpm_respaced_steps",
    "logsnr_steps",
    "make_x0_hook",
    "normalize_steps",
    "sample",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "uniform_steps",
]
