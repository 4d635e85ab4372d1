"""The bundle directory of a plane-training run: checks, clean-up, manifest, resume signature.

Rules. Without ``resume`` the output folder must be missing or empty, unless ``overwrite``
(which removes only bundle files: ``manifest.json``, ``plane-*.safetensors``,
``checkpoints/``; anything else is left alone). With ``resume`` it must hold a bundle whose
*signature* -- everything that changes the trained weights except the step count -- equals
the new run's; a difference is refused with the differing fields named. Finished planes are
listed in the manifest; unfinished ones have a checkpoint in ``checkpoints/``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from ..bundle import MANIFEST, BundleError, Manifest, PlaneEntry, read_manifest, sha256_file
from ..diffusion.schedule import FusedSchedule, PlaneTrainingSchedule
from ..errors import InputError
from .cases import TRAINING_ORIENTATION, TrainingData
from .options import PlaneTrainingOptions
from .state import CHECKPOINT_DIR

#: Fields of the signature and the option that sets each (for error messages).
SIGNATURE_FIELDS = {
    "task": "--task/--inputs/--target/--factor/--thick-slice-*/--normalization",
    "planes": "--planes",
    "config": "--config/--dropout/--noise-embedding",
    "neighbors": "--neighbors",
    "grid_ijk": "--grid",
    "seed": "--seed",
    "batch_size": "--batch-size",
    "lr": "--lr",
    "ema_decay": "--ema-decay",
    "ema_warmup": "--no-ema-warmup",
    "grad_clip": "--grad-clip",
    "kaiming_init": "--kaiming-init",
    "train_case_ids": "--data/--val-fraction (training cases)",
    "val_case_ids": "--data/--val-fraction (validation cases)",
    "val_slices": "--val-slices",
}


class ResumeError(InputError):
    """``--resume`` on a folder that holds no run, or a different run."""


def _is_bundle_file(path: Path) -> bool:
    name = path.name
    if path.is_dir():
        return name == CHECKPOINT_DIR
    return name == MANIFEST or (name.startswith("plane-") and name.endswith(".safetensors")) or (
        name.startswith(".") and ".part" in name  # leftovers of interrupted atomic writes
    )


def check_output_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse an output folder that this run may not use (nothing is modified here)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder")
    if resume:
        if not (out / MANIFEST).is_file():
            raise ResumeError(f"nothing to resume: {out} holds no {MANIFEST} (start without --resume)")
        return
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(
            f"output folder {out} is not empty; pass --overwrite to replace its bundle or --resume to "
            "continue the run in it"
        )


def clear_bundle(out: Path) -> list[str]:
    """Remove bundle files from ``out`` (for ``overwrite``); returns the names left untouched."""
    kept = []
    for entry in sorted(out.iterdir()):
        if _is_bundle_file(entry):
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        else:
            kept.append(entry.name)
    return kept


def run_signature(options: PlaneTrainingOptions, task: dict, config: dict, data: TrainingData) -> dict:
    """Everything a resumed run must share with the run it continues."""
    return {
        "task": task,
        "planes": list(options.planes),
        "config": {"preset": options.config, **config},
        "neighbors": int(options.neighbors),
        "grid_ijk": list(data.grid_ijk),
        "seed": int(options.seed),
        "batch_size": int(options.batch_size),
        "lr": float(options.lr),
        "ema_decay": float(options.ema_decay),
        "ema_warmup": bool(options.ema_warmup),
        "grad_clip": float(options.grad_clip),
        "kaiming_init": bool(options.kaiming_init),
        "train_case_ids": data.train_ids,
        "val_case_ids": data.val_ids,
        "val_slices": int(options.val_slices),
    }


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def compare_signatures(old: dict, new: dict, where: str, fields: dict[str, str] | None = None) -> None:
    """Raise :class:`ResumeError` naming every field in which ``new`` differs from ``old``.

    ``fields`` maps signature keys to the options that set them (default: plane training's).
    """
    fields = SIGNATURE_FIELDS if fields is None else fields
    diffs = []
    for key in fields:
        if old.get(key) != new.get(key):
            diffs.append(f"{key} ({fields[key]}): was {_short(old.get(key))}, now {_short(new.get(key))}")
    if diffs:
        raise ResumeError(
            f"cannot resume {where}: the run differs from the one it would continue in "
            + "; ".join(diffs)
            + ". Use the original options, or start a new run (another --out, or --overwrite)"
        )


def finished_planes(out: Path, signature: dict) -> tuple[Manifest, dict[str, PlaneEntry]]:
    """For ``resume``: the existing manifest (signature checked) and its finished, intact planes."""
    try:
        manifest = read_manifest(out)
    except BundleError as exc:
        raise ResumeError(f"cannot resume in {out}: {exc}") from None
    old = manifest.training.get("resume_signature")
    if not isinstance(old, dict):
        raise ResumeError(f"cannot resume in {out}: its manifest records no training run to continue")
    compare_signatures(old, signature, f"in {out}")
    done = {}
    for plane, entry in manifest.planes.items():
        path = out / entry.file
        if not path.is_file() or (entry.sha256 and sha256_file(path) != entry.sha256):
            raise ResumeError(f"cannot resume in {out}: the finished {plane} weights {entry.file} are missing "
                              "or were modified")
        done[plane] = entry
    return manifest, done


def diffusion_record(config: dict) -> dict:
    """Diffusion conventions the plane models were trained with (method.md 2.1-2.5)."""
    return {
        "plane_training_schedule": PlaneTrainingSchedule().to_dict(),
        "noise_embedding": config["noise_embedding"],
        "noise_level": "gamma = abar (continuous, in (0, 1])",
        "gamma_sampling": "n ~ U{1..num_steps-1}, gamma ~ U[gbar_n, gbar_{n-1}]",
        "prediction": "eps",
        "target": "r0 = (y - c_ref) / 2; y_hat = c_ref + 2 r0_hat",
        "fused_schedule": FusedSchedule().to_dict(),
    }


def build_manifest(
    options: PlaneTrainingOptions,
    task: dict,
    data: TrainingData,
    planes: dict[str, PlaneEntry],
    training: dict,
    config: dict,
) -> Manifest:
    """The bundle manifest for the current state of the run."""
    return Manifest(
        task=task,
        neighbors=int(options.neighbors),
        planes=dict(planes),
        grid={"shape_ijk": list(data.grid_ijk), "spacing": data.spacing, "orientation": TRAINING_ORIENTATION,
              "source": "native" if options.grid is None else "centre crop/pad"},
        diffusion=diffusion_record(config),
        training=training,
    )


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
