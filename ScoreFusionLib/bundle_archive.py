"""Model bundles as single zip files: packing for publication, unpacking for installation.

A published model is one archive with a registered sha256, so packing must be reproducible:
the same bundle packs to the same bytes (sorted members, fixed timestamps and modes, weight
files rewritten with a canonical safetensors header). Packing can drop the ``raw`` weights,
which halves an embedded model; the manifest's checksums, including the fuser's record of the
plane files it was trained with, are rewritten for the new files, but only after the old ones
were verified, so a fuser that does not belong to its planes is never re-certified. Unpacking
extracts safely (:mod:`ScoreFusionLib.archive`) and validates before anything appears at the
destination.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import stat
import struct
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .archive import safe_extract_zip
from .atomic import atomic_path
from .bundle import MANIFEST, WEIGHT_SETS, BundleError, sha256_file
from .bundle_validation import BundleReport, bundle_file, check_manifest_data, inspect_bundle, validate_bundle

#: Timestamp of every packed member (the earliest a zip can store), for reproducible archives.
PACKED_DATE_TIME = (1980, 1, 1, 0, 0, 0)
_MEMBER_MODE = stat.S_IFREG | 0o644
_FILE_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
             "U16": 2, "U8": 1, "BOOL": 1}
_CHUNK = 1 << 20


def pack_bundle(
    bundle_dir: str | os.PathLike,
    out_zip: str | os.PathLike,
    weight_sets: Sequence[str] = ("ema",),
    model: dict | None = None,
    extra_files: Sequence[str | os.PathLike] = (),
) -> str:
    """Write a validated, reproducible zip of a bundle and return the zip's sha256.

    Parameters
    ----------
    bundle_dir : the bundle folder; it is fully validated first.
    out_zip : the archive to write (atomically; an existing file is replaced only on success).
    weight_sets : weight sets to keep; must include ``ema``, and the set the fuser runs with.
    model : the manifest's ``model`` block (``id``, ``title``, ``version``, ``description``,
        ``card``); ``None`` keeps the bundle's own block, if any.
    extra_files : files added at the archive root under their own names (e.g. ``MODEL_CARD.md``).
        A card named by ``model`` and not given here is taken from the bundle folder.

    Raises
    ------
    BundleError
        For an invalid bundle, an unfinished training, a requested weight set a file lacks, a
        fuser whose plane files changed, or an extra file whose name is unusable or taken.
    """
    src, out = Path(bundle_dir), Path(out_zip)
    sets = _requested_sets(weight_sets)
    report = inspect_bundle(src)
    _check_packable(report, sets)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", suffix=".build", dir=out.parent) as work:
        build = Path(work, "bundle")
        build.mkdir()
        new_sha = {wf.file: write_weight_sets(src / wf.file, build / wf.file, sets, wf.weight_sets)
                   for wf in report.files}
        data = _packed_manifest(report.data, new_sha, model)
        names = [MANIFEST, *new_sha]
        for extra in extra_files:
            names.append(_copy_extra(Path(extra), build, names))
        card = (data.get("model") or {}).get("card")
        if card and card not in names:
            card_path = bundle_file(src, card, "model card")
            if not card_path.is_file():
                raise BundleError(f"the model card {card} is neither among the extra files nor in {src}")
            names.append(_copy_extra(card_path, build, names))
        check_manifest_data(data, f"the packed manifest of {src}")
        (build / MANIFEST).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8", newline="\n")
        with atomic_path(out, suffix=".zip") as tmp:
            write_reproducible_zip(tmp, build, names)
            try:
                unpack_bundle(tmp, Path(work, "check"))
            except BundleError as exc:
                raise BundleError(f"the packed archive of {src} does not validate: {exc}") from exc
            return sha256_file(tmp)


def unpack_bundle(archive: str | os.PathLike, dest: str | os.PathLike,
                  validate: Callable[[Path], Any] = validate_bundle) -> Any:
    """Extract a bundle archive into the new folder ``dest`` and validate it; return its manifest.

    The bundle may sit at the archive's root or inside exactly one top-level folder. ``dest``
    appears (by one rename) only once the bundle validated; on any failure nothing is left.
    ``validate`` checks the extracted folder and returns its manifest (translation bundles by
    default; :func:`~ScoreFusionLib.segmentation.model_bundle.validate_segmenter_bundle` for segmenters).

    Raises
    ------
    ArchiveError
        For an unsafe, damaged or oversized archive (see :func:`~ScoreFusionLib.archive.safe_extract_zip`).
    BundleError
        When ``dest`` exists or the archive does not hold a valid bundle.
    """
    archive, dest = Path(archive), Path(dest)
    if dest.exists() or dest.is_symlink():
        raise BundleError(f"cannot unpack {archive.name} into {dest}: it already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".unpack", dir=dest.parent))
    try:
        safe_extract_zip(archive, work / "x")
        root = _bundle_root(work / "x", archive)
        try:
            manifest = validate(root)
        except BundleError as exc:
            message = str(exc).replace(f"{root}{os.sep}", "").replace(str(root), "the archive")
            raise BundleError(f"the bundle in {archive.name} is invalid: {message}") from exc
        os.replace(root, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return manifest


def _requested_sets(weight_sets: Sequence[str]) -> tuple[str, ...]:
    requested = (weight_sets,) if isinstance(weight_sets, str) else tuple(weight_sets)
    unknown = [s for s in requested if s not in WEIGHT_SETS]
    if unknown:
        raise BundleError(f"unknown weight set(s) {unknown}; use {WEIGHT_SETS}")
    if "ema" not in requested:
        raise BundleError(f"a packed bundle must keep the 'ema' weights (the ones inference uses); got {requested}")
    return tuple(s for s in WEIGHT_SETS if s in requested)


def _check_packable(report: BundleReport, sets: tuple[str, ...]) -> None:
    training = report.manifest.training or {}
    if training.get("status") not in (None, "complete") or training.get("planes_pending"):
        raise BundleError(f"the plane training of {report.path} is not complete (status "
                          f"{training.get('status')!r}); finish it before packing")
    for wf in report.files:
        for s in sets:
            if s not in wf.weight_sets:
                raise BundleError(f"weight file {wf.file} ({wf.role}) holds no {s!r} weights; pack without them")
    fuser = report.manifest.fuser
    if fuser and fuser["plane_weights"] not in sets:
        raise BundleError(f"the fuser runs with the {fuser['plane_weights']!r} plane weights, which "
                          f"weight_sets={sets} would leave out")


def _packed_manifest(data: dict, new_sha: dict[str, str], model: dict | None) -> dict:
    """The manifest with the new files' checksums, the fuser re-linked to them and the model block."""
    data = copy.deepcopy(data)
    for entry in data["planes"].values():
        entry["sha256"] = new_sha[entry["file"]]
    fuser = data.get("fuser")
    if fuser:
        fuser["sha256"] = new_sha[fuser["file"]]
        # inspect_bundle verified these matched the old plane files, so the fuser belongs to the new ones
        fuser["plane_sha256"] = {p: data["planes"][p]["sha256"] for p in fuser["plane_sha256"]}
        if "phases" in fuser:
            fuser["phases"] = {name: {**entry, "sha256": fuser["sha256"]} for name, entry in fuser["phases"].items()
                               if entry.get("file") == fuser["file"]}
    if model is not None:
        if not isinstance(model, dict):
            raise BundleError(f"the model block must be a dict, got {type(model).__name__}")
        if model:
            data["model"] = dict(model)
        else:
            data.pop("model", None)
    return data


