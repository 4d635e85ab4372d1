"""``scorefusion super-resolve`` and ``scorefusion synthesize``: translate one volume with a bundle.

Each run writes the output volume and, next to it, a JSON provenance sidecar (bundle and
weight hashes, method, sampler, steps, seed, normalisation, timing). Both are written
atomically: an interrupted or failed run leaves no output file behind.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import InputError

METHOD_HELP = ("how the plane models are combined: score-fusion (the trained 3D fuser; the default when the bundle "
               "has one), average (TOSM/MADM; the default otherwise), tpdm (one plane per step) or single")


def _add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", required=True, type=Path, help="output volume (.nii.gz, .nrrd, .mha, ...)")
    parser.add_argument("--model", required=True, metavar="MODEL",
                        help="a model id from `scorefusion models list` (embedded models install on first use), "
                             "a bundle folder or a bundle .zip")
    parser.add_argument("--method", default="auto", choices=("auto", "score-fusion", "average", "tpdm", "single"),
                        help=METHOD_HELP)
    parser.add_argument("--plane", choices=("axial", "coronal", "sagittal"), help="plane used by --method single")
    parser.add_argument("--sampler", default="ddpm", choices=("ddpm", "ddim", "dpmpp_2m"),
                        help="ddpm = respaced ancestral, the paper's and our default; ddim / dpmpp_2m are "
                        "deterministic and only reliable with well-trained models (see docs/sampling.md)")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (default 50, as in the paper)")
    parser.add_argument("--time-grid", default="default", choices=("default", "logsnr"),
                        help="default: the sampler's own grid (respaced for ddpm, uniform for ddim/dpmpp_2m); "
                        "logsnr: steps uniform in log-SNR where the signal is visible (fewer wasted steps)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity (0 = deterministic)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise and of the TPDM plane choice")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--slice-batch", type=int, default=8, help="slices per plane-model call (memory bound)")
    parser.add_argument("--weights", default="ema", choices=("ema", "raw"), help="plane weights to use")
    parser.add_argument("--tile-size", type=int, metavar="N",
                        help="score-fusion: fuser tile side in voxels (multiple of 8); default: the largest tile "
                        "that fits --max-memory")
    parser.add_argument("--max-memory", type=float, metavar="GB",
                        help="score-fusion: memory the fuser may use per tile (default: half the free GPU memory, "
                        "or half the available RAM on CPU)")
    parser.add_argument("--samples", type=int, default=1, metavar="K",
                        help="draw K samples (seeds SEED..SEED+K-1); the output is their mean")
    parser.add_argument("--uncertainty", type=Path, metavar="FILE",
                        help="with --samples K >= 2: write the voxel-wise standard deviation of the samples here")
    parser.add_argument("--amp", default="auto", choices=("auto", "none", "bf16", "fp16"),
                        help="mixed precision of the networks on CUDA (auto: bf16 where supported); the sampler "
                        "itself always computes in float32")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``super-resolve`` and ``synthesize``."""
    sr = subparsers.add_parser(
        "super-resolve",
        help="super-resolve a volume with an SR bundle",
        description="Super-resolve INPUT onto the cell-centred grid of the bundle's factor. The output "
        "keeps the input's physical extent and orientation; data consistency (re-degrading the output "
        "gives the input back) is on by default.",
    )
    sr.add_argument("input", type=Path, help="low-resolution volume (.nii/.nii.gz, .nrrd, .mha or a DICOM folder)")
    group = sr.add_mutually_exclusive_group()
    group.add_argument("--factor", type=int, nargs="+", metavar="F",
                       help="SR factor, one number or one per input i j k axis (must match the bundle)")
    group.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"),
                       help="target spacing in mm along the input's i j k axes (must match the bundle)")
    sr.add_argument("--input", dest="extra", action="append", default=[], metavar="CONTRAST=PATH",
                    help="extra condition of a 'both' bundle, already on the super-resolved grid")
    sr.add_argument("--no-consistency", action="store_true", help="turn the data-consistency projection off")
    sr.add_argument("--consistency-strength", type=float, default=1.0,
                    help="soft projection in [0, 1] for noisy real data (default 1 = exact)")
    _add_sampling_arguments(sr)
    sr.set_defaults(func=run_super_resolve)

    syn = subparsers.add_parser(
        "synthesize",
        help="synthesise a missing contrast with an MT bundle",
        description="Synthesise the bundle's target contrast from the given contrasts. The output lies "
        "exactly on the input grid; its intensities are synthetic (arbitrary units, mapped through the "
        "first input's range).",
    )
    syn.add_argument("--input", dest="inputs", action="append", required=True, metavar="CONTRAST=PATH",
                     help="an input contrast, e.g. --input t1=A.nii.gz (repeat for several)")
    syn.add_argument("--target", required=True, help="contrast to synthesise (must be the bundle's target)")
    _add_sampling_arguments(syn)
    syn.set_defaults(func=run_synthesize)


