"""Convert the MONAI model zoo's ``brats_mri_segmentation`` weights into a ScoreFusion segmenter bundle.

The zoo bundle (trained on BraTS 2018) ships a PyTorch checkpoint of
``SegResNet(blocks_down=[1, 2, 2, 4], blocks_up=[1, 1, 1], init_filters=16, in_channels=4,
out_channels=3, dropout_prob=0.2)``, which is our ``monai-brats`` preset. Converting it once,
rather than reading ``.pt`` files at inference time, means inference only ever reads verified
safetensors, and the manifest records everything the zoo's ``inference.json`` implies:

* input channels T1c, T1, T2, FLAIR (``t1c``, ``t1n``, ``t2w``, ``t2f``);
* ``Orientationd(RAS)``, ``Spacingd(1 mm)``, ``NormalizeIntensityd(nonzero, channel_wise)``
  (our ``zscore-nonzero``);
* ``SlidingWindowInferer(roi_size=[240, 240, 160], overlap=0.5)`` applied to nibabel-ordered
  ``(C, i, j, k)`` tensors, hence ``layout="ijk"`` (convolutions are not symmetric under axis
  reversal, so feeding our ``(C, k, j, i)`` arrays would silently degrade the output);
* sigmoid TC, WT, ET outputs thresholded at 0.5, BraTS 2018 labels (1 necrotic / non-enhancing,
  2 oedema, 4 enhancing), i.e. ``label_convention="brats2021"``.

The user-supplied checkpoint is a pickle. It is read **only** with
``torch.load(..., map_location="cpu", weights_only=True)``, which refuses any object other than
tensors and plain containers, so a malicious file cannot run code; nothing else ever unpickles it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..bundle import BundleError
from ..errors import InputError
from .model_bundle import INTENDED_USE, SegmenterManifest, is_segmenter_bundle, write_segmenter_bundle
from .network import SegmenterNetwork

#: What the manifest's ``source.origin`` says.
ZOO_ORIGIN = "MONAI model zoo brats_mri_segmentation"
#: The zoo network's input channels, in order (T1c, T1, T2, FLAIR).
ZOO_CHANNELS = ("t1c", "t1n", "t2w", "t2f")
#: The zoo's sliding window on ``(C, i, j, k)`` tensors.
ZOO_ROI_IJK = (240, 240, 160)
ZOO_SPACING_MM = (1.0, 1.0, 1.0)
ZOO_OVERLAP = 0.5
ZOO_THRESHOLD = 0.5
#: BraTS 2018 labels 1/2/4 are the 2017-2021 convention.
ZOO_LABEL_CONVENTION = "brats2021"
#: Keys a training framework may wrap the state dict under (MONAI CheckpointSaver, Lightning, ...).
WRAPPER_KEYS = ("model", "state_dict", "network")
#: Prefix ``torch.nn.parallel.DistributedDataParallel`` adds to every parameter name.
DDP_PREFIX = "module."
ZOO_MODEL_ID = "monai-brats-mri-segmentation"
ZOO_LICENSE = (
    "Weights converted from the MONAI model zoo bundle brats_mri_segmentation. The bundle's code is "
    "Apache-2.0; the weights were trained on BraTS 2018 data, whose terms of use apply. ScoreFusion does "
    "not redistribute them: making sure your use complies with the weights' licence and the data terms is "
    "your responsibility."
)
#: How many tensor names an error message lists per kind of problem.
_LISTED = 5


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    return shown + (f", ... ({len(names) - _LISTED} more)" if len(names) > _LISTED else "")


def read_checkpoint_bytes(checkpoint: str | os.PathLike) -> bytes:
    """The checkpoint file's bytes, with a clear error for a missing, empty or unreadable file.

    The file is read once and both hashed and loaded from memory, so the sha256 recorded in the
    manifest is exactly that of the bytes converted, even if the file changes meanwhile.
    """
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise InputError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise InputError(f"checkpoint {path} is not a file (give the zoo bundle's models/model.pt)")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read checkpoint {path}: {exc}") from exc
    if not data:
        raise BundleError(f"checkpoint {path.name} is empty")
    return data


def load_checkpoint_state(data: bytes, name: str) -> dict[str, Any]:
    """The state dict inside a checkpoint's bytes: unwrapped, without a DDP prefix, tensors only.

    Accepts a bare state dict or one wrapped under ``model``, ``state_dict`` or ``network`` (other
    top-level entries such as optimizer state are ignored). Raises :class:`BundleError` for
    anything ``weights_only`` refuses, corrupt or truncated files, and content that is no state dict.
    """
    import torch

    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's own message suggests weights_only=False; never repeat that advice for an untrusted file.
        reason = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
        detail = reason.group(1).split(". ")[0].strip() if reason else ""
        found = re.search(r"GLOBAL (\S+)", detail)
        if found or "global" in detail.lower():
            what = f" ({found.group(1)})" if found else ""
            raise BundleError(
                f"refusing {name}: it holds pickled Python objects{what} other than tensors and plain containers, "
                "which could run code when loaded. ScoreFusion never unpickles such files; in an environment you "
                "trust, export the weights with torch.save(model.state_dict(), 'model.pt') and convert that"
            ) from exc
        raise BundleError(f"cannot read {name}: the file is corrupt, truncated or not a PyTorch checkpoint of "
                          f"tensors ({detail or 'unreadable pickle'})") from exc
    except MemoryError:
        raise
    except Exception as exc:  # torch raises RuntimeError, EOFError, KeyError, ... for damaged files
        raise BundleError(
            f"cannot read {name}: the file is corrupt, truncated or not a PyTorch checkpoint "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    if not isinstance(obj, Mapping):
        raise BundleError(f"{name} holds a {type(obj).__name__}, not a state dict (a mapping of tensor names "
                          "to tensors)")
    state: Mapping = obj
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        wrapped = [k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
        if not wrapped:
            keys = sorted(str(k) for k in obj)
            raise BundleError(f"{name} is neither a state dict nor one wrapped under {', '.join(WRAPPER_KEYS)} "
                              f"(top-level keys: {_listing(keys)})")
        state = obj[wrapped[0]]
    bad = sorted(str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor))
    if bad:
        raise BundleError(f"the state dict in {name} holds entries that are not named tensors: {_listing(bad)}")
    if state and all(k.startswith(DDP_PREFIX) for k in state):
        state = {k[len(DDP_PREFIX):]: v for k, v in state.items()}
    return dict(state)


def check_zoo_state(state: dict[str, Any], name: str, network: SegmenterNetwork) -> dict[str, Any]:
    """``state`` as float32 tensors after checking names and shapes against ``network``.

    All problems are reported in one :class:`BundleError` (missing, unexpected and misshapen
    tensors by name), so a checkpoint of another architecture is recognisable at a glance.
    Floating-point tensors of another precision are cast to the network's float32.
    """
    import torch

    from ..bundle_validation import expected_tensors

    expected = expected_tensors("segmenter", json.dumps(network.to_dict(), sort_keys=True), "monai-brats network")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshapen = [f"{k} {tuple(state[k].shape)} (expected {expected[k][0]})"
                 for k in sorted(set(state) & set(expected)) if tuple(state[k].shape) != expected[k][0]]
    not_float = sorted(k for k in set(state) & set(expected) if not state[k].is_floating_point())
    problems = [f"{len(items)} {what}: {_listing(items)}" for what, items in (
        ("missing tensors", missing), ("unexpected tensors", unexpected), ("misshapen tensors", misshapen),
        ("non-floating-point tensors", not_float)) if items]
    if problems:
        raise BundleError(f"{name} does not hold the weights of the MONAI brats_mri_segmentation SegResNet "
                          f"(init_filters {network.init_filters}, blocks_down {list(network.blocks_down)}, "
                          f"4 inputs, 3 outputs): " + "; ".join(problems))
    return {k: state[k].detach().to(torch.float32).contiguous() for k in sorted(expected)}


def zoo_manifest(source: dict) -> SegmenterManifest:
    """The manifest of a converted zoo bundle (weights sha256 is filled in when written)."""
    return SegmenterManifest(
        network=SegmenterNetwork.preset("monai-brats"), channels=ZOO_CHANNELS, spacing_mm=ZOO_SPACING_MM,
        roi_size_ijk=ZOO_ROI_IJK, label_convention=ZOO_LABEL_CONVENTION, weights_sha256="",
        overlap=ZOO_OVERLAP, threshold=ZOO_THRESHOLD, normalization="zscore-nonzero", layout="ijk",
        source=source, model={"id": ZOO_MODEL_ID, "title": "MONAI model zoo brats_mri_segmentation (SegResNet)"},
        license=ZOO_LICENSE, intended_use=INTENDED_USE,
    )


def zoo_card(source: dict) -> str:
    """A short model card: what the weights are, where they came from and what they must not be used for."""
    return f"""# {ZOO_MODEL_ID}

