"""Segmenter bundles as reproducible zips: what ships in ``Resources/models`` and what users pass around.

Packing keeps the EMA weights only (what inference uses; half the size), rewrites the
manifest's sha256 for the new weight file, and writes the same bytes for the same bundle
(sorted members, fixed timestamps). The zip is unpacked and validated before it is renamed
into place.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ..atomic import atomic_path
from ..bundle import MANIFEST, BundleError, sha256_file


def pack_segmenter(bundle_dir: str | os.PathLike, out_zip: str | os.PathLike) -> str:
    """Write an EMA-only, validated, reproducible zip of a segmenter bundle; return its sha256."""
    from ..bundle_archive import unpack_bundle, write_reproducible_zip, write_weight_sets
    from ..bundle_validation import bundle_file
    from .model_bundle import validate_segmenter_bundle

    src, out = Path(bundle_dir), Path(out_zip)
    manifest = validate_segmenter_bundle(src)
    data = json.loads((src / MANIFEST).read_text(encoding="utf-8"))
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", suffix=".build", dir=out.parent) as work:
        build = Path(work, "bundle")
        build.mkdir()
        names = [MANIFEST, manifest.weights_file]
        held = _weight_sets(src / manifest.weights_file)
        data["weights"]["sha256"] = write_weight_sets(src / manifest.weights_file, build / manifest.weights_file,
                                                      ("ema",), held)
        card = manifest.model.get("card")
        if card:
            (build / card).write_bytes(bundle_file(src, card, "model card").read_bytes())
            names.append(card)
        (build / MANIFEST).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8", newline="\n")
        with atomic_path(out, suffix=".zip") as tmp:
            write_reproducible_zip(tmp, build, names)
            try:
                unpack_bundle(tmp, Path(work, "check"), validate_segmenter_bundle)
            except BundleError as exc:
                raise BundleError(f"the packed archive of {src} does not validate: {exc}") from exc
            return sha256_file(tmp)


def _weight_sets(path: Path) -> tuple[str, ...]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return tuple(sorted({key.partition("/")[0] for key in f.keys()}))
