"""Validation of a plane model on fixed held-out slices: a one-step denoising score.

What it measures. A fixed set of slices of the held-out cases (evenly spread over them) gets
fixed noise ``eps`` per slice, drawn once. The network sees
``r_gamma = sqrt(g) r0 + sqrt(1 - g) eps`` and predicts ``eps_hat``. We report

* ``val_loss``: ``mean (eps_hat - eps)^2`` with ``g`` drawn once per slice from the
  training distribution (method.md 2.4): the training objective on held-out data;
* ``val_psnr``: PSNR (paper protocol, :func:`ScoreFusionLib.metrics.psnr` on the whole slice
  stack) of ``y_hat = c_ref + 2 r0_hat`` against the target, from the one-step estimate
  ``r0_hat = (r_gamma - sqrt(1 - g) eps_hat) / sqrt(g)`` clipped to [-1, 1] (method.md 2.1),
  at the single fixed level ``g = psnr_gamma`` (default 0.5, about step 115 of the fused
  schedule). One level, because over the training distribution the one-step error is
  amplified by ``sqrt((1 - g) / g)`` (up to 150x at the smallest g), so a mixture would only
  measure the hopeless nearly-pure-noise draws;
* ``val_psnr_reference``: the same PSNR for ``y_hat = c_ref`` (``r0_hat = 0``), the floor a
  useful model should beat.

This is a **denoising** PSNR, not the PSNR of a full reverse sampling run (which needs all
three planes, a sampler and minutes per volume); it tracks training progress and
overfitting cheaply and identically at every validation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..data.slices import PlaneSliceDataset, concat_plane_input
from ..data.task import PreparedCase
from ..errors import InputError
from .seeding import torch_generator

#: Slices per forward pass during validation.
VAL_BATCH = 16
#: Noise level of the one-step PSNR (see the module docstring).
PSNR_GAMMA = 0.5


@dataclass
class ValidationSet:
    """Fixed validation slices of one plane and their fixed (gamma, noise) draws (CPU tensors)."""

    cond: Any
    coords: Any
    mask: Any
    r0: Any
    target: Any
    c_ref: Any
    gamma: Any
    noise: Any
    slices: list[tuple[str, int]]
    psnr_gamma: float = PSNR_GAMMA

    def __len__(self) -> int:
        return len(self.slices)


def select_slices(n_total: int, n_wanted: int) -> list[int]:
    """Evenly spread dataset indices ``0 .. n_total - 1`` (deterministic, at most ``n_wanted``)."""
    k = min(int(n_wanted), int(n_total))
    return sorted({int(i) for i in np.round(np.linspace(0, n_total - 1, k)).astype(np.int64)})


def build_validation_set(
    cases: list[PreparedCase], plane: str, neighbors: int, n_slices: int, seed: int, schedule: Any,
    psnr_gamma: float = PSNR_GAMMA,
) -> ValidationSet | None:
    """The fixed validation set of ``plane`` (``None`` without held-out cases)."""
    import torch

    if not cases:
        return None
    ds = PlaneSliceDataset(cases, plane, neighbors)
    items = [ds[i] for i in select_slices(len(ds), n_slices)]

    def stack(key: str) -> Any:
        return torch.from_numpy(np.stack([it[key] for it in items]).astype(np.float32))

    cond = stack("cond")
    centre = int(neighbors)  # condition 0's centre slice in the condition-major layout
    g = torch_generator(seed, plane, "validation")
    gamma = schedule.sample_gamma(len(items), generator=g)
    noise = torch.randn((len(items), 1, *cond.shape[-2:]), generator=g, dtype=torch.float32)
    return ValidationSet(
        cond=cond, coords=stack("coords"), mask=stack("mask"), r0=stack("r0"), target=stack("target"),
        c_ref=cond[:, centre : centre + 1].clone(), gamma=gamma, noise=noise,
        slices=[(cases[it["case_index"]].case_id, int(it["slice_index"])) for it in items],
        psnr_gamma=float(psnr_gamma),
    )


def _psnr_or_none(result: np.ndarray, reference: np.ndarray) -> float | None:
    from ..metrics import psnr

    try:
        value = psnr(result, reference)
    except InputError:  # e.g. an all-background (constant) target stack
        return None
    return float(value) if np.isfinite(value) else None


def _one_step(model: Any, vset: ValidationSet, lo: int, hi: int, gamma: Any, schedule: Any, device: Any,
              autocast: Any) -> tuple[Any, Any, Any]:
    """``(eps, eps_hat, noisy)`` for slices ``lo:hi`` at noise levels ``gamma`` (float64, CPU)."""
    r0 = vset.r0[lo:hi].to(device)
    eps = vset.noise[lo:hi].to(device)
    noisy = schedule.q_sample(r0, gamma, eps)
    x = concat_plane_input(vset.cond[lo:hi].to(device), vset.coords[lo:hi].to(device),
                           vset.mask[lo:hi].to(device), noisy)
    with autocast():
        eps_hat = model(x, gamma.to(device))
    return eps, eps_hat.float(), noisy


def evaluate(model: Any, vset: ValidationSet, schedule: Any, device: Any, autocast: Any) -> dict:
    """Validation metrics of ``model`` (run in eval mode) on ``vset``; see the module docstring.

    ``autocast`` is a zero-argument callable returning the context manager used for the
    network's forward pass (the same as in training).
    """
    import torch

    was_training = model.training
    model.eval()
    sq_sum, count = 0.0, 0
    y_hats = []
    g_psnr = float(vset.psnr_gamma)
    with torch.no_grad():
        for lo in range(0, len(vset), VAL_BATCH):
            hi = min(lo + VAL_BATCH, len(vset))
            eps, eps_hat, _ = _one_step(model, vset, lo, hi, vset.gamma[lo:hi], schedule, device, autocast)
            sq_sum += float(((eps_hat - eps) ** 2).sum().item())
            count += eps.numel()
            fixed = torch.full((hi - lo,), g_psnr, dtype=torch.float64)
            _, eps_hat, noisy = _one_step(model, vset, lo, hi, fixed, schedule, device, autocast)
            r0_hat = ((noisy - math.sqrt(1.0 - g_psnr) * eps_hat) / math.sqrt(g_psnr)).clamp(-1.0, 1.0)
            y_hats.append((vset.c_ref[lo:hi].to(device) + 2.0 * r0_hat).cpu())
    model.train(was_training)
    y_hat = torch.cat(y_hats).numpy().astype(np.float64)
    target = vset.target.numpy().astype(np.float64)
    return {
        "val_loss": sq_sum / max(count, 1),
        "val_psnr": _psnr_or_none(y_hat, target),
        "val_psnr_reference": _psnr_or_none(vset.c_ref.numpy().astype(np.float64), target),
        "val_psnr_gamma": g_psnr,
        "val_slices": len(vset),
    }