Converted by `scorefusion models convert-monai-brats` from the MONAI model zoo bundle
`brats_mri_segmentation` (a SegResNet trained on BraTS 2018 by the MONAI project, not by ScoreFusion).

* Source file: `{source['file']}`, sha256 `{source['sha256']}`, converted {source['converted']}.
* Network: MONAI `SegResNet`, init_filters 16, blocks_down [1, 2, 2, 4], blocks_up [1, 1, 1],
  dropout 0.2 (ScoreFusion preset `monai-brats`); weights unchanged (float32).
* Inputs, in order: T1c, T1, T2, FLAIR, co-registered on one grid; reoriented to RAS, resampled to
  1 mm when needed, each channel z-scored over its nonzero voxels (skull-stripped data expected).
* Inference: sliding windows of 240 x 240 x 160 voxels along i, j, k (tensor layout `ijk`), overlap
  0.5; sigmoid TC, WT, ET, threshold 0.5. ScoreFusion blends windows with a Gaussian; the zoo blends
  them uniformly, which only matters for volumes larger than one window.
* Labels: BraTS 2018 (`brats2021` convention): 1 necrotic / non-enhancing core, 2 oedema, 4 enhancing.

Licence: {ZOO_LICENSE}

Intended use: {INTENDED_USE} ScoreFusion has not measured these weights' accuracy; see the zoo
bundle's own documentation.
"""


def _check_destination(out: Path, overwrite: bool) -> None:
    """Refuse a destination before any work: existing without ``overwrite``, a file, or a foreign folder."""
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"{out} exists and is not a folder")
    if not overwrite:
        raise InputError(f"{out} already exists; pass --overwrite to replace it")
    if any(out.iterdir()) and not is_segmenter_bundle(out):
        raise InputError(f"{out} is a folder that is not a segmenter bundle; refusing to replace it "
                         "(choose a new --out)")


def convert_monai_brats(checkpoint: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Convert a ``brats_mri_segmentation`` checkpoint into a segmenter bundle folder at ``out``.

    Parameters
    ----------
    checkpoint : the zoo bundle's ``models/model.pt`` (a bare state dict, or one wrapped under
        ``model``/``state_dict``/``network``, with or without DDP's ``module.`` prefix).
    out : bundle folder to create; written atomically, so nothing appears on any error.
    overwrite : replace an existing segmenter bundle (or empty folder) at ``out``.

    Returns
    -------
    The bundle folder, ready for ``scorefusion segment --model``.
    """
    out = Path(out).expanduser()
    _check_destination(out, overwrite)
    path = Path(checkpoint).expanduser()
    data = read_checkpoint_bytes(path)
    network = SegmenterNetwork.preset("monai-brats")
    state = check_zoo_state(load_checkpoint_state(data, path.name), path.name, network)
    source = {
        "origin": ZOO_ORIGIN,
        "file": path.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "converted": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    return write_segmenter_bundle(out, zoo_manifest(source), {"ema": state}, card=zoo_card(source),
                                  overwrite=overwrite)


__all__ = ["ZOO_CHANNELS", "ZOO_ORIGIN", "ZOO_ROI_IJK", "check_zoo_state", "convert_monai_brats",
           "load_checkpoint_state", "read_checkpoint_bytes", "zoo_card", "zoo_manifest"]
