"""Volume translation with a trained bundle: super-resolution and contrast synthesis.

The pipeline keeps geometry exact end to end:

1. inputs are checked (NaN/Inf, constant, grids) and reoriented to RAS-aligned axes by
   permuting and flipping only (the plane models were trained on axial/coronal/sagittal
   slices);
2. intensities are normalised as in training (for SR: fitted on the low-resolution input);
3. for SR the measurement is lifted onto the cell-centred SR grid with the bundle's
   degradation operator, which also supplies the data-consistency projection;
4. the grid is padded with background to what the networks and the operator need, the
   sampler runs with the chosen fusion mode, and the padding is cut away;
5. intensities are mapped back through the reference input's normalisation, and the
   reorientation is undone, so the output's IJK->RAS describes exactly the array written.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .bundle import load_fuser, load_plane_models, read_manifest, sha256_file
from .data.records import canonical_contrast
from .data.task import TaskSpec
from .errors import GeometryError, InputError
from .geometry import factors_for_spacing
from .grid import reorient_to_ras
from .intensity import fit_normalization, mask_channel
from .volume import Volume, require_same_grid, require_usable_intensities

OBLIQUITY_WARNING_DEG = 20.0
SAMPLERS = ("ddpm", "ddim", "dpmpp_2m")
#: ``default``: the sampler's own grid (respaced for DDPM as in the paper, uniform in t for
#: DDIM/DPM-Solver++); ``logsnr``: steps uniform in log-SNR where the signal is visible.
TIME_GRIDS = ("default", "logsnr")

ProgressCallback = Callable[[int, int], Any]


#: ``auto`` = ``score-fusion`` when the bundle has a trained fuser, else ``average``.
METHODS = ("auto", "score-fusion", "average", "tpdm", "single")
AMP_MODES = ("auto", "none", "bf16", "fp16")


@dataclass
class SamplingOptions:
    """How to sample: fusion mode, sampler, steps, seed, device, memory bounds and data consistency.

    ``tile_size`` is the fuser's tile side in voxels (``None``: chosen from ``max_memory_gb``,
    or from the free memory of the device when that is ``None`` too). ``samples`` > 1 draws that
    many samples with seeds ``seed, seed + 1, ...``: the output is their mean and
    :attr:`TranslationResult.uncertainty` their voxel-wise standard deviation.
    """

    method: str = "auto"
    sampler: str = "ddpm"
    steps: int = 50
    time_grid: str = "default"
    eta: float = 0.0
    seed: int = 0
    device: str = "auto"
    slice_batch: int = 8
    plane: str | None = None
    tpdm_probabilities: Mapping[str, float] | None = None
    tpdm_cycle: Sequence[str] | None = None
    consistency: bool = True
    consistency_strength: float = 1.0
    weights: str = "ema"
    tile_size: int | None = None
    max_memory_gb: float | None = None
    samples: int = 1
    amp: str = "auto"

    def validate(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.sampler not in SAMPLERS:
            raise InputError(f"unknown sampler {self.sampler!r}; use one of {', '.join(SAMPLERS)}")
        if self.time_grid not in TIME_GRIDS:
            raise InputError(f"unknown time grid {self.time_grid!r}; use one of {', '.join(TIME_GRIDS)}")
        if not 1 <= int(self.steps) <= 1000:
            raise InputError(f"steps must lie in 1..1000, got {self.steps}")
        if self.weights not in ("ema", "raw"):
            raise InputError(f"weights must be 'ema' or 'raw', got {self.weights!r}")
        if self.tile_size is not None and (int(self.tile_size) != self.tile_size or self.tile_size < 8):
            raise InputError(f"the tile size must be a whole number of voxels >= 8, got {self.tile_size}")
        if self.max_memory_gb is not None and not self.max_memory_gb > 0:
            raise InputError(f"the memory bound must be a positive number of GB, got {self.max_memory_gb}")
        if isinstance(self.samples, bool) or int(self.samples) != self.samples or self.samples < 1:
            raise InputError(f"samples must be a whole number >= 1, got {self.samples}")
        if self.amp not in AMP_MODES:
            raise InputError(f"unknown mixed-precision mode {self.amp!r}; use one of {', '.join(AMP_MODES)}")


@dataclass
class TranslationResult:
    """The output volume, the provenance of the run and, for several samples, their standard deviation."""

    volume: Volume
    provenance: dict = field(default_factory=dict)
    uncertainty: Volume | None = None


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; validates explicit choices."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("CUDA was requested but torch sees no CUDA device; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise InputError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    return device


def _mm(values: Any) -> tuple[float, ...]:
    """Plain rounded numbers for messages (numpy 2 would print np.float64(...))."""
    return tuple(round(float(v), 3) for v in values)


def _pad_edge(arr: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Pad at the high end by replicating the last real slice, so 2.5D neighbours of edge slices
    are the replicated edge slice exactly as in training."""
    return np.pad(arr, [(0, int(p) - int(n)) for n, p in zip(arr.shape, shape)], mode="edge")


