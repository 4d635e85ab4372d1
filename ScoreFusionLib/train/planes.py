"""Training the plane models: one 2D conditional ε-model per slicing direction (method.md 2.4, 5.1).

Per step and plane: take the step's global batch of training slices (every slice of every
training case, background included), draw ``gamma`` with :class:`PlaneTrainingSchedule`
(2000-step linear 1e-6..0.01, gamma uniform between consecutive cumulative products) and
noise ``eps``; form ``r_gamma = sqrt(gamma) r0 + sqrt(1 - gamma) eps`` in float32; predict
``eps_hat = f(conditions, coords, mask, r_gamma; gamma)`` (input layout of 3.2); minimise
``mean (eps_hat - eps)^2`` with Adam (no weight decay), clip the gradient norm, then update
the EMA (every step; see :mod:`.ema`).

Determinism (pitfall 6). Nothing random carries state across steps: the data order is a
permutation per (seed, plane, epoch), consumed as one endless stream, so step ``s`` always
trains on positions ``s B .. s B + B - 1``; gamma and noise for the whole global batch come
from a generator seeded by (seed, plane, step); dropout uses the global generator reseeded
by (seed, plane, step, rank); the network's initialisation by (seed, plane). So a run resumed
from a checkpoint continues bit for bit (on CPU) like an uninterrupted one, and N DDP
processes train on exactly the samples and draws of one process with the same global batch.
The caller's global RNG state is restored afterwards.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import platform
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..bundle import PlaneEntry, load_state_into, plane_file_name, save_weights, write_manifest
from ..data.slices import PlaneSliceDataset, concat_plane_input, slice_shape
from ..data.task import TaskSpec
from ..errors import InputError, ScoreFusionError
from .cases import TrainingData, load_training_data
from .distributed import (
    DistContext,
    all_reduce_mean,
    barrier,
    init_distributed,
    plan_context,
    shard_range,
    shutdown,
    wrap_model,
)
from .ema import EMA
from .options import PlaneTrainingOptions
from .outputs import (
    build_manifest,
    check_output_dir,
    clear_bundle,
    compare_signatures,
    finished_planes,
    run_signature,
    utc_now,
)
from .seeding import derive_seed, numpy_generator, torch_generator
from .state import has_training_state, load_training_state, remove_training_state, save_training_state
from .validation import build_validation_set, evaluate

logger = logging.getLogger(__name__)

#: Smoothing of the displayed training loss (bias-corrected exponential average).
LOSS_SMOOTHING = 0.98

Callback = Callable[[dict], None]


class TrainingError(ScoreFusionError):
    """Training cannot continue (e.g. the loss became NaN or infinite)."""


class StepBatchSampler:
    """This rank's dataset indices for steps ``start .. stop - 1`` (a DataLoader batch sampler).

    The global index stream is the concatenation of permutations of ``0 .. n - 1``, one per
    epoch, each drawn from a generator seeded by (seed, plane, epoch); step ``s`` takes stream
    positions ``[s B, (s + 1) B)`` and this rank the contiguous share ``shard_range(B, rank, W)``
    of them. Batches may straddle epochs. The sampler has no state, so starting at a later step
    is all a resumed run needs.
    """

    def __init__(self, n_items: int, global_batch: int, rank: int, world_size: int, seed: int,
                 plane: str, start: int, stop: int) -> None:
        if n_items < 1:
            raise InputError("no training slices")
        self.n = int(n_items)
        self.batch = int(global_batch)
        self.lo, self.hi = shard_range(self.batch, rank, world_size)
        self.seed, self.plane = int(seed), plane
        self.start, self.stop = int(start), int(stop)
        self._perms: dict[int, Any] = {}

    def _perm(self, epoch: int) -> Any:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = numpy_generator(self.seed, self.plane, "data", epoch).permutation(self.n)
        return self._perms[epoch]

    def global_indices(self, step: int) -> list[int]:
        """Dataset indices of the whole global batch of ``step``."""
        first = int(step) * self.batch
        return [int(self._perm(p // self.n)[p % self.n]) for p in range(first, first + self.batch)]

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            yield self.global_indices(step)[self.lo : self.hi]

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)


@dataclass
class PlaneOutcome:
    """What training one plane in this invocation did."""

    plane: str
    step: int
    steps_run: int
    finished: bool
    metrics: dict = field(default_factory=dict)
    raw: dict | None = None
    ema: dict | None = None
    wall_time_s: float = 0.0


def resolve_amp(mode: str, device: str) -> str:
    """``auto``/``none``/``bf16``/``fp16`` -> the autocast mode used (``none`` on CPU)."""
    if not device.startswith("cuda"):
        if mode in ("bf16", "fp16"):
            raise InputError(f"--amp {mode} needs a CUDA device (autocast runs on CUDA only); use --amp none "
                             "on CPU")
        return "none"
    if mode == "auto":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "none"
    return mode


def autocast_factory(amp: str, device: str) -> Callable[[], Any]:
    if amp == "none":
        return contextlib.nullcontext
    import torch

    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return lambda: torch.autocast(device_type="cuda", dtype=dtype)


def optimizer_step(optimizer: Any, parameters: Any, scaler: Any, grad_clip: float) -> bool:
    """Unscale (fp16), clip the gradient norm (``grad_clip`` > 0) and step; False if the scaler skipped it.

    The gradient scaler skips steps whose gradients overflowed and lowers its scale when it does;
    callers update their EMA only after real steps.
    """
    import torch

    if scaler is not None:
        scaler.unscale_(optimizer)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(list(parameters), grad_clip)
    if scaler is None:
        optimizer.step()
        return True
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return scaler.get_scale() >= scale


def _emit(callback: Callback | None, ctx: DistContext, event: dict) -> None:
    if callback is not None and ctx.is_main:
        callback(event)


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


class _Session:
    """Shared state of one :func:`train_planes` invocation (kept out of the public API)."""

    def __init__(self, options: PlaneTrainingOptions, spec: TaskSpec, data: TrainingData, ctx: DistContext,
                 amp: str, out: Path, signature: dict, callback: Callback | None) -> None:
        from ..diffusion.schedule import PlaneTrainingSchedule

        self.options, self.spec, self.data, self.ctx = options, spec, data, ctx
        self.amp, self.out, self.signature, self.callback = amp, out, signature, callback
        self.config = options.plane_config()
        self.schedule = PlaneTrainingSchedule()
        self.autocast = autocast_factory(amp, ctx.device)

    # -- one plane ---------------------------------------------------------------------
    def build_model(self, plane: str) -> Any:
        import torch

        from ..nets.unet2d import UNet2D, kaiming_reinit_

        torch.manual_seed(derive_seed(self.options.seed, plane, "init"))
        model = UNet2D(self.config)
        if self.options.kaiming_init:
            kaiming_reinit_(model, generator=torch_generator(self.options.seed, plane, "kaiming"))
        return model.to(self.ctx.device)

    def train_plane(self, plane: str, budget: int | None) -> PlaneOutcome:
        import torch
        import torch.nn.functional as F
        from torch.utils.data import DataLoader
        from tqdm import tqdm

        opt, ctx = self.options, self.ctx
        device = torch.device(ctx.device)
        model = self.build_model(plane)
        ema = EMA(model, opt.ema_decay, opt.ema_warmup)
        optimizer = torch.optim.Adam(model.parameters(), lr=opt.lr, weight_decay=0.0)
        scaler = torch.amp.GradScaler("cuda") if self.amp == "fp16" else None
        start, wall_before = 0, 0.0
        loss_avg = {"avg": 0.0, "count": 0}
        history: list[dict] = []
        last_val: dict | None = None
        if opt.resume and has_training_state(self.out, plane):
            st = load_training_state(self.out, plane)
            info = st["info"]
            compare_signatures(info.get("signature", {}), self.signature, f"the {plane} checkpoint")
            load_state_into(model, st["raw"], f"{plane} checkpoint (raw)")
            load_state_into(ema.module, st["ema"], f"{plane} checkpoint (EMA)")
            ema.load_state(info["ema"])
            optimizer.load_state_dict(st["optimizer"])
            if scaler is not None and info.get("scaler"):
                scaler.load_state_dict(info["scaler"])
            start = int(info["step"])
            wall_before = float(info.get("wall_time_s", 0.0))
            loss_avg = dict(info.get("loss_smoothing", loss_avg))
            history = list(info.get("val_history", []))
            last_val = info.get("last_val")
            logger.info("%s: resuming from the checkpoint at step %d", plane, start)
        net = wrap_model(model, ctx)
        model.train()

        B = int(opt.batch_size)
        lo, hi = shard_range(B, ctx.rank, ctx.world_size)
        rows, cols = slice_shape(self.data.train[0].shape, plane)
        target_steps = int(opt.steps)
        stop = target_steps if budget is None else min(target_steps, start + int(budget))
        dataset = PlaneSliceDataset(self.data.train, plane, opt.neighbors)
        sampler = StepBatchSampler(len(dataset), B, ctx.rank, ctx.world_size, opt.seed, plane, start, stop)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=opt.num_workers,
                            pin_memory=device.type == "cuda")
        vset = None
        if ctx.is_main:
            vset = build_validation_set(self.data.val, plane, opt.neighbors, opt.val_slices, opt.seed,
                                        self.schedule, opt.val_psnr_gamma)

        def validate(step: int) -> None:
            nonlocal last_val
            if vset is None:
                return
            metrics = evaluate(ema.module, vset, self.schedule, device, self.autocast)
            last_val = {"step": step, **metrics}
            history.append(last_val)
            _emit(self.callback, ctx, {"event": "validation", "plane": plane, **last_val})

        def smoothed() -> float | None:
            n = loss_avg["count"]
            return None if n == 0 else loss_avg["avg"] / (1.0 - LOSS_SMOOTHING**n)

        def checkpoint(step: int, elapsed: float) -> None:
            if not ctx.is_main:
                return
            save_training_state(
                self.out, plane, raw=model.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(),
                info={"step": step, "signature": self.signature, "ema": ema.state(),
                      "scaler": scaler.state_dict() if scaler is not None else None,
                      "loss_smoothing": loss_avg, "val_history": history, "last_val": last_val,
                      "wall_time_s": wall_before + elapsed, "saved_at": utc_now(),
                      "world_size": ctx.world_size, "device": ctx.device, "amp": self.amp},
            )
            _emit(self.callback, ctx, {"event": "checkpoint", "plane": plane, "step": step})

        bar = tqdm(total=target_steps, initial=start, desc=f"{plane:>8}", file=sys.stderr, dynamic_ncols=True,
                   disable=opt.quiet or not ctx.is_main, mininterval=0.5, leave=True)
        t0 = time.perf_counter()
        step = start
        for batch in loader:
            g = torch_generator(opt.seed, plane, "noise", step)
            gamma_all = self.schedule.sample_gamma(B, generator=g)
            noise_all = torch.randn((B, 1, rows, cols), generator=g, dtype=torch.float32)
            gamma = gamma_all[lo:hi].to(device)
            eps = noise_all[lo:hi].to(device)
            r0 = batch["r0"].to(device, non_blocking=True)
            noisy = self.schedule.q_sample(r0, gamma, eps)
            x = concat_plane_input(batch["cond"].to(device, non_blocking=True),
                                   batch["coords"].to(device, non_blocking=True),
                                   batch["mask"].to(device, non_blocking=True), noisy)
            torch.manual_seed(derive_seed(opt.seed, plane, "dropout", step, ctx.rank))
            optimizer.zero_grad(set_to_none=True)
            with self.autocast():
                eps_hat = net(x, gamma)
            loss = F.mse_loss(eps_hat.float(), eps)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            if optimizer_step(optimizer, model.parameters(), scaler, opt.grad_clip):
                ema.update(model)
            step += 1

            loss_value = float(all_reduce_mean(loss.detach().clone(), ctx).item())
            if not math.isfinite(loss_value):
                raise TrainingError(
                    f"{plane}: the training loss became {loss_value} at step {step}; lower --lr, or use "
                    "--amp bf16/none instead of fp16"
                )
            loss_avg["avg"] = LOSS_SMOOTHING * loss_avg["avg"] + (1.0 - LOSS_SMOOTHING) * loss_value
            loss_avg["count"] += 1
            _emit(self.callback, ctx, {"event": "step", "plane": plane, "step": step, "loss": loss_value,
                                      "loss_smoothed": smoothed()})
            if ctx.is_main and ((opt.val_every and step % opt.val_every == 0) or step == target_steps):
                validate(step)
            bar.update(1)
            bar.set_postfix_str(f"loss={_fmt(smoothed(), '.4f')} "
                                f"val_psnr={_fmt(last_val and last_val.get('val_psnr'), '.2f')}", refresh=False)
            if opt.checkpoint_every and step % opt.checkpoint_every == 0 and step < stop:
                checkpoint(step, time.perf_counter() - t0)
        bar.close()
        elapsed = time.perf_counter() - t0
        finished = step >= target_steps
        if not finished:
            checkpoint(step, elapsed)
        elif ctx.is_main and (last_val is None or last_val.get("step") != step):
            validate(step)
        metrics = {
            **{k: v for k, v in (last_val or {}).items() if k != "step"},
            "train_loss_smoothed": smoothed(),
            "history": history,
            "wall_time_s": wall_before + elapsed,
            "validation": "val_loss: eps MSE at fixed training-distribution gamma draws; val_psnr: one-step "
                          "denoising PSNR of c_ref + 2 clip(r0_hat) at gamma = val_psnr_gamma with fixed noise "
                          "(not a sampling PSNR); val_psnr_reference: c_ref alone; fixed held-out slices",
        }
        return PlaneOutcome(plane, step, step - start, finished, metrics,
                            raw=model.state_dict() if finished else None,
                            ema=ema.state_dict() if finished else None,
                            wall_time_s=wall_before + elapsed)

    # -- bundle bookkeeping ------------------------------------------------------------
    def write_plane(self, outcome: PlaneOutcome) -> PlaneEntry:
        meta = {"format": "scorefusion-plane", "plane": outcome.plane, "steps": outcome.step,
                "config": json.dumps(self.config.to_dict()), "task": json.dumps(self.spec.to_dict())}
        name = plane_file_name(outcome.plane)
        sha = save_weights(self.out / name, {"raw": outcome.raw, "ema": outcome.ema}, meta)
        return PlaneEntry(config=self.config.to_dict(), file=name, sha256=sha, steps=outcome.step,
                          metrics=outcome.metrics)


def _training_record(options: PlaneTrainingOptions, data: TrainingData, ctx: DistContext, amp: str,
                     signature: dict, prior: dict, started: str) -> dict:
    import torch

    from .. import __version__

    return {
        "status": "running",
        "command_line": options.command_line,
        "seed": int(options.seed),
        "steps": int(options.steps),
        "batch_size": int(options.batch_size),
        "batch_size_per_process": int(options.batch_size) // ctx.world_size,
        "world_size": ctx.world_size,
        "lr": float(options.lr),
        "optimizer": {"type": "Adam", "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0},
        "loss": "mean squared error between predicted and true noise, mean over pixels",
        "ema": {"decay": float(options.ema_decay), "warmup": bool(options.ema_warmup),
                "rule": "min(decay, (1+n)/(10+n))" if options.ema_warmup else "decay", "update_every": 1},
        "grad_clip": float(options.grad_clip),
        "amp": amp,
        "device": ctx.device,
        "config_preset": options.config,
        "kaiming_init": bool(options.kaiming_init),
        "data_source": data.source,
        "simulated_data": data.simulated,
        "split": {"mode": "paper", "val_fraction": float(options.val_fraction),
                  "rule": "sorted by case id; first int((1 - val_fraction) n) train, the rest validation"},
        "train_case_ids": data.train_ids,
        "val_case_ids": data.val_ids,
        "val_every": int(options.val_every),
        "val_slices": int(options.val_slices),
        "val_psnr_gamma": float(options.val_psnr_gamma),
        "checkpoint_every": int(options.checkpoint_every),
        "num_workers": int(options.num_workers),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "library_version": __version__,
        "started_at": prior.get("started_at", started),
        "session_started_at": started,
        "resumed": int(prior.get("resumed", -1)) + 1 if prior else 0,
        "wall_time_s": float(prior.get("wall_time_s", 0.0)),
        "resume_signature": signature,
    }


def format_summary(out: Path, entries: dict[str, PlaneEntry], stopped: list[str]) -> str:
    lines = []
    for plane, e in entries.items():
        m = e.metrics
        wall = m.get("wall_time_s") or 0.0
        per = wall / e.steps if e.steps else 0.0
        lines.append(
            f"{plane}: {e.steps} steps in {wall:.1f} s ({per:.3f} s/step), "
            f"loss {_fmt(m.get('train_loss_smoothed'), '.4f')}, "
            f"val loss {_fmt(m.get('val_loss'), '.4f')}, val PSNR {_fmt(m.get('val_psnr'), '.2f')} dB "
            f"(c_ref alone {_fmt(m.get('val_psnr_reference'), '.2f')} dB)"
        )
    if stopped:
        lines.append(f"stopped early; unfinished: {', '.join(stopped)} (continue with --resume)")
    lines.append(f"bundle: {out}")
    return "\n".join(lines)


def train_planes(options: PlaneTrainingOptions, callback: Callback | None = None) -> Path:
    """Train the requested plane models and write (or complete) the bundle; returns its folder.

    Everything that can be checked without writing -- options, the output folder, the
    dataset, the grid, a resumed run's signature -- is checked first, on every rank, so a
    bad call changes nothing. Under ``torchrun`` each rank trains its share of every global
    batch in DistributedDataParallel; only rank 0 writes. ``callback(event)`` (rank 0 only)
    receives dicts with ``event`` = ``step``, ``validation``, ``checkpoint`` or ``plane_done``.
    """
    import torch

    options.validate()
    spec = options.task_spec()
    plan = plan_context(options.device)
    shard_range(int(options.batch_size), 0, plan.world_size)
    amp = resolve_amp(options.amp, plan.device)
    out = Path(options.out).expanduser().resolve()
    check_output_dir(out, options.resume, options.overwrite)
    data = load_training_data(options, spec)
    if not data.train:
        raise InputError("no training case")
    config = options.plane_config()
    signature = run_signature(options, spec.to_dict(), config.to_dict(), data)
    done: dict[str, PlaneEntry] = {}
    prior: dict = {}
    if options.resume:
        manifest, done = finished_planes(out, signature)
        prior = manifest.training

    old_threads = torch.get_num_threads()
    if options.threads:
        torch.set_num_threads(int(options.threads))
    ctx = init_distributed(options.device)
    devices = [torch.device(ctx.device).index or 0] if ctx.device.startswith("cuda") else []
    try:
        with torch.random.fork_rng(devices=devices):
            session = _Session(options, spec, data, ctx, amp, out, signature, callback)
            return _run(session, done, prior)
    finally:
        shutdown(ctx)
        if options.threads:
            torch.set_num_threads(old_threads)


def _run(session: _Session, done: dict[str, PlaneEntry], prior: dict) -> Path:
    opt, ctx, out, data = session.options, session.ctx, session.out, session.data
    t_start = time.perf_counter()
    training = _training_record(opt, data, ctx, session.amp, session.signature, prior, utc_now())
    base_wall = training["wall_time_s"]

    def write(status: str) -> None:
        training["status"] = status
        training["planes_pending"] = [p for p in opt.planes if p not in done]
        training["updated_at"] = utc_now()
        training["wall_time_s"] = base_wall + (time.perf_counter() - t_start)
        manifest = build_manifest(opt, session.spec.to_dict(), data,
                                  {p: done[p] for p in opt.planes if p in done}, training,
                                  session.config.to_dict())
        write_manifest(out, manifest)

    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if opt.overwrite:
            kept = clear_bundle(out)
            if kept:
                logger.warning("--overwrite left %d non-bundle entries in %s untouched: %s", len(kept), out,
                               ", ".join(kept[:5]))
        write("running")
    barrier(ctx)

    budget = opt.stop_after
    unfinished: list[str] = []
    for plane in opt.planes:
        if plane in done:
            logger.info("%s: already trained (%d steps); skipped", plane, done[plane].steps)
            continue
        if budget is not None and budget <= 0:
            unfinished.append(plane)
            continue
        outcome = session.train_plane(plane, budget)
        if budget is not None:
            budget -= outcome.steps_run
        if outcome.finished:
            if ctx.is_main:
                entry = session.write_plane(outcome)
                done[plane] = entry
                write("running")
                remove_training_state(out, plane)
                _emit(session.callback, ctx, {"event": "plane_done", "plane": plane, "steps": outcome.step,
                                              "file": str(out / entry.file), "metrics": entry.metrics})
        else:
            unfinished.append(plane)
        barrier(ctx)
    if ctx.is_main:
        write("complete" if not unfinished else "stopped")
        logger.info("%s", format_summary(out, {p: done[p] for p in opt.planes if p in done}, unfinished))
    barrier(ctx)
    return out
