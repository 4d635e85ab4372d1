"""Training a SegResNet tumour segmenter on BraTS-style or simulated cases into a segmenter bundle.

Cases are split like every other trainer (sorted by id; the last ``val_fraction`` are held
out), reoriented to RAS and optionally cropped or padded to a common grid, and normalised per
channel over their nonzero voxels exactly as inference does. Each step draws ``batch_size``
random crops (half of them, by default, centred on a tumour voxel, the rest anywhere in the
head), with random left-right flips and per-channel intensity scale and shift; the loss is soft
Dice plus binary cross-entropy on the three nested regions (TC, WT, ET), optimised with Adam;
an EMA of the weights is kept and is what the bundle's inference uses. Held-out Dice (WT, TC,
ET) is measured with the full sliding-window inference and recorded in the manifest.

Every draw depends only on (seed, step, item), and ``torchrun`` processes each take an equal
contiguous share of the step's items with DDP averaging their gradients, so N processes train
on the same crops as one process with the same global batch (group norm: no batch statistics).
"""

from __future__ import annotations

import logging
import math
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import __version__
from ..errors import DatasetError, InputError
from .network import PRESETS, REGION_CHANNELS, SegmenterNetwork
from .regions import labels_to_regions

logger = logging.getLogger("ScoreFusionLib.train.segmenter")

#: Relative tolerance on voxel sizes across training cases.
SPACING_RTOL = 1e-3
LOSS_SMOOTHING = 0.98