def _extended_coordinates(shape: Sequence[int], padded: Sequence[int]) -> np.ndarray:
    """Coordinate channels of the real grid (``2 idx / n - 1``), continued linearly into the padding.

    Padding must not change the coordinates of real voxels: training never pads.
    """
    d, h, w = (2.0 * np.arange(int(p)) / int(n) - 1.0 for n, p in zip(shape, padded))
    zz, yy, xx = np.meshgrid(d, h, w, indexing="ij")
    return np.stack([xx, yy, zz]).astype(np.float32)


class _RealRegionProjector:
    """Apply a degradation's null-space projection to the real (unpadded) region only.

    A blurred thick-slice profile would otherwise reach into the padding and treat it as
    measured, so the output would no longer re-degrade to the input.
    """

    def __init__(self, op: Any, shape: Sequence[int]) -> None:
        self.op = op
        self.region = tuple(slice(0, int(n)) for n in shape)

    def project_null(self, r: Any, strength: float = 1.0) -> Any:
        out = r.clone()
        index = (Ellipsis, *self.region)
        out[index] = self.op.project_null(r[index], strength)
        return out


class _Conditioning:
    """Builds the fixed network inputs for any subset of the conditions (one per plane-model group)."""

    def __init__(self, conditions: np.ndarray, coords: Any, device: str) -> None:
        import torch

        self.conditions = conditions
        self.tensor = torch.from_numpy(conditions).to(device)
        self.coords = coords
        self.device = device

    def build(self, indices: Sequence[int]) -> Any:
        import torch

        from .fusion.slice_scorer import VolumeConditioning

        idx = list(indices)
        mask = torch.from_numpy(mask_channel(self.conditions[idx[0]])[None]).to(self.device)
        return VolumeConditioning(conditions=self.tensor[idx], coords=self.coords, mask=mask)


def _autocast(amp: str, device: str) -> Callable[[], Any] | None:
    """Autocast factory for the network calls on CUDA (bf16 where supported), ``None`` on CPU."""
    if not device.startswith("cuda") or amp == "none":
        return None
    import torch

    if amp == "auto":
        if not torch.cuda.is_bf16_supported():
            return None
        amp = "bf16"
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return lambda: torch.autocast(device_type="cuda", dtype=dtype)


class _Autocasting:
    """An epsilon model whose network calls run under autocast; the sampler's arithmetic stays float32."""

    def __init__(self, model: Any, autocast: Callable[[], Any]) -> None:
        self.model = model
        self.autocast = autocast

    def __call__(self, r_t: Any, t: int, abar_t: float) -> Any:
        with self.autocast():
            return self.model(r_t, t, abar_t).float()


def _padded_shape(shape_dhw: Sequence[int], multiples_dhw: Sequence[int]) -> tuple[int, int, int]:
    return tuple(int(math.ceil(n / m) * m) for n, m in zip(shape_dhw, multiples_dhw))


def _requested_factors(lr: Volume, factor: Any, spacing: Any) -> tuple[int, int, int] | None:
    if factor is not None and spacing is not None:
        raise InputError("give either a factor or a target spacing, not both")
    if spacing is not None:
        return factors_for_spacing(lr.affine, spacing)
    if factor is None:
        return None
    f = np.broadcast_to(np.asarray(factor), (3,))
    if not all(float(v).is_integer() and v >= 1 for v in f):
        raise GeometryError(f"super-resolution factors must be whole numbers >= 1, got {tuple(f)}")
    return tuple(int(v) for v in f)


