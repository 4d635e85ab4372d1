"""``scorefusion models``: list, download, import, remove and pack trained model bundles."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

HELP = "list, download, import, remove and pack trained model bundles; convert MONAI zoo segmenter weights"

DESCRIPTION = textwrap.dedent(
    """\
    Manage the trained models of the registry (Resources/models.json, or the file named by
    SCOREFUSION_REGISTRY or --registry) and the local cache (~/.scorefusion, or SCOREFUSION_HOME):

      CACHE/models/<id>/<version>/   installed bundles (manifest.json + safetensors weights)
      CACHE/archives/<sha256>/       bundles unpacked from a bundle .zip used by path
      CACHE/downloads/               downloads in progress (*.part files resume)

    Every archive is checked against the registry's sha256 and unpacked and validated before it
    appears in the cache; an interrupted download resumes where it stopped on the next run.
    Embedded models ship with ScoreFusion and install without network access on first use.
    """
)

EPILOG = textwrap.dedent(
    """\
    examples:
      scorefusion models list
      scorefusion models download t1-to-flair
      scorefusion models import my_bundle/ --id my-t1-sr
      scorefusion models path t1-to-flair
      scorefusion models remove my-t1-sr
      scorefusion models pack runs/t1sr/bundle --out Resources/models/t1-sr4-iso.zip --id t1-sr4-iso \\
          --version 1.0.0 --card Resources/models/t1-sr4-iso.md --registry Resources/models.json
      scorefusion models convert-monai-brats brats_mri_segmentation/models/model.pt --out seg-monai/
    """
)


def _fill(text: str) -> str:
    """Wrap a one-paragraph description (the raw formatter keeps the examples' layout, not wrapping)."""
    return textwrap.fill(text, 88)


def _registry_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--registry", type=Path, metavar="FILE",
        help="registry JSON to use (default: $SCOREFUSION_REGISTRY, else the shipped Resources/models.json)",
    )


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``models`` and its actions on the ``scorefusion`` command."""
    raw = argparse.RawDescriptionHelpFormatter
    parser = subparsers.add_parser("models", help=HELP, description=DESCRIPTION, epilog=EPILOG, formatter_class=raw)
    actions = parser.add_subparsers(dest="models_command", metavar="ACTION")
    actions.required = True

    p = actions.add_parser(
        "list", help="registry models and installed ones", formatter_class=raw,
        description=_fill("List the registry's models (id, task, inputs -> target, version, archive size, whether "
        "installed, embedded or remote) and models imported into the cache."),
        epilog="examples:\n  scorefusion models list\n  scorefusion models list --installed --json",
    )
    p.add_argument("--installed", action="store_true", help="only installed models")
    p.add_argument("--json", action="store_true", help="machine-readable output (a JSON list)")
    _registry_option(p)
    p.set_defaults(func=run_list)

    p = actions.add_parser(
        "download", help="install a registry model (download or copy, verify, unpack)", formatter_class=raw,
        description=_fill("Install model ID into the cache: download its archive (or copy an embedded one), check "
        "its sha256, unpack and validate it. An interrupted download resumes on the next run; transient "
        "network errors are retried with exponential backoff."),
        epilog="examples:\n  scorefusion models download t1-to-flair\n"
        "  scorefusion models download t1-to-flair --force --retries 8 --timeout 120",
    )
    p.add_argument("id", metavar="ID", help="model id (see `scorefusion models list`)")
    p.add_argument("--force", action="store_true", help="download and install again even if installed")
    p.add_argument("--retries", type=int, default=4, metavar="N",
                   help="further attempts after a network error or HTTP 5xx (default 4)")
    p.add_argument("--timeout", type=float, metavar="S",
                   help="seconds to wait to connect and for each piece of data (default 10 to connect, 60 to read)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _registry_option(p)
    p.set_defaults(func=run_download)

    p = actions.add_parser(
        "import", help="copy a bundle folder or .zip into the cache", formatter_class=raw,
        description=_fill("Validate a bundle (folder or .zip made by `scorefusion models pack`) and copy it into "
        "the cache as CACHE/models/<id>/<version>/. The id and version come from the manifest's model block "
        "unless --id/--version are given (version 'local' when neither says)."),
        epilog="examples:\n  scorefusion models import t1sr.zip\n"
        "  scorefusion models import runs/t1sr/bundle --id my-t1-sr",
    )
    p.add_argument("path", type=Path, metavar="PATH", help="bundle folder or bundle .zip")
    p.add_argument("--id", dest="model_id", metavar="ID", help="id to install it under")
    p.add_argument("--version", metavar="V", help="version to install it under")
    p.add_argument("--force", action="store_true", help="replace an installed copy of the same id and version")
    p.set_defaults(func=run_import)

    p = actions.add_parser(
        "remove", help="delete an installed model from the cache", formatter_class=raw,
        description=_fill("Delete every installed version of ID, or only --version V."),
        epilog="examples:\n  scorefusion models remove my-t1-sr\n"
        "  scorefusion models remove t1-to-flair --version 1.0.0",
    )
    p.add_argument("id", metavar="ID", help="installed model id")
    p.add_argument("--version", metavar="V", help="only this version")
    p.set_defaults(func=run_remove)

    p = actions.add_parser(
        "path", help="print the cache folder, or an installed model's folder", formatter_class=raw,
        description=_fill("Print the cache root, or with ID the folder of its installed bundle (the newest version "
        "unless --version), e.g. to pass to --model."),
        epilog="examples:\n  scorefusion models path\n  scorefusion models path t1-to-flair",
    )
    p.add_argument("id", nargs="?", metavar="ID", help="installed model id")
    p.add_argument("--version", metavar="V", help="this version instead of the newest")
    p.set_defaults(func=run_path)

    p = actions.add_parser(
        "pack", help="zip a bundle for release and record it in a registry", formatter_class=raw,
        description=_fill("Write BUNDLE as a release archive (EMA weights only unless --keep-raw) with a model block "
        "(id, version, title, card) in its manifest and the model card inside. With --registry, create or "
        "update the entry ID there with the archive's sha256 and size (the other entries are kept); its url "
        "becomes --url, or the archive's path relative to the registry when written inside the registry's "
        "folder (an embedded model)."),
        epilog="example:\n  scorefusion models pack runs/t1sr/bundle --out Resources/models/t1-sr4-iso.zip \\\n"
        "      --id t1-sr4-iso --version 1.0.0 --card Resources/models/t1-sr4-iso.md --registry Resources/models.json",
    )
    p.add_argument("bundle", type=Path, metavar="BUNDLE", help="trained bundle folder")
    p.add_argument("--out", required=True, type=Path, metavar="ZIP", help="archive to write")
    p.add_argument("--id", dest="model_id", metavar="ID", help="model id (required with --registry unless the "
                   "bundle's manifest has one)")
    p.add_argument("--title", help="one-line title")
    p.add_argument("--version", metavar="V", help="semantic version of the weights, e.g. 1.0.0")
    p.add_argument("--card", type=Path, metavar="MODEL_CARD.md", help="markdown model card to put in the archive")
    p.add_argument("--registry", type=Path, metavar="FILE", help="registry JSON to create or update")
    p.add_argument("--url", help="public URL of the archive (for a remote registry entry)")
    p.add_argument("--description", help="registry description (a new entry defaults to the manifest's intended use)")
    p.add_argument("--license", help="registry license text")
    p.add_argument("--keep-raw", action="store_true", help="also pack the raw (non-EMA) weights")
    p.set_defaults(func=run_pack)

    p = actions.add_parser(
        "convert-monai-brats", help="turn MONAI zoo brats_mri_segmentation weights into a segmenter bundle",
        formatter_class=raw,
        description=_fill("Convert the checkpoint of the MONAI model zoo bundle brats_mri_segmentation (its "
        "models/model.pt, which you download yourself) into a ScoreFusion segmenter bundle for `scorefusion "
        "segment --model DIR`. The file is read with torch.load(weights_only=True) only, so a checkpoint holding "
        "arbitrary Python objects is refused; its tensor names and shapes are checked against the zoo's "
        "SegResNet, and the bundle records the file's sha256, the zoo's channel order (T1c, T1, T2, FLAIR), "
        "1 mm RAS preprocessing, 240x240x160 windows and BraTS 2018 labels (1, 2, 4). The weights' licence and "
        "the BraTS data terms remain your responsibility."),
        epilog="example:\n  scorefusion models convert-monai-brats brats_mri_segmentation/models/model.pt "
        "--out seg-monai/",
    )
    p.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="the zoo bundle's models/model.pt")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="segmenter bundle folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing segmenter bundle at DIR")
    p.set_defaults(func=run_convert_monai_brats)
    return parser


def _human_size(n: int) -> str:
    if n <= 0:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _imported_row(model) -> dict:
    """A listing row for an installed model that the registry does not describe."""
    from ..bundle import read_manifest
    from ..errors import ScoreFusionError

    row = {"id": model.id, "version": model.version, "installed": True, "path": str(model.path),
           "source": "imported", "size": model.size()}
    try:
        task = read_manifest(model.path).task
        inputs = [c for c in task.get("inputs", []) if c != task.get("target")]
        row.update(task=task.get("kind"), inputs=inputs, target=task.get("target"))
    except ScoreFusionError:
        row.update(task="?", inputs=[], target="?")
    return row


def _rows(args: argparse.Namespace) -> list[dict]:
    from ..registry.cache import installed_models
    from ..registry.catalog import load_registry

    registry = load_registry(args.registry)
    installed = {(m.id, m.version): m for m in installed_models()}
    rows = []
    for entry in registry:
        m = installed.pop((entry.id, entry.version), None)
        rows.append({**entry.to_dict(), "installed": m is not None, "path": str(m.path) if m else None,
                     "source": entry.source, "io": entry.io_summary()})
    for m in installed.values():
        row = _imported_row(m)
        sources = row["inputs"] or [row["target"]]
        rows.append({**row, "io": f"{'+'.join(sources)} -> {row['target']}"})
    if args.installed:
        rows = [r for r in rows if r["installed"]]
    return rows


def run_list(args: argparse.Namespace) -> int:
    """Print the registry's and the cache's models as a table or JSON."""
    rows = _rows(args)
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if k != "io"} for r in rows], indent=2, ensure_ascii=False))
        return 0
    if not rows:
        print("no models installed" if args.installed else "the registry lists no models")
        return 0
    header = ("ID", "TASK", "INPUTS -> TARGET", "VERSION", "SIZE", "INSTALLED", "SOURCE")
    table = [header] + [
        (r["id"], r["task"], r["io"], r["version"], _human_size(r["size"]), "yes" if r["installed"] else "no",
         r["source"])
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def run_download(args: argparse.Namespace) -> int:
    """Install one registry model and print its folder."""
    from ..errors import InputError
    from ..registry.cache import installed_path
    from ..registry.catalog import load_registry
    from ..registry.download import DEFAULT_TIMEOUT
    from ..registry.install import install_model

    if args.retries < 0:
        raise InputError("--retries must not be negative")
    if args.timeout is not None and args.timeout <= 0:
        raise InputError("--timeout must be positive")
    entry = load_registry(args.registry).get(args.id)
    if not args.force and installed_path(entry.id, entry.version) is not None:
        print(f"{entry.id} {entry.version} is already installed at {installed_path(entry.id, entry.version)}")
        return 0
    timeout = DEFAULT_TIMEOUT if args.timeout is None else (args.timeout, args.timeout)
    path = install_model(entry, force=args.force, timeout=timeout, retries=args.retries, progress=not args.quiet)
    print(f"installed {entry.id} {entry.version} at {path}")
    return 0


def run_import(args: argparse.Namespace) -> int:
    """Copy a bundle into the cache and print where it went."""
    from ..registry.install import import_bundle

    path = import_bundle(args.path, model_id=args.model_id, version=args.version, force=args.force)
    print(f"imported {args.path} as {path.parent.name} {path.name} at {path}")
    return 0


def run_remove(args: argparse.Namespace) -> int:
    """Delete installed model versions and list them."""
    from ..registry.cache import remove_model

    for path in remove_model(args.id, args.version):
        print(f"removed {args.id} {path.name} ({path})")
    return 0


def run_path(args: argparse.Namespace) -> int:
    """Print the cache root or an installed model's folder."""
    from ..registry.cache import cache_root, installed_path
    from ..registry.catalog import RegistryError, check_model_id

    if args.id is None:
        print(cache_root())
        return 0
    path = installed_path(check_model_id(args.id), args.version)
    if path is None:
        what = f"{args.id} {args.version}" if args.version else args.id
        raise RegistryError(f"model {what} is not installed; install it with: scorefusion models download {args.id}")
    print(path)
    return 0


