"""Run a bundle and its non-learned baselines on one volume with a known ground truth.

Shared by the demo, the default-model benchmark and the quality tests, so all three measure
the same way: PSNR and SSIM over the whole volume on the truth's grid (``volume_metrics``) and
seconds per method call.

Synthesis outputs have no unit, so they are scored twice:

* ``psnr`` / ``ssim``: mapped into the truth's normalised frame, as ``scorefusion evaluate``
  and the paper do (min/max of the input and of the truth);
* ``psnr_calibrated`` / ``ssim_calibrated``: after the best affine intensity map onto the truth
  (least squares). The linear-map baseline is exactly the best affine map of the inputs, so
  this is the like-for-like comparison with it: structure, not units. The min/max frame is
  sensitive to the truth's brightest voxels (noise, tumour), which no model can know.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..volume import Volume

#: interpolation baselines of super-resolution
INTERPOLATIONS = ("nearest", "trilinear", "bspline")
#: the oracle linear-mapping baseline of synthesis
LINEAR_MAP = "linear-map"

ProgressFactory = Callable[[str, int], Callable[[int, int], None]]


@dataclass
class MethodRun:
    """One method's output, the array that was scored, its metrics and the sampling used (models only)."""

    volume: Volume
    scored: np.ndarray
    metrics: dict
    seconds: float
    options: Any = None
    provenance: dict | None = None
    baseline_info: dict | None = None


def score(scored: np.ndarray, truth: Volume) -> dict[str, float]:
    """PSNR (dB) and SSIM of ``scored`` against ``truth`` (whole volume)."""
    from ..metrics import volume_metrics

    m = volume_metrics(scored, truth.array)
    return {"psnr": round(float(m["psnr"]), 3), "ssim": round(float(m["ssim"]), 4)}


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _model_run(run: Callable[[Any, Any], Any], method: str, options_for: Callable[[str], Any],
               progress: ProgressFactory | None) -> tuple[Any, Any, float]:
    options = options_for(method)
    callback = progress(method, int(options.steps)) if progress else None
    result, seconds = _timed(lambda: run(options, callback))
    return result, options, seconds


def compare_super_resolution(truth: Volume, bundle: str | Path, methods: Sequence[str],
                             options_for: Callable[[str], Any],
                             progress: ProgressFactory | None = None) -> tuple[Volume, dict[str, MethodRun]]:
    """Degrade ``truth`` with the bundle's operator and bring it back with each method.

    Returns the low-resolution input and method -> :class:`MethodRun`.
    """
    from ..bundle import read_manifest
    from ..data.task import TaskSpec
    from ..interpolation import upsample_volume
    from ..translate import super_resolve

    spec = TaskSpec.from_dict(read_manifest(bundle).task)
    if not spec.degraded_target:
        raise InputError(f"{bundle} is a synthesis bundle; use compare_synthesis")
    op = spec.degradation
    low_res = op.degrade_volume(truth)
    runs = {}
    for method in methods:
        if method in INTERPOLATIONS:
            volume, seconds = _timed(lambda m=method: upsample_volume(low_res, op.factors, m))
            runs[method] = MethodRun(volume, volume.array, score(volume.array, truth), seconds)
            continue
        result, options, seconds = _model_run(
            lambda o, cb: super_resolve(low_res, bundle, o, progress=cb), method, options_for, progress)
        runs[method] = MethodRun(result.volume, result.volume.array, score(result.volume.array, truth), seconds,
                                 options, result.provenance)
    return low_res, runs


def compare_synthesis(images: Mapping[str, Volume], bundle: str | Path, methods: Sequence[str],
                      options_for: Callable[[str], Any],
                      progress: ProgressFactory | None = None) -> dict[str, MethodRun]:
    """Synthesise the bundle's target from ``images`` (which also hold the truth) with each method."""
    from ..bundle import read_manifest
    from ..data.task import TaskSpec
    from ..evaluation import synthesis_in_target_frame
    from ..translate import synthesize
    from .baselines import best_linear_mapping

    spec = TaskSpec.from_dict(read_manifest(bundle).task)
    if spec.degraded_target:
        raise InputError(f"{bundle} is a super-resolution bundle; use compare_super_resolution")
    truth = images[spec.target]
    inputs = {c: images[c] for c in spec.inputs}
    reference = inputs[spec.inputs[0]].array
    runs = {}
    for method in methods:
        if method == LINEAR_MAP:
            (volume, coefficients), seconds = _timed(lambda: best_linear_mapping(list(inputs.values()), truth))
            metrics = score(volume.array, truth)
            runs[method] = MethodRun(volume, volume.array, {**metrics, **_calibrated(volume, truth)}, seconds,
                                     baseline_info={"coefficients": coefficients,
                                                    "fit": "least squares against the ground truth (oracle)"})
            continue
        result, options, seconds = _model_run(
            lambda o, cb: synthesize(inputs, bundle, o, progress=cb), method, options_for, progress)
        scored = synthesis_in_target_frame(result.volume.array, truth.array, reference, spec.normalization)
        metrics = {**score(scored, truth), **_calibrated(Volume(scored, truth.affine), truth)}
        runs[method] = MethodRun(result.volume, scored, metrics, seconds, options, result.provenance)
    return runs


def _calibrated(result: Volume, truth: Volume) -> dict[str, float]:
    """PSNR and SSIM after the best affine intensity map of ``result`` onto ``truth``."""
    from .baselines import best_linear_mapping

    calibrated, _ = best_linear_mapping([result], truth)
    metrics = score(calibrated.array, truth)
    return {"psnr_calibrated": metrics["psnr"], "ssim_calibrated": metrics["ssim"]}


def registry_sampling(entry: Any, method: str, *, steps: int | None = None, sampler: str | None = None,
                      seed: int = 0, device: str = "auto") -> Any:
    """Sampling options for ``method`` from a registry entry's defaults, with explicit overrides."""
    from ..translate import SamplingOptions

    defaults = dict(getattr(entry, "sampling", None) or {})
    return SamplingOptions(
        method=method,
        sampler=sampler or defaults.get("sampler", "ddpm"),
        steps=int(steps or defaults.get("steps", 50)),
        time_grid=defaults.get("time_grid", "default"),
        eta=float(defaults.get("eta", 0.0)),
        samples=int(defaults.get("samples", 1)),
        seed=seed,
        device=device,
    )
