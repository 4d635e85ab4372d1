"""Resume checkpoints of plane training: tensors in safetensors, everything else in JSON.

``BUNDLE/checkpoints/<plane>-state.safetensors`` holds the raw weights (``raw/...``), the
EMA weights (``ema/...``) and the optimiser's tensor state (``optim/<param index>/<key>``,
e.g. Adam's ``exp_avg``, ``exp_avg_sq`` and ``step``). ``<plane>-state.json`` holds the step
count, the optimiser's parameter groups and scalar state, the gradient-scaler and EMA
bookkeeping, the run signature and the sha256 of the tensor file. Nothing is pickled, so a
checkpoint from an untrusted source cannot execute code.

Both files are written atomically, tensors first. The JSON is also embedded in the tensor
file's metadata, so if a crash falls between the two writes the tensor file alone is still
a consistent checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..atomic import atomic_path, write_text_atomic
from ..errors import ScoreFusionError

STATE_FORMAT = "scorefusion-train-state"
STATE_VERSION = 1
CHECKPOINT_DIR = "checkpoints"


class CheckpointError(ScoreFusionError):
    """A resume checkpoint that is missing, corrupted or does not match the run."""


def state_paths(bundle_dir: str | os.PathLike, plane: str) -> tuple[Path, Path]:
    """``(tensor file, json file)`` of ``plane``'s checkpoint inside a bundle directory."""
    base = Path(bundle_dir) / CHECKPOINT_DIR
    return base / f"{plane}-state.safetensors", base / f"{plane}-state.json"


def has_training_state(bundle_dir: str | os.PathLike, plane: str) -> bool:
    return state_paths(bundle_dir, plane)[0].is_file()


def remove_training_state(bundle_dir: str | os.PathLike, plane: str) -> None:
    """Delete ``plane``'s checkpoint (after the plane's final weights are in the bundle)."""
    for p in state_paths(bundle_dir, plane):
        p.unlink(missing_ok=True)
    base = Path(bundle_dir) / CHECKPOINT_DIR
    if base.is_dir() and not any(base.iterdir()):
        base.rmdir()


def _json_ready(value: Any, where: str) -> Any:
    if isinstance(value, tuple):
        value = list(value)
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot store {where} in JSON: {exc}") from exc
    return value


def _split_optimizer(optimizer_state: dict) -> tuple[dict, dict]:
    """Optimiser ``state_dict`` -> (flat tensors, JSON part)."""
    import torch

    tensors: dict[str, Any] = {}
    scalars: dict[str, dict] = {}
    for idx, entry in optimizer_state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{int(idx)}/{key}"] = value
            else:
                scalars.setdefault(str(int(idx)), {})[key] = _json_ready(value, f"optimizer state {key}")
    groups = []
    for g in optimizer_state["param_groups"]:
        groups.append({k: _json_ready(v, f"optimizer group field {k}") for k, v in g.items()})
    return tensors, {"param_groups": groups, "scalars": scalars}


def _join_optimizer(tensors: dict, part: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, idx, name = key.split("/", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, entries in part.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(entries)
    groups = []
    for g in part["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def save_training_state(
    bundle_dir: str | os.PathLike,
    plane: str,
    *,
    raw: dict,
    ema: dict,
    optimizer: dict,
    info: dict,
) -> Path:
    """Write ``plane``'s checkpoint; ``info`` (step, signature, EMA/scaler state ...) goes to JSON.

    Returns the JSON path. ``raw``/``ema`` are model ``state_dict``s, ``optimizer`` an
    optimiser ``state_dict``.
    """
    from safetensors.torch import save_file

    from ..bundle import sha256_file

    st_path, json_path = state_paths(bundle_dir, plane)
    flat: dict[str, Any] = {}
    for prefix, sd in (("raw", raw), ("ema", ema)):
        for k, v in sd.items():
            flat[f"{prefix}/{k}"] = v
    opt_tensors, opt_part = _split_optimizer(optimizer)
    flat.update(opt_tensors)
    flat = {k: v.detach().to("cpu").contiguous() for k, v in flat.items()}
    record = {"format": STATE_FORMAT, "version": STATE_VERSION, "plane": plane,
              **_json_ready(dict(info), "checkpoint info"), "optimizer": opt_part}
    text = json.dumps(record, indent=2)
    with atomic_path(st_path, suffix=".safetensors") as tmp:
        save_file(flat, str(tmp), metadata={"state_json": text})
    record["tensors_sha256"] = sha256_file(st_path)
    write_text_atomic(json_path, json.dumps(record, indent=2) + "\n")
    return json_path


def load_training_state(bundle_dir: str | os.PathLike, plane: str) -> dict:
    """Read ``plane``'s checkpoint: ``{"raw", "ema", "optimizer", "info"}``.

    The JSON sidecar is used when its recorded sha256 matches the tensor file; otherwise the
    copy embedded in the tensor file (always consistent with it) is used.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from ..bundle import sha256_file

    st_path, json_path = state_paths(bundle_dir, plane)
    if not st_path.is_file():
        raise CheckpointError(f"no checkpoint for the {plane} plane in {st_path.parent}")
    try:
        with safe_open(str(st_path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(st_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read checkpoint {st_path.name}: {exc}") from exc
    record = None
    if json_path.is_file():
        try:
            side = json.loads(json_path.read_text(encoding="utf-8"))
            if side.get("tensors_sha256") == sha256_file(st_path):
                record = side
        except (OSError, ValueError):
            record = None
    if record is None:
        try:
            record = json.loads(meta["state_json"])
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {st_path.name} has no readable state record") from exc
    if record.get("format") != STATE_FORMAT or record.get("version") != STATE_VERSION:
        raise CheckpointError(f"{st_path.name} is not a version-{STATE_VERSION} ScoreFusion training checkpoint")
    if record.get("plane") != plane:
        raise CheckpointError(f"{st_path.name} belongs to the {record.get('plane')!r} plane, not {plane!r}")
    raw = {k[4:]: v for k, v in tensors.items() if k.startswith("raw/")}
    ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema/")}
    opt = {k: v for k, v in tensors.items() if k.startswith("optim/")}
    if not raw or not ema:
        raise CheckpointError(f"checkpoint {st_path.name} lacks the raw or EMA weights")
    info = {k: v for k, v in record.items() if k not in ("format", "version", "plane", "optimizer",
                                                         "tensors_sha256")}
    return {"raw": raw, "ema": ema, "optimizer": _join_optimizer(opt, record["optimizer"]), "info": info}