def write_weight_sets(src: Path, dst: Path, sets: tuple[str, ...], held: tuple[str, ...]) -> str:
    """Copy a weight file, or rewrite it with only ``sets``; return the new file's sha256."""
    if set(held) <= set(sets):
        shutil.copyfile(src, dst)
        return sha256_file(dst)
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        metadata = f.metadata() or {}
        layout = {}
        for key in f.keys():
            if key.partition("/")[0] in sets:
                view = f.get_slice(key)
                dtype, shape = view.get_dtype(), list(view.get_shape())
                if dtype not in _ITEMSIZE:
                    raise BundleError(f"weight file {src.name}: tensor {key} has the unsupported dtype {dtype}")
                layout[key] = (dtype, shape, _ITEMSIZE[dtype] * math.prod(shape))
        # largest items first keeps every tensor aligned to its item size; names break ties
        order = sorted(layout, key=lambda k: (-_ITEMSIZE[layout[k][0]], k))
        header: dict = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
        offset = 0
        for key in order:
            dtype, shape, nbytes = layout[key]
            header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)
        with open(dst, "xb") as out:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            for key in order:
                out.write(_tensor_bytes(f.get_tensor(key)))
    return sha256_file(dst)


def _tensor_bytes(tensor: object) -> bytes:
    """A tensor's little-endian bytes in C order, whatever its dtype (bfloat16 included)."""
    import torch

    t = tensor.contiguous().reshape(-1)  # type: ignore[attr-defined]
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _copy_extra(path: Path, build: Path, taken: list[str]) -> str:
    if not path.is_file():
        raise BundleError(f"extra file {path} does not exist or is not a file")
    name = path.name
    if not _FILE_NAME.match(name):
        raise BundleError(f"extra file {path}: its name {name!r} is not a plain file name (letters, digits, ._-)")
    if name in taken:
        raise BundleError(f"extra file {path} would replace the bundle's {name}")
    shutil.copyfile(path, build / name)
    return name


def write_reproducible_zip(path: Path, folder: Path, names: list[str]) -> None:
    """A reproducible zip: sorted members, fixed timestamp and mode, deflate."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
        for name in sorted(names):
            file = folder / name
            info = zipfile.ZipInfo(name, date_time=PACKED_DATE_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3
            info.external_attr = _MEMBER_MODE << 16
            info.file_size = file.stat().st_size  # lets zipfile choose zip64 for huge members
            with open(file, "rb") as src, zf.open(info, "w") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)


def _bundle_root(folder: Path, archive: Path) -> Path:
    """The extracted bundle: ``folder`` itself or its single top-level sub-folder."""
    if (folder / MANIFEST).is_file():
        return folder
    entries = [p for p in folder.iterdir() if p.name != "__MACOSX"]
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / MANIFEST).is_file():
        return entries[0]
    raise BundleError(f"{archive.name} holds no {MANIFEST} at its root or in a single top-level folder")
