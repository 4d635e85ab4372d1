"""Training the 3D fuser on top of frozen plane models (method.md 5.2-5.4).

Per item (a random crop in phase ``crops``, a whole volume in phase ``full``): draw
``t ~ U{0..999}`` and noise ``eps``; form ``r_t`` with the fused schedule; let every frozen plane
model score the whole volume's slices at ``gamma = abar_t`` (no gradient, eval mode; in phase
``full`` their decoder features go through the trainable alignment convolutions), exactly as at
inference; run the fuser on the item's crop of ``r_t``, the conditions, coordinates, mask, plane
estimates and aligned features; fuse; and minimise
``5 mean|eps_hat - eps| + 150 mean (eps_hat - eps)^2``. Gradients of the step's items are
accumulated (one item per forward pass), averaged over processes with an all-reduce, and
Adam (no weight decay) takes one step. The EMA is a copy of the raw weights before
``ema_start`` and then an average with decay 0.995 updated every ``ema_every`` steps.

Determinism: item ``i`` of the global stream (step ``s`` holds items ``s B .. s B + B - 1``)
takes its case from a per-epoch permutation and its crop position, ``t`` and noise from
generators seeded by (seed, phase, i), so a resumed run continues exactly (bitwise on CPU) and
N processes under ``torchrun`` see the same items as one process with the same batch.

The plane models are never submodules of the trained network, so ``train()`` calls cannot
switch their dropout back on (pitfall 12), and the fuser is trained with exactly the plane
weights whose hashes it records (pitfall 7).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import (
    BundleError,
    load_plane_models,
    load_state_into,
    load_weights,
    read_manifest,
    save_weights,
    write_manifest,
)
from ..data.slices import plane_axis
from ..data.task import PreparedCase, TaskSpec
from ..errors import GeometryError, InputError
from .cases import TrainingData, load_task_cases
from .distributed import all_reduce_mean, barrier, init_distributed, plan_context, shard_range, shutdown
from .ema import EMA
from .fuser_options import FuserTrainingOptions
from .outputs import ResumeError, compare_signatures, utc_now
from .planes import TrainingError, autocast_factory, optimizer_step, resolve_amp
from .seeding import numpy_generator, torch_generator
from .state import has_training_state, load_training_state, remove_training_state, save_training_state

logger = logging.getLogger(__name__)

Callback = Callable[[dict], None]

#: The SNR cap of min-SNR loss weighting.
MIN_SNR_GAMMA = 5.0

#: Signature keys a resumed fuser run must share with the run it continues, and their options.
FUSER_SIGNATURE_FIELDS = {
    "phase": "--phase",
    "config": "--config",
    "plane_sha256": "the bundle's plane models",
    "plane_weights": "--plane-weights",
    "batch_size": "--batch-size",
    "crop": "--crop-size/--full-volume",
    "lr": "--lr",
    "loss": "--l1-weight/--mse-weight/--loss-weighting",
    "ema": "--ema-decay/--ema-every/--ema-start",
    "grad_clip": "--grad-clip",
    "seed": "--seed",
    "train_case_ids": "--data (training cases)",
}


def fuser_file_name(phase: str) -> str:
    return f"fuser-{phase}.safetensors"


def _state_name(phase: str) -> str:
    return f"fuser-{phase}"


@dataclass
class _Item:
    """One training or validation item: a whole case as tensors on the device, and the fuser's region.

    The plane models always score whole slices of the whole volume, as at inference; only the
    fuser sees the crop ``region`` (its estimates, features and inputs are cut from the whole).
    Scoring cropped slices instead would teach the fuser to correct crop-border errors of the
    planes that never occur at inference.
    """

    conditions: Any  # (M, D, H, W)
    coords: Any  # (3, D, H, W)
    mask: Any  # (1, D, H, W)
    r0: Any  # (1, D, H, W)
    region: tuple[slice, slice, slice]


def _item(case: PreparedCase, start: tuple[int, int, int], size: tuple[int, int, int], device: Any) -> _Item:
    import torch

    def t(a: np.ndarray) -> Any:
        return torch.from_numpy(np.array(a, dtype=np.float32)).to(device)  # a copy: cached cases are read-only

    region = tuple(slice(a, a + s) for a, s in zip(start, size))
    return _Item(t(case.conditions), t(case.coords), t(case.mask[None]), t(case.r0[None]), region)


def loss_weight(t: int, weighting: str, gamma: float = MIN_SNR_GAMMA) -> float:
    """Per-item loss weight: 1 (``uniform``, the paper) or ``min(SNR_t, gamma) / SNR_t`` (``min-snr``).

    With this schedule ``abar_0 = 0.9999``: near t = 0 the noise is almost invisible in ``r_t``, so
    its eps error is large (about 0.6 for any model) yet irrelevant to the clean estimate (scaled
    by ``sqrt((1 - abar)/abar) = 0.01``). Under uniform weighting those items dominate the loss;
    min-SNR weighting (Hang et al. 2023) scales them down by ``gamma / SNR_t``.
    """
    if weighting == "uniform":
        return 1.0
    from ..diffusion.schedule import FusedSchedule

    abar = FusedSchedule().abar(t)
    snr = abar / max(1.0 - abar, 1e-30)
    return min(snr, gamma) / snr


def fuser_loss(eps_hat: Any, eps: Any, l1_weight: float, mse_weight: float) -> Any:
    """``l1_weight * mean|eps_hat - eps| + mse_weight * mean (eps_hat - eps)^2`` (paper: 5 and 150)."""
    diff = eps_hat.float() - eps.float()
    return l1_weight * diff.abs().mean() + mse_weight * diff.square().mean()


class _FuserSession:
    """State of one :func:`train_fuser` invocation."""

    def __init__(self, options: FuserTrainingOptions, spec: TaskSpec, manifest: Any, data: TrainingData,
                 ctx: Any, amp: str, callback: Callback | None) -> None:
        self.options, self.spec, self.manifest, self.data, self.ctx = options, spec, manifest, data, ctx
        self.callback = callback
        self.bundle = Path(options.bundle)
        self.autocast = autocast_factory(amp, ctx.device)
        self.amp = amp
        _, self.planes = load_plane_models(self.bundle, None, which=options.plane_weights, device=ctx.device)
        for model in self.planes.values():
            model.requires_grad_(False)
        self.plane_sha256 = {p: e.sha256 for p, e in manifest.planes.items()}
        self.config = self._config()
        self.multiple = int(np.lcm.reduce([self.config.required_divisor,
                                           *(f for f, _ in self.config.aligned_channels),
                                           *(m.required_divisor for m in self.planes.values())]))
        self.crop = self._crop_size()

    # -- configuration -----------------------------------------------------------------
    def _config(self) -> Any:
        from dataclasses import replace

        from ..nets.fuser_config import Fuser3DConfig, fuser_config

        opt = self.options
        n = len(self.planes)
        in_channels = 1 + self.spec.n_conditions + 3 + 1 + n
        sources, channels = (), ()
        if opt.aligned:
            sources = tuple((p, plane_axis(p)) for p in self.planes)
            feats = {tuple(sorted(m.feature_channels.items())) for m in self.planes.values()}
            if len(feats) != 1:
                raise InputError("the plane models have different feature channels; feature alignment needs one layout")
            channels = tuple(sorted(dict(next(iter(feats))).items(), reverse=True))
        previous = (self.manifest.fuser or {}).get("phases", {}).get("crops")
        if opt.phase == "full" and previous and not opt.from_scratch:
            base = Fuser3DConfig.from_dict(previous["config"])
            if opt.config is not None and base.to_dict() != replace(
                fuser_config(opt.config, in_channels, n), bias_scale=base.bias_scale
            ).to_dict():
                raise InputError(f"phase full continues the phase-crops fuser; its configuration differs from the "
                                 f"{opt.config!r} preset (drop --config)")
            return replace(base, aligned_sources=sources, aligned_channels=channels)
        return fuser_config(opt.config or "paper", in_channels, n, aligned_sources=sources, aligned_channels=channels)

    def _crop_size(self) -> tuple[int, int, int]:
        shape = self.data.train[0].shape
        m = self.multiple
        for n in shape:
            if n % m:
                raise GeometryError(
                    f"the model grid {shape} (D, H, W) has a side that is not a multiple of {m}, which the fuser "
                    "and plane networks need; retrain the planes on a grid with sides that are multiples of it"
                )
        if self.options.phase == "full" and self.options.full_volume:
            return shape
        side = self.options.crop_size
        return tuple(min(side, n) // m * m for n in shape)

    # -- items -------------------------------------------------------------------------
    def _case_for(self, index: int) -> PreparedCase:
        cases = self.data.train
        epoch, pos = divmod(int(index), len(cases))
        order = numpy_generator(self.options.seed, "fuser", self.options.phase, "order", epoch).permutation(len(cases))
        return cases[int(order[pos])]

    def _start_for(self, case: PreparedCase, index: int) -> tuple[int, int, int]:
        # crops start on the grid of the coarsest factor, so fuser down-sampling and alignment windows
        # coincide with those of inference
        step = self.multiple
        rng = numpy_generator(self.options.seed, "fuser", self.options.phase, "crop", int(index))
        return tuple(int(rng.integers(0, (n - s) // step + 1)) * step for n, s in zip(case.shape, self.crop))

    def _draw(self, index: int, shape: tuple[int, ...], *keys: Any) -> tuple[int, Any]:
        import torch

        g = torch_generator(self.options.seed, "fuser", self.options.phase, *keys, int(index))
        t = int(torch.randint(0, 1000, (1,), generator=g).item())
        return t, torch.randn(shape, generator=g, dtype=torch.float32)

    # -- model -------------------------------------------------------------------------
    def build(self) -> Any:
        import torch

        from ..nets.score_fuser import ScoreFuser

        torch.manual_seed(int(self.options.seed) + 7919)
        model = ScoreFuser(self.config)
        previous = (self.manifest.fuser or {}).get("phases", {}).get("crops")
        if self.options.phase == "full" and not self.options.from_scratch:
            if not previous:
                raise InputError(
                    f"bundle {self.bundle} has no phase-crops fuser to start phase full from; train --phase crops "
                    "first, or pass --from-scratch"
                )
            state = load_weights(self.bundle / previous["file"], "ema", previous.get("sha256"))
            net_state = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
            load_state_into(model.net, net_state, f"phase-crops fuser weights in {self.bundle}")
        return model.to(self.ctx.device)

    def predict(self, model: Any, item: _Item, t: int, eps: Any, checkpoint: bool = False) -> tuple[Any, Any]:
        """(fused eps, plane estimates) on the item's region, at step ``t`` with whole-volume noise ``eps``."""
        from ..diffusion.schedule import FusedSchedule
        from ..fusion.score_fusion import MAIN_GROUP, PlaneGroup, ScoreFusionModel
        from ..fusion.slice_scorer import SliceScorer, VolumeConditioning

        schedule = FusedSchedule()
        abar = schedule.abar(t)
        r_t = schedule.q_sample(item.r0, t, eps)
        cond = VolumeConditioning(item.conditions, item.coords, item.mask)
        scorers = {p: SliceScorer(m, p, self.manifest.neighbors, self.options.slice_batch)
                   for p, m in self.planes.items()}
        sfm = ScoreFusionModel(model, [PlaneGroup(MAIN_GROUP, scorers, cond)], cond, None, self.autocast)
        estimates, aligned = sfm.estimates(r_t, abar)
        region = item.region
        feats = None
        if aligned is not None:
            feats = {f: a[(slice(None), slice(None), *(slice(r.start // f, r.stop // f) for r in region))]
                     for f, a in aligned.items()}
        with self.autocast():
            head = model.net(sfm.fuser_input(r_t, estimates, region), t, feats, checkpoint=checkpoint)
        cropped = estimates[(slice(None), slice(None), *region)]
        return sfm.fuse(head.float(), cropped), cropped

    # -- validation --------------------------------------------------------------------
    def validation_items(self) -> list[tuple[str, _Item]]:
        """The whole held-out volumes (the fuser is judged on what it will see at inference)."""
        return [(case.case_id, _item(case, (0, 0, 0), case.shape, self.ctx.device)) for case in self.data.val]

    def validate(self, model: Any, items: list[tuple[str, _Item]]) -> dict:
        """Held-out ε errors of the fused estimate and of the plain plane average, at fixed draws."""
        import torch

        ts = [int(round(v)) for v in np.linspace(0, 999, self.options.val_draws)]
        fused_mse, avg_mse, visible_fused, visible_avg, losses, log_ratios = [], [], [], [], [], []
        model.eval()
        with torch.no_grad():
            for case_index, (_, item) in enumerate(items):
                for k, t in enumerate(ts):
                    _, eps = self._draw(case_index * 1000 + k, tuple(item.r0.shape), "val")
                    eps = eps.to(item.r0.device)
                    fused, estimates = self.predict(model, item, t, eps)  # the region is the whole volume
                    f_mse = float((fused - eps).square().mean())
                    a_mse = float((estimates.mean(dim=1)[0] - eps).square().mean())
                    fused_mse.append(f_mse)
                    avg_mse.append(a_mse)
                    losses.append(float(fuser_loss(fused, eps, self.options.l1_weight, self.options.mse_weight)))
                    if t < 468:  # abar > 4.4e-5: the residual is visible at all
                        visible_fused.append(f_mse)
                        visible_avg.append(a_mse)
                        log_ratios.append(math.log(f_mse / a_mse))

        def mean(v: list[float]) -> float | None:
            return float(np.mean(v)) if v else None

        return {"val_loss": mean(losses), "val_eps_mse": mean(fused_mse), "val_eps_mse_average": mean(avg_mse),
                "val_eps_mse_visible": mean(visible_fused), "val_eps_mse_average_visible": mean(visible_avg),
                "val_eps_mse_ratio": math.exp(mean(log_ratios)) if log_ratios else None,
                "val_steps_t": ts, "val_cases": [c for c, _ in items]}

    # -- training ----------------------------------------------------------------------
    def signature(self) -> dict:
        o = self.options
        return {"phase": o.phase, "config": self.config.to_dict(), "plane_sha256": self.plane_sha256,
                "plane_weights": o.plane_weights, "batch_size": int(o.batch_size),
                "crop": list(self.crop), "lr": float(o.lr),
                "loss": [float(o.l1_weight), float(o.mse_weight), o.loss_weighting],
                "ema": [float(o.ema_decay), int(o.ema_every), int(o.ema_start)], "grad_clip": float(o.grad_clip),
                "seed": int(o.seed), "train_case_ids": self.data.train_ids}

    def train(self) -> dict:
        import torch
        from tqdm import tqdm

        opt, ctx = self.options, self.ctx
        model = self.build()
        ema = EMA(model, opt.ema_decay, warmup=False)
        optimizer = torch.optim.Adam(model.parameters(), lr=opt.lr, weight_decay=0.0)
        scaler = torch.amp.GradScaler("cuda") if self.amp == "fp16" else None
        name = _state_name(opt.phase)
        signature = self.signature()
        start, wall_before, history = 0, 0.0, []
        if opt.resume and has_training_state(self.bundle, name):
            st = load_training_state(self.bundle, name)
            compare_signatures(st["info"].get("signature", {}), signature, f"the phase-{opt.phase} fuser run",
                               FUSER_SIGNATURE_FIELDS)
            load_state_into(model, st["raw"], "fuser checkpoint (raw)")
            load_state_into(ema.module, st["ema"], "fuser checkpoint (EMA)")
            ema.load_state(st["info"]["ema"])
            optimizer.load_state_dict(st["optimizer"])
            if scaler is not None and st["info"].get("scaler"):
                scaler.load_state_dict(st["info"]["scaler"])
            start = int(st["info"]["step"])
            wall_before = float(st["info"].get("wall_time_s", 0.0))
            history = list(st["info"].get("val_history", []))
            logger.info("fuser (%s): resuming from the checkpoint at step %d", opt.phase, start)
        val_items = self.validation_items() if ctx.is_main else []
        B = int(opt.batch_size)
        lo, hi = shard_range(B, ctx.rank, ctx.world_size)
        stop = opt.steps if opt.stop_after is None else min(opt.steps, start + int(opt.stop_after))
        last_val = history[-1] if history else None

        def validate(step: int) -> None:
            nonlocal last_val
            if not val_items:
                return
            last_val = {"step": step, **self.validate(ema.module, val_items)}
            history.append(last_val)
            if self.callback is not None:
                self.callback({"event": "validation", **last_val})

        def checkpoint(step: int, elapsed: float) -> None:
            if not ctx.is_main:
                return
            save_training_state(self.bundle, name, raw=model.state_dict(), ema=ema.state_dict(),
                                optimizer=optimizer.state_dict(),
                                info={"step": step, "signature": signature, "ema": ema.state(),
                                      "scaler": scaler.state_dict() if scaler is not None else None,
                                      "val_history": history, "wall_time_s": wall_before + elapsed,
                                      "saved_at": utc_now(), "world_size": ctx.world_size})

        bar = tqdm(total=opt.steps, initial=start, desc=f"fuser ({opt.phase})", file=sys.stderr,
                   dynamic_ncols=True, disable=opt.quiet or not ctx.is_main, mininterval=0.5)
        t0 = time.perf_counter()
        step = start
        while step < stop:
            model.train()
            optimizer.zero_grad(set_to_none=True)
            total = torch.zeros((), device=ctx.device)
            for index in range(step * B + lo, step * B + hi):
                case = self._case_for(index)
                item = _item(case, self._start_for(case, index), self.crop, ctx.device)
                t, eps = self._draw(index, tuple(item.r0.shape), "noise")
                eps = eps.to(ctx.device)
                fused, _ = self.predict(model, item, t, eps, checkpoint=opt.gradient_checkpointing)
                weight = loss_weight(t, opt.loss_weighting) / B
                loss = fuser_loss(fused, eps[(slice(None), *item.region)], opt.l1_weight, opt.mse_weight) * weight
                (scaler.scale(loss) if scaler is not None else loss).backward()
                total += loss.detach()
            if ctx.distributed:  # sum of per-item gradients / B over every process
                for p in model.parameters():
                    if p.grad is not None:
                        all_reduce_mean(p.grad, ctx).mul_(ctx.world_size)
            stepped = optimizer_step(optimizer, model.parameters(), scaler, opt.grad_clip)
            step += 1
            if step <= opt.ema_start:
                ema.module.load_state_dict(model.state_dict())  # before ema_start the EMA is a plain copy
            elif stepped and step % opt.ema_every == 0:
                ema.update(model)
            loss_value = float(all_reduce_mean(total.clone(), ctx).item()) * ctx.world_size
            if not math.isfinite(loss_value):
                raise TrainingError(f"fuser: the training loss became {loss_value} at step {step}; lower --lr")
            if self.callback is not None and ctx.is_main:
                self.callback({"event": "step", "step": step, "loss": loss_value})
            if ctx.is_main and opt.val_every and step % opt.val_every == 0:
                validate(step)
            bar.update(1)
            bar.set_postfix_str(f"loss={loss_value:.4f}" + (
                f" val_mse={last_val['val_eps_mse']:.4f} avg={last_val['val_eps_mse_average']:.4f}"
                if last_val else ""), refresh=False)
            if opt.checkpoint_every and step % opt.checkpoint_every == 0 and step < stop:
                checkpoint(step, time.perf_counter() - t0)
        bar.close()
        elapsed = time.perf_counter() - t0
        finished = step >= opt.steps
        if not finished:
            checkpoint(step, elapsed)
        elif ctx.is_main and (last_val is None or last_val.get("step") != step):
            validate(step)
        return {"model": model, "ema": ema, "step": step, "finished": finished, "history": history,
                "last_val": last_val, "wall_time_s": wall_before + elapsed, "signature": signature}


def _write_fuser(session: _FuserSession, outcome: dict) -> dict:
    """Store the weights of the finished phase and point the manifest's fuser entry at them."""
    opt = session.options
    file = fuser_file_name(opt.phase)
    meta = {"format": "scorefusion-fuser", "phase": opt.phase, "steps": outcome["step"]}
    sha = save_weights(session.bundle / file, {"raw": outcome["model"].state_dict(),
                                               "ema": outcome["ema"].state_dict()}, meta)
    last = {k: v for k, v in (outcome["last_val"] or {}).items() if k != "step"}
    phase_entry = {
        "config": session.config.to_dict(), "file": file, "sha256": sha, "steps": outcome["step"],
        "metrics": {**last, "history": outcome["history"], "wall_time_s": outcome["wall_time_s"],
                    "validation": "eps MSE of the fused estimate (val_eps_mse) and of the plain average of the "
                                  "planes (val_eps_mse_average) on the held-out cases at fixed t and noise; "
                                  "*_visible: only t < 468, where abar > 4.4e-5"},
        "training": {"options": {k: v for k, v in opt.to_dict().items() if k not in ("quiet",)},
                     "world_size": session.ctx.world_size, "amp": session.amp, "device": session.ctx.device,
                     "crop_dhw": list(session.crop), "train_case_ids": session.data.train_ids,
                     "val_case_ids": session.data.val_ids, "finished_at": utc_now(),
                     "loss": f"{opt.l1_weight} * mean|eps_hat - eps| + {opt.mse_weight} * mean (eps_hat - eps)^2, "
                             f"weighted per item: {opt.loss_weighting}",
                     "optimizer": {"type": "Adam", "lr": opt.lr, "weight_decay": 0.0},
                     "ema": {"decay": opt.ema_decay, "every": opt.ema_every, "copy_before_step": opt.ema_start}},
    }
    manifest = read_manifest(session.bundle)
    phases = dict((manifest.fuser or {}).get("phases", {}))
    if opt.phase == "crops":
        phases.pop("full", None)  # a new phase A makes any phase B built on the old one stale
    phases[opt.phase] = phase_entry
    manifest.fuser = {**phase_entry, "phase": opt.phase, "plane_weights": opt.plane_weights,
                      "plane_sha256": session.plane_sha256, "phases": phases}
    write_manifest(session.bundle, manifest)
    return manifest.fuser


def _check_bundle(options: FuserTrainingOptions, manifest: Any) -> None:
    if len(manifest.planes) < 2:
        raise BundleError(f"bundle {options.bundle} has {len(manifest.planes)} plane model(s); fusion needs at least 2")
    current = manifest.fuser or {}
    phases = current.get("phases", {})
    if options.phase in phases and not (options.overwrite or options.resume):
        raise InputError(
            f"bundle {options.bundle} already has a phase-{options.phase} fuser; pass --overwrite to train a new one"
        )
    if options.resume and options.phase in phases and not has_training_state(options.bundle,
                                                                               _state_name(options.phase)):
        # without a checkpoint --resume would retrain from step 0 and replace the finished fuser
        raise ResumeError(
            f"nothing to resume: the phase-{options.phase} fuser of {options.bundle} is finished and has no "
            "checkpoint; pass --overwrite to train a new one"
        )
    if (manifest.training or {}).get("status") not in (None, "complete"):
        raise BundleError(f"the plane training of {options.bundle} is not complete; finish it (--resume) first")


def train_fuser(options: FuserTrainingOptions, callback: Callback | None = None) -> Path:
    """Train one phase of the fuser into ``options.bundle``; returns the bundle folder.

    Everything that can fail without writing (options, bundle, data, grid, a resumed run's
    signature) is checked first. ``callback(event)`` (rank 0) receives ``step`` and
    ``validation`` events.
    """
    import torch

    options.validate()
    options.bundle = str(Path(options.bundle).expanduser().resolve())
    manifest = read_manifest(options.bundle)
    _check_bundle(options, manifest)
    spec = TaskSpec.from_dict(manifest.task)
    plan = plan_context(options.device)
    shard_range(int(options.batch_size), 0, plan.world_size)
    amp = resolve_amp(options.amp, plan.device)
    grid = manifest.grid.get("shape_ijk")
    val_fraction = float(((manifest.training or {}).get("split") or {}).get("val_fraction", 0.2))

    def check_grid(shape: tuple[int, int, int], what: str) -> None:
        if grid is not None and list(shape) != list(grid):
            raise GeometryError(f"{what} {shape} differs from the plane models' grid {tuple(grid)}")

    data = load_task_cases(options.data, spec, val_fraction=val_fraction, grid_ijk=grid, cache=options.cache,
                           check_grid=check_grid)
    planes_train = (manifest.training or {}).get("train_case_ids")
    if planes_train is not None and sorted(planes_train) != sorted(data.train_ids):
        raise InputError(
            "the training cases differ from those the plane models were trained on; the fuser must see the same "
            "split (use the planes' --data)"
        )
    old_threads = torch.get_num_threads()
    if options.threads:
        torch.set_num_threads(int(options.threads))
    ctx = init_distributed(options.device)
    devices = [torch.device(ctx.device).index or 0] if ctx.device.startswith("cuda") else []
    try:
        with torch.random.fork_rng(devices=devices):
            session = _FuserSession(options, spec, manifest, data, ctx, amp, callback)
            outcome = session.train()
            if outcome["finished"] and ctx.is_main:
                entry = _write_fuser(session, outcome)
                remove_training_state(session.bundle, _state_name(options.phase))
                logger.info("%s", format_fuser_summary(entry, Path(options.bundle)))
            barrier(ctx)
            return Path(options.bundle)
    finally:
        shutdown(ctx)
        if options.threads:
            torch.set_num_threads(old_threads)


def format_fuser_summary(entry: dict, bundle: Path) -> str:
    """One-paragraph summary of the fuser entry of a manifest."""
    m = entry.get("metrics", {})

    def f(key: str) -> str:
        v = m.get(key)
        return "n/a" if v is None else f"{v:.5f}"

    return (f"fuser phase {entry.get('phase')}: {entry.get('steps')} steps in {m.get('wall_time_s', 0.0):.1f} s; "
            f"held-out eps MSE fused {f('val_eps_mse')} vs plane average {f('val_eps_mse_average')} "
            f"(t < 468: {f('val_eps_mse_visible')} vs {f('val_eps_mse_average_visible')}; geometric-mean ratio "
            f"{f('val_eps_mse_ratio')})\nbundle: {bundle}")