def run_pack(args: argparse.Namespace) -> int:
    """Pack a bundle and report the archive's checksum (and the registry entry written)."""
    from ..registry.publish import pack_model
    from ..segmentation.model_bundle import is_segmenter_bundle

    if is_segmenter_bundle(args.bundle):
        return _pack_segmenter(args)
    result = pack_model(
        args.bundle, args.out, model_id=args.model_id, version=args.version, title=args.title, card=args.card,
        keep_raw=args.keep_raw, registry=args.registry, url=args.url, description=args.description,
        license=args.license,
    )
    print(f"wrote {result.archive} ({result.size} bytes, sha256 {result.sha256})")
    if result.entry is not None:
        print(f"updated {result.entry['id']} {result.entry['version']} in {args.registry} (url {result.entry['url']})")
    sys.stdout.flush()
    return 0


def _pack_segmenter(args: argparse.Namespace) -> int:
    """Segmenter bundles: EMA-only zip; their id and card come from training, and no registry lists them."""
    from ..errors import InputError
    from ..segmentation.packing import pack_segmenter

    given = [flag for flag, value in (("--registry", args.registry), ("--id", args.model_id), ("--title", args.title),
                                      ("--version", args.version), ("--card", args.card), ("--keep-raw", args.keep_raw))
             if value]
    if given:
        raise InputError(f"{args.bundle} is a segmenter bundle: {', '.join(given)} do not apply (its id and card "
                         "are set by 'train segmenter --model-id/--card'; segmenters are not registry models)")
    sha = pack_segmenter(args.bundle, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes, sha256 {sha})")
    return 0


def run_convert_monai_brats(args: argparse.Namespace) -> int:
    """Convert MONAI zoo weights into a segmenter bundle and say where it went."""
    from ..segmentation.model_bundle import read_segmenter_manifest
    from ..segmentation.zoo import convert_monai_brats

    path = convert_monai_brats(args.checkpoint, args.out, overwrite=args.overwrite)
    manifest = read_segmenter_manifest(path)
    print(f"wrote segmenter bundle {path} (weights sha256 {manifest.weights_sha256}, from {args.checkpoint.name} "
          f"sha256 {manifest.source['sha256']}); use it with: scorefusion segment --model {path}")
    return 0