def resolve_method(bundle_dir: str | Path, method: str) -> str:
    """The fusion mode ``method`` means for this bundle (``auto``: score-fusion when it has a fuser).

    Raises :class:`InputError` for score-fusion on a bundle without a trained fuser, so callers
    running several methods can refuse before any work is done.
    """
    has_fuser = bool(read_manifest(bundle_dir).fuser)
    if method == "auto":
        return "score-fusion" if has_fuser else "average"
    if method == "score-fusion" and not has_fuser:
        raise InputError(
            f"bundle {bundle_dir} has no trained fuser, so score-fusion is unavailable; train one with "
            "`scorefusion train fuser`, or use --method average, tpdm or single"
        )
    return method


class _Translator:
    """One run of the pipeline; split in steps so each stays small and testable."""

    def __init__(self, bundle_dir: str | Path, options: SamplingOptions) -> None:
        options.validate()
        self.bundle_dir = Path(bundle_dir)
        self.options = options
        self.manifest = read_manifest(self.bundle_dir)
        self.spec = TaskSpec.from_dict(self.manifest.task)
        self.method = resolve_method(self.bundle_dir, options.method)
        self.log: list[str] = []

    def warn(self, msg: str) -> None:
        self.log.append(msg)
        warnings.warn(msg, stacklevel=3)

    # -- inputs ------------------------------------------------------------------------
    def check_inputs(self, inputs: Mapping[str, Volume]) -> dict[str, Volume]:
        named = {canonical_contrast(k): v for k, v in inputs.items()}
        needed = list(self.spec.inputs)
        missing = [c for c in needed if c not in named]
        if missing:
            raise InputError(
                f"this model needs the contrasts {needed} as input; missing {missing} "
                f"(given: {sorted(named)})"
            )
        extra = sorted(set(named) - set(needed))
        if extra:
            raise InputError(f"this model does not use the contrasts {extra}; it takes {needed}")
        for c in needed:
            if not isinstance(named[c], Volume):
                raise InputError(f"input {c!r} must be a Volume")
            require_usable_intensities(named[c].array, f"input {c}")
        hr_inputs = {c: named[c] for c in needed[1:]} if self.spec.degraded_target else named
        if len(hr_inputs) > 1:
            require_same_grid(hr_inputs)
        return {c: named[c] for c in needed}

    def run(self, inputs: Mapping[str, Volume], factor: Any = None, spacing: Any = None,
            progress: ProgressCallback | None = None) -> TranslationResult:
        start = time.perf_counter()
        named = self.check_inputs(inputs)
        reoriented = {}
        record = None
        for c, vol in named.items():
            ras, rec = reorient_to_ras(vol)
            reoriented[c] = ras
            if record is None:
                record = rec
        if record.obliquity_deg > OBLIQUITY_WARNING_DEG:
            self.warn(
                f"the input is oblique by {record.obliquity_deg:.1f} degrees; the plane models were "
                "trained on axis-aligned anatomy, so expect artefacts (no resampling was done)"
            )
        if self.spec.degraded_target:
            conditions, norms, hr_affine, op = self._sr_conditions(named, reoriented, factor, spacing, record)
        else:
            if factor is not None or spacing is not None:
                raise InputError("a synthesis model keeps the input grid; a factor or spacing makes no sense")
            conditions, norms, hr_affine, op = self._mt_conditions(reoriented)
        outputs = []
        out_norm = norms[self.spec.inputs[0]]
        for k in range(int(self.options.samples)):
            residual = self._sample(conditions, op, progress, int(self.options.seed) + k, k)
            outputs.append(out_norm.invert(conditions[0] + 2.0 * residual).astype(np.float32))
        mean = np.mean(outputs, axis=0, dtype=np.float64).astype(np.float32) if len(outputs) > 1 else outputs[0]
        out = record.undo(Volume(mean, hr_affine))
        uncertainty = None
        if len(outputs) > 1:
            spread = np.std(outputs, axis=0, ddof=1, dtype=np.float64).astype(np.float32)
            uncertainty = record.undo(Volume(spread, hr_affine))
        provenance = self._provenance(norms, time.perf_counter() - start)
        if self.method == "tpdm":
            provenance["planes_per_step"] = [list(p) for p in self.plane_history]
        return TranslationResult(out, provenance, uncertainty)

    def _sr_conditions(self, named, reoriented, factor, spacing, record):
        op = self.spec.degradation
        target = self.spec.target
        lr = reoriented[target]
        wanted = _requested_factors(named[target], factor, spacing)
        # the operator's factors are in RAS-aligned (i, j, k) order; map them to the input's axes
        model_in_input_axes = [0, 0, 0]
        for a in range(3):
            model_in_input_axes[record.perm[a]] = op.factors[a]
        if wanted is not None and tuple(wanted) != tuple(model_in_input_axes):
            raise InputError(
                f"this model super-resolves by {tuple(model_in_input_axes)} along the input's (i, j, k) "
                f"axes; {tuple(wanted)} was requested"
            )
        self._check_factor_axes(op, lr)
        self._check_voxel_size(lr.spacing / np.asarray(op.factors))
        hr_affine = op.hr_affine(lr.affine)
        hr_shape_ijk = tuple(n * f for n, f in zip(lr.shape_ijk, op.factors))
        if self.spec.sr_normalization == "target":
            self.warn(
                "this bundle was trained with the paper's normalisation (each target's own range); at "
                "inference only the low-resolution input is known, so its range is used, which stretches "
                "intensities slightly compared with training"
            )
        norm = fit_normalization(lr.array, self.spec.normalization, name=f"input {target}")
        measurement = norm.apply(lr.array)
        conds = [np.asarray(op.lift(measurement), dtype=np.float32)]
        norms = {target: norm}
        for c in self.spec.inputs[1:]:
            vol = reoriented[c]
            if vol.shape_ijk != hr_shape_ijk or not np.allclose(vol.affine, hr_affine, atol=1e-3):
                raise GeometryError(
                    f"input {c!r} must lie on the super-resolved grid {hr_shape_ijk} of the {target} "
                    "input; resample it onto that grid first"
                )
            norms[c] = fit_normalization(vol.array, self.spec.normalization, name=f"input {c}")
            conds.append(norms[c].apply(vol.array))
        return np.stack(conds), norms, hr_affine, op

    @staticmethod
    def _check_factor_axes(op: Any, lr: Volume) -> None:
        """An anisotropic model (thick slices, per-axis pooling) only fits inputs that are coarsest
        along the axes it refines; otherwise the wrong axis would be super-resolved."""
        factors, spacing = op.factors, lr.spacing
        names = ("left-right", "posterior-anterior", "inferior-superior")
        for a in range(3):
            for b in range(3):
                if factors[a] > factors[b] and spacing[a] <= spacing[b] * (1 + 1e-3):
                    raise InputError(
                        f"this model refines by {tuple(factors)} along the (left-right, posterior-anterior, "
                        f"inferior-superior) axes, so the input must be thickest along {names[a]}; its spacing "
                        f"is {_mm(spacing)} mm in that order, thickest along "
                        f"{names[int(np.argmax(spacing))]}; use a model trained for that slice direction"
                    )

    def _check_voxel_size(self, spacing_ras: np.ndarray) -> None:
        """Warn when the grid the networks will see has a voxel size unlike the training grid's."""
        trained = self.manifest.grid.get("spacing")
        if not trained or self.manifest.grid.get("orientation") != "RAS":
            return
        trained = np.asarray(trained, dtype=np.float64)
        if np.any(np.abs(spacing_ras / trained - 1.0) > 0.15):
            self.warn(
                f"the networks will see voxels of {_mm(spacing_ras)} mm but were trained on {_mm(trained)} mm "
                "(RAS order); expect degraded results, or resample the input"
            )

    def _mt_conditions(self, reoriented):
        self._check_voxel_size(reoriented[self.spec.inputs[0]].spacing)
        norms, conds = {}, []
        for c in self.spec.inputs:
            norms[c] = fit_normalization(reoriented[c].array, self.spec.normalization, name=f"input {c}")
            conds.append(norms[c].apply(reoriented[c].array))
        return np.stack(conds), norms, reoriented[self.spec.inputs[0]].affine, None

    # -- sampling ----------------------------------------------------------------------
    def _sample(self, conditions: np.ndarray, op: Any, progress: ProgressCallback | None, seed: int,
                sample_index: int) -> np.ndarray:
        import torch

        from .diffusion.hooks import make_x0_hook
        from .diffusion.samplers import sample
        from .diffusion.schedule import FusedSchedule, logsnr_steps

        opts = self.options
        device = resolve_device(opts.device)
        models = self._models(device)
        multiples = [self._grid_multiple(models)] * 3
        if op is not None:
            multiples = [int(np.lcm(multiples[0], f)) for f in op.factors[::-1]]  # (D, H, W) order
        shape = conditions.shape[1:]
        padded = _padded_shape(shape, multiples)
        conds = np.stack([_pad_edge(c, padded) for c in conditions]).astype(np.float32)
        coords = torch.from_numpy(_extended_coordinates(shape, padded)).to(device)
        cond = _Conditioning(conds, coords, device)
        eps_model = self._eps_model(models, cond, seed, device)
        projector = _RealRegionProjector(op, shape) if (op is not None and opts.consistency) else None
        hook = make_x0_hook(clip=True, projector=projector, strength=opts.consistency_strength)
        generator = torch.Generator().manual_seed(int(seed))
        samples = int(opts.samples)

        def callback(i: int, total: int, t: int) -> None:
            if progress is not None:
                progress(sample_index * total + i + 1, samples * total)

        schedule = FusedSchedule()
        grid = logsnr_steps(int(opts.steps), schedule) if opts.time_grid == "logsnr" else int(opts.steps)
        state = sample(opts.sampler, eps_model, (1, *padded), schedule, grid, eta=opts.eta,
                       x0_hook=hook, generator=generator, device=device, callback=callback)
        self.plane_history = getattr(self, "_ensemble", None) and self._ensemble.history
        r0 = state[0].detach().cpu().numpy().astype(np.float32)
        return r0[: shape[0], : shape[1], : shape[2]]

    def _models(self, device: str) -> dict:
        """Plane models (and the fuser), loaded once per run."""
        if getattr(self, "_loaded", None) is None:
            _, planes = load_plane_models(self.bundle_dir, self._planes_needed(), which=self.options.weights,
                                          device=device)
            fuser = None
            if self.method == "score-fusion":
                _, fuser = load_fuser(self.bundle_dir, "ema", self.options.weights, device)
            self._loaded = {"planes": planes, "fuser": fuser}
        return self._loaded

    @staticmethod
    def _grid_multiple(models: dict) -> int:
        divisor = max(m.required_divisor for m in models["planes"].values())
        fuser = models["fuser"]
        if fuser is not None:
            factors = [f for f, _ in fuser.config.aligned_channels]
            divisor = int(np.lcm.reduce([divisor, fuser.config.required_divisor, *factors]))
        return divisor

    def _eps_model(self, models: dict, cond: _Conditioning, seed: int, device: str) -> Any:
        from .fusion.modes import PlaneEnsemble
        from .fusion.score_fusion import MAIN_GROUP, PlaneGroup, ScoreFusionModel
        from .fusion.slice_scorer import SliceScorer

        opts = self.options
        scorers = {p: SliceScorer(m, p, self.manifest.neighbors, opts.slice_batch)
                   for p, m in models["planes"].items()}
        full = cond.build(range(self.spec.n_conditions))
        autocast = _autocast(opts.amp, device)
        if self.method != "score-fusion":
            self._ensemble = PlaneEnsemble(scorers, full, self.method, opts.plane, opts.tpdm_probabilities,
                                           opts.tpdm_cycle, seed=seed)
            return self._ensemble if autocast is None else _Autocasting(self._ensemble, autocast)
        fuser = models["fuser"]
        tile = self._tile_size(fuser.config, full.shape, device)
        return ScoreFusionModel(fuser, [PlaneGroup(MAIN_GROUP, scorers, full)], full, tile, autocast)

    def _tile_size(self, config: Any, shape: Sequence[int], device: str) -> int:
        from .fusion.tiling import auto_tile_size, estimate_fuser_bytes_per_voxel, free_memory_bytes

        multiple = self._grid_multiple(self._loaded)
        if self.options.tile_size is not None:
            tile = int(math.ceil(int(self.options.tile_size) / multiple) * multiple)
        else:
            budget = (self.options.max_memory_gb * 2**30 if self.options.max_memory_gb is not None
                      else 0.5 * free_memory_bytes(device))
            per_voxel = estimate_fuser_bytes_per_voxel(config.level_channels, config.num_res_blocks)
            tile = auto_tile_size(shape, per_voxel, budget, multiple)
        self.tile_used = min(tile, int(math.ceil(max(shape) / multiple) * multiple))
        return self.tile_used

    def _planes_needed(self) -> list[str]:
        available = list(self.manifest.planes)
        if self.method == "single":
            plane = self.options.plane or ("sagittal" if "sagittal" in available else available[0])
            if plane not in available:
                raise InputError(f"the bundle has no {plane} model (it has {', '.join(available)})")
            return [plane]
        return available

    def _provenance(self, norms, seconds: float) -> dict:
        opts = self.options
        return {
            "software": f"ScoreFusion {__version__}",
            "bundle": str(self.bundle_dir.resolve()),
            "manifest_sha256": sha256_file(self.bundle_dir / "manifest.json"),
            "plane_weights": {p: e.sha256 for p, e in self.manifest.planes.items()},
            "weights": opts.weights,
            "task": self.spec.to_dict(),
            "method": self.method,
            **({"fuser_sha256": self.manifest.fuser.get("sha256"), "fuser_phase": self.manifest.fuser.get("phase"),
                "tile_size": getattr(self, "tile_used", None)} if self.method == "score-fusion" else {}),
            "samples": int(opts.samples),
            "output": "mean of the samples" if int(opts.samples) > 1 else "one sample",
            "sampler": opts.sampler,
            "steps": int(opts.steps),
            "time_grid": opts.time_grid,
            "eta": opts.eta,
            "seed": int(opts.seed),
            "data_consistency": bool(opts.consistency and self.spec.degraded_target),
            "consistency_strength": opts.consistency_strength,
            "normalization": {c: n.to_dict() for c, n in norms.items()},
            "seconds": round(seconds, 3),
            "notes": self.log,
            "intended_use": "AI-generated image for research; not for diagnosis.",
        }