@dataclass
class SegmenterTrainingOptions:
    """What to train on, the network, the optimisation and the run (see the module docstring)."""

    data: str | Path
    out: str | Path
    channels: Sequence[str] | str = ("t1n", "t1c", "t2w", "t2f")
    preset: str = "tiny"
    grid: Sequence[int] | None = None
    crop_size: int = 64
    tumour_fraction: float = 0.5
    steps: int = 2000
    batch_size: int = 2
    lr: float = 1e-3
    weight_decay: float = 1e-5
    ema_decay: float = 0.99
    val_fraction: float = 0.2
    val_every: int = 0
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    overwrite: bool = False
    quiet: bool = False
    card: str | Path | None = None
    model: dict = field(default_factory=dict)
    command_line: str = ""

    def validate(self) -> SegmenterTrainingOptions:
        from ..data.records import canonical_contrast
        from ..train.options import split_list

        self.channels = tuple(canonical_contrast(c) for c in split_list(self.channels))
        if not self.channels or len(set(self.channels)) != len(self.channels):
            raise InputError(f"channels must name different contrasts, got {list(self.channels)}")
        if self.preset not in PRESETS:
            raise InputError(f"unknown segmenter preset {self.preset!r}; use one of {', '.join(PRESETS)}")
        divisor = SegmenterNetwork.preset(self.preset).divisor
        checks = [
            (self.crop_size >= divisor and self.crop_size % divisor == 0,
             f"crop size {self.crop_size} must be a positive multiple of {divisor} (the network's divisor)"),
            (0.0 <= self.tumour_fraction <= 1.0, f"tumour fraction must lie in [0, 1], got {self.tumour_fraction}"),
            (self.steps >= 1, f"steps must be positive, got {self.steps}"),
            (self.batch_size >= 1, f"batch size must be positive, got {self.batch_size}"),
            (self.lr > 0 and self.weight_decay >= 0, "the learning rate must be positive, weight decay >= 0"),
            (0.0 <= self.ema_decay < 1.0, f"EMA decay must lie in [0, 1), got {self.ema_decay}"),
            (0.0 < self.val_fraction < 1.0, f"val fraction must lie in (0, 1), got {self.val_fraction}"),
            (self.val_every >= 0, f"val every must be >= 0, got {self.val_every}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)
        if self.grid is not None:
            self.grid = tuple(int(n) for n in self.grid)
        return self


@dataclass
class _Case:
    case_id: str
    image: np.ndarray  # (C, k, j, i) float32, normalised
    regions: np.ndarray  # (3, k, j, i) float32 in {0, 1}
    labels: np.ndarray  # (k, j, i) integer labels in the case's convention
    convention: str
    tumour: np.ndarray  # (n, 3) voxel indices of the whole tumour
    head: np.ndarray  # (m, 3) voxel indices of nonzero input
    spacing: np.ndarray


def _load(record: Any, options: SegmenterTrainingOptions) -> _Case:
    from ..data.loading import load_case
    from .preprocess import normalize_nonzero

    loaded = load_case(record, options.channels, grid_shape_ijk=options.grid, seg=True, reorient=True)
    stack = np.stack([loaded.volumes[c].array.astype(np.float32) for c in options.channels])
    labels = np.asarray(loaded.seg.array)
    regions = labels_to_regions(labels, loaded.label_convention).astype(np.float32)
    head = np.argwhere(np.any(stack != 0, axis=0))
    return _Case(record.case_id, normalize_nonzero(stack), regions, labels, loaded.label_convention,
                 np.argwhere(regions[REGION_CHANNELS.index("WT")] > 0), head if len(head) else
                 np.argwhere(np.ones(labels.shape, bool)), loaded.volumes[options.channels[0]].spacing)


def load_split(options: SegmenterTrainingOptions) -> tuple[list[_Case], list[_Case]]:
    """Training and held-out cases, loaded and normalised (the split rule of every trainer)."""
    from ..data.sources import load_cases
    from ..data.split import split_cases

    records = load_cases(options.data)
    unlabelled = [r.case_id for r in records if not r.has_seg]
    if unlabelled:
        raise DatasetError(f"{len(unlabelled)} case(s) have no segmentation ({', '.join(unlabelled[:3])}); a "
                           "segmenter trains on labelled cases only")
    split = split_cases(records, mode="paper", train_fraction=1.0 - float(options.val_fraction))
    if not split.train or not split.test:
        raise DatasetError(f"{len(records)} case(s) in {options.data} leave no training or no held-out case with "
                           f"val fraction {options.val_fraction}")
    train = [_load(r, options) for r in split.train]
    val = [_load(r, options) for r in split.test]
    spacing = train[0].spacing
    for case in train + val:
        if not np.allclose(case.spacing, spacing, rtol=SPACING_RTOL):
            raise DatasetError(f"case {case.case_id} has voxels of {case.spacing.round(4).tolist()} mm but "
                               f"{train[0].case_id} has {spacing.round(4).tolist()} mm; resample the data set to "
                               "one voxel size first")
    if not any(len(c.tumour) for c in train):
        raise DatasetError("no training case contains tumour labels")
    return train, val


def draw_crop(case: _Case, size: int, tumour_fraction: float, rng: np.random.Generator
              ) -> tuple[np.ndarray, np.ndarray]:
    """One augmented ``(C, s, s, s)`` image crop and its ``(3, s, s, s)`` region target."""
    pool = case.tumour if len(case.tumour) and rng.random() < tumour_fraction else case.head
    centre = pool[rng.integers(len(pool))]
    shape = np.array(case.image.shape[1:])
    start = np.clip(centre - size // 2, 0, np.maximum(shape - size, 0))
    window = tuple(slice(int(s), int(s) + size) for s in start)
    image = case.image[(slice(None), *window)]
    target = case.regions[(slice(None), *window)]
    pad = [(0, 0)] + [(0, size - n) for n in image.shape[1:]]
    image, target = np.pad(image, pad), np.pad(target, pad)
    if rng.random() < 0.5:  # left-right flip (array axis 2 is i, the left-right axis after RAS)
        image, target = image[..., ::-1], target[..., ::-1]
    scale = rng.uniform(0.9, 1.1, size=(image.shape[0], 1, 1, 1)).astype(np.float32)
    shift = rng.uniform(-0.1, 0.1, size=(image.shape[0], 1, 1, 1)).astype(np.float32)
    image = np.where(image != 0, image * scale + shift, 0.0).astype(np.float32)
    return np.ascontiguousarray(image), np.ascontiguousarray(target)


def step_batch(cases: Sequence[_Case], options: SegmenterTrainingOptions, step: int, lo: int, hi: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Items ``lo .. hi - 1`` of step ``step``'s global batch (each from its own seeded generator)."""
    from ..train.seeding import numpy_generator

    images, targets = [], []
    for item in range(lo, hi):
        rng = numpy_generator(int(options.seed), "segmenter", int(step), item)
        case = cases[int(rng.integers(len(cases)))]
        image, target = draw_crop(case, int(options.crop_size), float(options.tumour_fraction), rng)
        images.append(image)
        targets.append(target)
    return np.stack(images), np.stack(targets)


def held_out_dice(network: Any, cases: Sequence[_Case], manifest: Any, device: str) -> dict:
    """Mean Dice per region of the full sliding-window inference on the held-out cases."""
    from ..metrics import region_dice
    from .inference import predict_probabilities
    from .model_bundle import LoadedSegmenter
    from .regions import regions_to_labels

    was_training = network.training
    network.eval()
    segmenter = LoadedSegmenter(manifest, network, Path("."), device)
    per_case = []
    for case in cases:
        # The stack is already normalised; normalising again is the identity up to rounding.
        probs = predict_probabilities(segmenter, case.image, case.spacing)
        labels = regions_to_labels(probs >= manifest.threshold, case.convention)
        per_case.append(region_dice(labels, case.labels.astype(labels.dtype), case.convention))
    network.train(was_training)
    return {region: float(np.mean([d[region] for d in per_case])) for region in ("WT", "TC", "ET")}


def _loss_function() -> Callable[[Any, Any], Any]:
    import torch
    from monai.losses import DiceLoss

    dice = DiceLoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5)
    bce = torch.nn.BCEWithLogitsLoss()
    return lambda logits, target: dice(logits, target) + bce(logits, target)


def train_segmenter(options: SegmenterTrainingOptions, callback: Callable[[dict], None] | None = None) -> Path:
    """Train and write the segmenter bundle to ``options.out``; returns its path (see the module docstring)."""
    import torch

    from ..train.distributed import all_reduce_mean, init_distributed, shard_range, shutdown, unwrap_model, wrap_model
    from ..train.ema import EMA
    from ..train.seeding import derive_seed
    from .model_bundle import SegmenterManifest
    from .network import build_segresnet

    options.validate()
    out = Path(options.out)
    if out.exists() and not options.overwrite:
        raise InputError(f"{out} already exists; pass --overwrite to replace it")
    card = _read_card(options.card) if options.card else None
    ctx = init_distributed(options.device)
    saved_threads = torch.get_num_threads()
    try:
        if options.threads:
            torch.set_num_threads(int(options.threads))
        lo, hi = shard_range(int(options.batch_size), ctx.rank, ctx.world_size)
        train, val = load_split(options)
        conventions = sorted({c.convention for c in train + val})
        network_config = SegmenterNetwork.preset(options.preset, in_channels=len(options.channels))
        rng_state = torch.random.get_rng_state()
        torch.manual_seed(derive_seed(int(options.seed), "segmenter", "init"))
        net = build_segresnet(network_config).to(ctx.device)
        torch.manual_seed(derive_seed(int(options.seed), "segmenter", "dropout", ctx.rank))
        manifest = SegmenterManifest(
            network=network_config, channels=tuple(options.channels), spacing_mm=tuple(train[0].spacing),
            roi_size_ijk=(int(options.crop_size),) * 3, label_convention=conventions[-1], weights_sha256="",
            model=dict(options.model),
        )
        ema = EMA(net, float(options.ema_decay))
        model = wrap_model(net, ctx)
        optimiser = torch.optim.Adam(net.parameters(), lr=float(options.lr), weight_decay=float(options.weight_decay))
        loss_fn = _loss_function()
        history, smoothed, started = [], None, time.perf_counter()
        bar = _progress(int(options.steps), ctx.is_main and not options.quiet)
        for step in range(int(options.steps)):
            images, targets = step_batch(train, options, step, lo, hi)
            loss = loss_fn(model(torch.from_numpy(images).to(ctx.device)), torch.from_numpy(targets).to(ctx.device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            ema.update(net)
            value = float(all_reduce_mean(loss.detach().clone(), ctx))  # the whole global batch's loss
            if not math.isfinite(value):
                raise InputError(f"the training loss became {value} at step {step + 1}; lower --lr")
            smoothed = value if smoothed is None else LOSS_SMOOTHING * smoothed + (1 - LOSS_SMOOTHING) * value
            record = {"step": step + 1, "loss": value, "smoothed_loss": smoothed}
            if options.val_every and (step + 1) % int(options.val_every) == 0 and step + 1 < int(options.steps):
                if ctx.is_main:
                    record["val_dice"] = held_out_dice(ema.module, val, manifest, ctx.device)
                    logger.info("step %d: loss %.4f, held-out Dice %s", step + 1, smoothed, record["val_dice"])
            history.append(record)
            if callback is not None:
                callback(record)
            if bar is not None:
                bar.set_postfix(loss=f"{smoothed:.4f}")
                bar.update(1)
        if bar is not None:
            bar.close()
        if ctx.is_main:
            final = held_out_dice(ema.module, val, manifest, ctx.device)
            manifest.metrics = {"held_out_dice": final, "held_out_cases": [c.case_id for c in val],
                                "evaluated_with": "EMA weights, full sliding-window inference, threshold 0.5"}
            manifest.training = _training_record(options, ctx, train, val, history, time.perf_counter() - started)
            _write(out, manifest, unwrap_model(model), ema, card, options.overwrite)
            logger.info("held-out Dice: %s", final)
        _barrier(ctx)
        torch.random.set_rng_state(rng_state)  # the caller's random stream is left as it was
    finally:
        torch.set_num_threads(saved_threads)
        shutdown(ctx)
    return out.resolve()


def _read_card(path: str | Path) -> str:
    """The model card's text, read before training so that a bad path fails at once, not after the run."""
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the model card {path}: {exc}") from exc


def _write(out: Path, manifest: Any, net: Any, ema: Any, card: str | None, overwrite: bool) -> None:
    from .model_bundle import write_segmenter_bundle

    write_segmenter_bundle(out, manifest, {"ema": ema.state_dict(), "raw": net.state_dict()}, card=card,
                           overwrite=overwrite)


def _barrier(ctx: Any) -> None:
    from ..train.distributed import barrier

    barrier(ctx)


def _progress(total: int, show: bool) -> Any:
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="segmenter", unit="step", dynamic_ncols=True)


def _training_record(options: SegmenterTrainingOptions, ctx: Any, train: Sequence[_Case], val: Sequence[_Case],
                     history: list[dict], seconds: float) -> dict:
    import torch

    first = history[: max(1, len(history) // 10)]
    last = history[-max(1, len(history) // 10):]
    return {
        "software": f"ScoreFusion {__version__}", "torch": torch.__version__, "python": platform.python_version(),
        "command": options.command_line, "data": str(options.data), "train_case_ids": [c.case_id for c in train],
        "val_case_ids": [c.case_id for c in val], "val_fraction": float(options.val_fraction),
        "label_conventions": sorted({c.convention for c in train}), "preset": options.preset,
        "grid_ijk": list(options.grid) if options.grid else None, "crop_size": int(options.crop_size),
        "tumour_fraction": float(options.tumour_fraction), "steps": int(options.steps),
        "batch_size": int(options.batch_size), "world_size": ctx.world_size,
        "batch_size_per_process": int(options.batch_size) // ctx.world_size, "lr": float(options.lr),
        "weight_decay": float(options.weight_decay), "ema_decay": float(options.ema_decay), "seed": int(options.seed),
        "loss": "soft Dice (sigmoid, per item and region) + binary cross-entropy", "optimizer": "Adam",
        "augmentation": "random crops (tumour-centred with probability tumour_fraction), left-right flips, "
                        "per-channel intensity scale U(0.9, 1.1) and shift U(-0.1, 0.1) on nonzero voxels",
        "mean_loss_first_tenth": float(np.mean([h["loss"] for h in first])),
        "mean_loss_last_tenth": float(np.mean([h["loss"] for h in last])),
        "loss_curve": [float(f"{h['loss']:.6g}") for h in history],
        "history": [h for h in history if "val_dice" in h],
        "device": ctx.device, "wall_time_s": round(seconds, 1),
    }


__all__ = ["SegmenterTrainingOptions", "draw_crop", "held_out_dice", "load_split", "step_batch",
           "train_segmenter"]