def _parse_inputs(items: list[str]) -> dict[str, Path]:
    from ..data.records import canonical_contrast

    out: dict[str, Path] = {}
    for item in items:
        if "=" not in item:
            raise InputError(f"--input expects CONTRAST=PATH, got {item!r}")
        name, path = item.split("=", 1)
        key = canonical_contrast(name)
        if key in out:
            raise InputError(f"contrast {name!r} is given twice")
        out[key] = Path(path)
    return out


def _options(args: argparse.Namespace, consistency: bool = True, strength: float = 1.0):
    from ..translate import SamplingOptions

    return SamplingOptions(
        method=args.method, sampler=args.sampler, steps=args.steps, time_grid=args.time_grid, eta=args.eta,
        seed=args.seed,
        device=args.device, slice_batch=args.slice_batch, plane=args.plane, consistency=consistency,
        consistency_strength=strength, weights=args.weights, tile_size=args.tile_size, max_memory_gb=args.max_memory,
        samples=args.samples, amp=args.amp,
    )


def _run_with_progress(args: argparse.Namespace, fn):
    from tqdm import tqdm

    bar = tqdm(total=args.steps * args.samples, desc=f"{args.method} / {args.sampler}", unit="step", file=sys.stderr,
               disable=args.no_progress)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        return fn(progress)
    finally:
        bar.close()


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse impossible output requests before any work is done."""
    if args.samples < 1:
        raise InputError(f"--samples must be at least 1, got {args.samples}")
    if args.uncertainty is not None and args.samples < 2:
        raise InputError("--uncertainty needs --samples K with K >= 2 (the spread of one sample is undefined)")
    for path in (args.output, args.uncertainty):
        if path is not None and path.exists() and path.is_dir():
            raise InputError(f"output {path} is a folder; give a file name")
    if args.uncertainty is not None and args.uncertainty.resolve() == args.output.resolve():
        raise InputError("--uncertainty must name a different file than --output")


def _write(result, args: argparse.Namespace, description: str) -> None:
    from ..atomic import write_text_atomic
    from ..volume_io import save_volume, sidecar_path

    output = args.output
    sidecar = sidecar_path(output)
    write_text_atomic(sidecar, json.dumps(result.provenance, indent=2) + "\n")
    written = [sidecar]
    try:
        if args.uncertainty is not None:
            save_volume(result.uncertainty, args.uncertainty,
                        description=f"ScoreFusion sample standard deviation, {args.samples} samples")
            written.append(args.uncertainty)
        save_volume(result.volume, output, description=description)
    except BaseException:
        for path in written:  # never leave provenance or a spread map for an output that was not written
            path.unlink(missing_ok=True)
        raise
    extra = f", {args.uncertainty}" if args.uncertainty is not None else ""
    print(f"wrote {output}{extra} and {sidecar}")


def run_super_resolve(args: argparse.Namespace) -> int:
    from ..registry import resolve_model
    from ..translate import super_resolve
    from ..volume_io import load_volume

    if not 0.0 <= args.consistency_strength <= 1.0:
        raise InputError(f"--consistency-strength must lie in [0, 1], got {args.consistency_strength}")
    _check_outputs(args)
    args.model = resolve_model(args.model)
    volume = load_volume(args.input)
    extra = {c: load_volume(p) for c, p in _parse_inputs(args.extra).items()}
    factor = args.factor[0] if args.factor and len(args.factor) == 1 else args.factor
    if args.factor and len(args.factor) not in (1, 3):
        raise InputError("--factor takes one number or three (i j k)")
    options = _options(args, not args.no_consistency, args.consistency_strength)
    result = _run_with_progress(args, lambda progress: super_resolve(
        volume, args.model, options, factor=factor, spacing=args.spacing, extra_inputs=extra, progress=progress))
    _write(result, args, "AI-generated ScoreFusion super-resolution; not for diagnosis")
    return 0


def run_synthesize(args: argparse.Namespace) -> int:
    from ..bundle import read_manifest
    from ..data.records import canonical_contrast
    from ..registry import resolve_model
    from ..translate import synthesize
    from ..volume_io import load_volume

    args.model = resolve_model(args.model)
    manifest = read_manifest(args.model)
    target = canonical_contrast(args.target)
    if canonical_contrast(manifest.task["target"]) != target:
        raise InputError(f"the bundle synthesises {manifest.task['target']!r}, not {args.target!r}")
    _check_outputs(args)
    inputs = {c: load_volume(p) for c, p in _parse_inputs(args.inputs).items()}
    options = _options(args)
    result = _run_with_progress(args, lambda progress: synthesize(inputs, args.model, options, progress=progress))
    _write(result, args, f"AI-generated synthetic {target} (arbitrary units); not for diagnosis")
    return 0