def super_resolve(volume: Volume, bundle_dir: str | Path, options: SamplingOptions | None = None,
                  factor: Any = None, spacing: Sequence[float] | None = None,
                  extra_inputs: Mapping[str, Volume] | None = None,
                  progress: ProgressCallback | None = None) -> TranslationResult:
    """Super-resolve ``volume`` with an SR (or ``both``) bundle.

    ``factor`` (per input IJK axis, or one number) or ``spacing`` (mm) must agree with the
    bundle's degradation when given. ``extra_inputs`` are the other conditions of a ``both``
    bundle, on the super-resolved grid.
    """
    translator = _Translator(bundle_dir, options or SamplingOptions())
    if not translator.spec.degraded_target:
        raise InputError("this bundle synthesises contrasts; use synthesize() / `scorefusion synthesize`")
    inputs = {translator.spec.target: volume, **(extra_inputs or {})}
    return translator.run(inputs, factor=factor, spacing=spacing, progress=progress)


def synthesize(inputs: Mapping[str, Volume], bundle_dir: str | Path, options: SamplingOptions | None = None,
               progress: ProgressCallback | None = None) -> TranslationResult:
    """Synthesise the bundle's target contrast from ``inputs`` (contrast name -> Volume)."""
    translator = _Translator(bundle_dir, options or SamplingOptions())
    if translator.spec.degraded_target:
        raise InputError("this bundle super-resolves; use super_resolve() / `scorefusion super-resolve`")
    return translator.run(inputs, progress=progress)
