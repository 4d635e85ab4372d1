"""``scorefusion segment``: brain-tumour labels from four co-registered contrasts, one of them optionally synthesized.

Every check that can fail (files, flags, models, grids, intensities) runs before any network
does, and every output is written atomically; if anything fails, the files written by this run
are removed again, so an error never leaves a label map, probability map or provenance sidecar
behind. Labels are written as uint8 on the inputs' own grid with their IJK->RAS matrix.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import InputError

#: (canonical contrast, main flag, aliases), in the order messages list them.
CONTRAST_FLAGS = (
    ("t1n", "--t1", ("--t1n",)),
    ("t1c", "--t1ce", ("--t1c",)),
    ("t2w", "--t2", ("--t2w",)),
    ("t2f", "--flair", ("--t2f",)),
)
FLAG = {c: flag for c, flag, _ in CONTRAST_FLAGS}
#: Synthesis choices, as in ``translate.METHODS`` / ``translate.SAMPLERS`` (not imported here, so that
#: building the parser stays cheap; a test keeps them equal).
METHODS = ("auto", "score-fusion", "average", "tpdm", "single")
SAMPLERS = ("ddpm", "ddim", "dpmpp_2m")
#: Output formats a label map may be written in (a DICOM series is no label format).
LABEL_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
NOT_FOR_DIAGNOSIS = "AI-generated tumour segmentation for research; not for diagnosis."

DESCRIPTION = textwrap.fill(
    "Segment a brain tumour (BraTS TC/WT/ET regions, decoded into necrotic core, oedema and enhancing tumour) "
    "from co-registered T1, T1ce, T2 and FLAIR volumes with a segmenter bundle. The label map (uint8) lies "
    "exactly on the inputs' grid; a JSON provenance sidecar is written next to it. With --synthesize-missing, "
    "one contrast is synthesized from the others with a translation model first.", 88
)
EPILOG = """examples:
  scorefusion segment --t1 t1.nii.gz --t1ce t1ce.nii.gz --t2 t2.nii.gz --flair flair.nii.gz -o seg.nii.gz
  scorefusion segment --t1 t1.nii.gz --t1ce t1ce.nii.gz --t2 t2.nii.gz -o seg.nii.gz \\
      --synthesize-missing flair --translation-model MODEL --save-synthesized flair-syn.nii.gz
  scorefusion segment ... --model seg-monai/ --labels brats2021 --probabilities probs/
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``segment`` on the ``scorefusion`` command."""
    p = subparsers.add_parser("segment", help="segment a brain tumour from T1, T1ce, T2 and FLAIR",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    for contrast, flag, aliases in CONTRAST_FLAGS:
        p.add_argument(flag, *aliases, dest=contrast, type=Path, metavar="FILE",
                       help=f"{contrast} volume (.nii/.nii.gz, .nrrd, .mha or a DICOM folder)")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="FILE",
                   help=f"label map to write ({', '.join(LABEL_SUFFIXES)}); the sidecar is FILE's name with .json")
    p.add_argument("--model", default="default", metavar="SEG",
                   help="segmenter bundle folder (e.g. from `scorefusion models convert-monai-brats`), a segmenter "
                   "bundle .zip, or 'default' (the shipped demonstration segmenter)")
    p.add_argument("--labels", default="auto", choices=("auto", "brats2021", "brats2023"),
                   help="label convention: brats2021 (enhancing = 4) or brats2023 (enhancing = 3); auto: from "
                   "BraTS file names (BraTS2021_* -> brats2021, BraTS-GLI-* -> brats2023), else the model's")
    p.add_argument("--synthesize-missing", metavar="CONTRAST",
                   help="synthesize this contrast (not given) from the given ones with --translation-model")
    p.add_argument("--translation-model", metavar="MODEL",
                   help="translation model for --synthesize-missing: a model id, bundle folder or bundle .zip")
    p.add_argument("--save-synthesized", type=Path, metavar="FILE", help="also write the synthesized volume here")
    p.add_argument("--method", default="auto", choices=METHODS,
                   help="synthesis fusion mode (auto: score-fusion when the model has a fuser, else average)")
    p.add_argument("--sampler", default="ddpm", choices=SAMPLERS, help="synthesis sampler (default ddpm)")
    p.add_argument("--steps", type=int, default=50, help="synthesis sampling steps (default 50)")
    p.add_argument("--seed", type=int, default=0, help="synthesis seed (default 0)")
    p.add_argument("--probabilities", type=Path, metavar="DIR",
                   help="also write the TC, WT and ET probability maps (float32, input grid) into DIR")
    p.add_argument("--overlap", type=float, metavar="F",
                   help="sliding-window overlap in [0, 1) (default: the model's, usually 0.5)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


# -- checks done before any work ------------------------------------------------------------


def _given_inputs(args: argparse.Namespace) -> dict[str, Path]:
    return {c: getattr(args, c) for c, _, _ in CONTRAST_FLAGS if getattr(args, c, None) is not None}


def _label_outputs(args: argparse.Namespace) -> list[Path]:
    """Every file this run will write, after refusing impossible or colliding requests."""
    from ..volume_io import sidecar_path

    output = args.output
    if not output.name.lower().endswith(LABEL_SUFFIXES):
        raise InputError(f"-o/--output {output.name}: write the label map as one of {', '.join(LABEL_SUFFIXES)}")
    paths = [output, sidecar_path(output)]
    if args.save_synthesized is not None:
        if args.synthesize_missing is None:
            raise InputError("--save-synthesized needs --synthesize-missing")
        if not args.save_synthesized.name.lower().endswith(LABEL_SUFFIXES):
            raise InputError(f"--save-synthesized {args.save_synthesized.name}: use one of "
                             f"{', '.join(LABEL_SUFFIXES)}")
        paths += [args.save_synthesized, sidecar_path(args.save_synthesized)]
    if args.probabilities is not None:
        if args.probabilities.exists() and not args.probabilities.is_dir():
            raise InputError(f"--probabilities {args.probabilities} exists and is not a folder")
        paths += [args.probabilities / f"{region}.nii.gz" for region in ("TC", "WT", "ET")]
    for path in paths:
        if path.is_dir():
            raise InputError(f"output {path} is a folder; give a file name")
    resolved = [p.resolve() for p in paths]
    if len(set(resolved)) != len(resolved):
        raise InputError("two outputs would be written to the same file (the label map, --save-synthesized, their "
                         ".json sidecars and the --probabilities maps must all differ)")
    inputs = {p.resolve() for p in _given_inputs(args).values()}
    clash = [str(p) for p, r in zip(paths, resolved) if r in inputs]
    if clash:
        raise InputError(f"refusing to overwrite an input with an output: {', '.join(clash)}")
    return paths


def _translation_plan(args: argparse.Namespace, given: dict[str, Path], channels: Sequence[str]):
    """``(missing contrast, translation bundle folder, its task)`` or ``None``, checked against the inputs."""
    from ..bundle import read_manifest
    from ..data.records import canonical_contrast
    from ..data.task import TaskSpec
    from ..registry import resolve_model

    if args.synthesize_missing is None:
        if args.translation_model is not None:
            raise InputError("--translation-model is only used with --synthesize-missing CONTRAST")
        return None
    missing = canonical_contrast(args.synthesize_missing)
    if args.translation_model is None:
        raise InputError(f"--synthesize-missing {args.synthesize_missing} needs --translation-model MODEL")
    if missing not in channels:
        raise InputError(f"the segmenter does not use {missing} (its channels: {', '.join(channels)}); "
                         "nothing to synthesize")
    if missing in given:
        raise InputError(f"{FLAG.get(missing, missing)} is given and --synthesize-missing {args.synthesize_missing} "
                         "asks to synthesize it; give one or the other")
    absent = [FLAG.get(c, c) for c in channels if c != missing and c not in given]
    if absent:
        raise InputError(f"--synthesize-missing replaces one contrast; the others must be given (missing: "
                         f"{', '.join(absent)})")
    bundle = resolve_model(args.translation_model)
    spec = TaskSpec.from_dict(read_manifest(bundle).task)
    if spec.kind != "mt":
        raise InputError(f"translation model {args.translation_model} is a {spec.kind!r} model; synthesizing a "
                         "missing contrast needs a contrast-translation ('mt') model")
    if spec.target != missing:
        raise InputError(f"translation model {args.translation_model} synthesizes {spec.target}, not the missing "
                         f"{missing}")
    unavailable = [c for c in spec.inputs if c not in given]
    if unavailable:
        raise InputError(f"translation model {args.translation_model} needs {', '.join(spec.inputs)} as input; "
                         f"not given: {', '.join(FLAG.get(c, c) for c in unavailable)}")
    return missing, bundle, spec


def detect_label_convention(paths: Sequence[Path]) -> tuple[str | None, str | None]:
    """``(convention, file name)`` implied by BraTS file naming of ``paths``, or ``(None, None)``.

    Uses the dataset layer's case-id patterns and file suffixes (``BraTS2021_00000_t1.nii.gz``,
    ``BraTS-GLI-00000-000-t1n.nii.gz``), so the CLI and dataset discovery never disagree about
    what a name means. Raises :class:`InputError` when the names imply different conventions.
    """
    from ..data.brats import SCHEME_SEPARATOR, SCHEME_SUFFIXES, match_case_file
    from ..data.records import SCHEME_LABEL_CONVENTION, scheme_of_case_id

    found: dict[str, str] = {}
    for path in paths:
        name = path.name
        stem = name[:-len(".nii.gz")] if name.lower().endswith(".nii.gz") else name.rsplit(".", 1)[0]
        for scheme in ("brats2021", "brats2023"):
            case_id, sep, suffix = stem.rpartition(SCHEME_SEPARATOR[scheme])
            if (sep and suffix.lower() in SCHEME_SUFFIXES[scheme] and scheme_of_case_id(case_id) == scheme
                    and match_case_file(case_id, scheme, name) is not None):
                found.setdefault(SCHEME_LABEL_CONVENTION[scheme], name)
                break
    if len(found) > 1:
        raise InputError(f"the input names imply different label conventions ({', '.join(found.values())}); "
                         "choose one with --labels brats2021 or --labels brats2023")
    if not found:
        return None, None
    convention, name = next(iter(found.items()))
    return convention, name


def _load_inputs(given: dict[str, Path]) -> dict[str, Any]:
    """Load every input and refuse unusable ones, naming the flag and the file."""
    from ..errors import ScoreFusionError
    from ..volume import require_same_grid, require_usable_intensities
    from ..volume_io import load_volume

    volumes = {}
    for contrast, path in given.items():
        label = f"{FLAG[contrast]} {path.name}"
        try:
            volume = load_volume(path)
        except ScoreFusionError as exc:  # same type, but say which flag the file came from
            raise type(exc)(f"{FLAG[contrast]}: {exc}") from exc
        require_usable_intensities(volume.array, label)
        volumes[contrast] = volume
    require_same_grid({f"{FLAG[c]} {given[c].name}": v for c, v in volumes.items()})
    return volumes


def _sha256(path: Path) -> str | None:
    """sha256 of an input file (``None`` for a DICOM folder), so the sidecar identifies the exact data."""
    from ..bundle import sha256_file

    return sha256_file(path) if path.is_file() else None


def _bar(args: argparse.Namespace, desc: str, unit: str):
    """A tqdm bar on stderr and the progress callback that drives it."""
    from tqdm import tqdm

    bar = tqdm(total=None, desc=desc, unit=unit, file=sys.stderr, disable=args.quiet)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    return bar, progress


# -- the command ---------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Check everything, optionally synthesize the missing contrast, segment, then write all outputs."""
    from .. import __version__
    from ..labels import CONVENTIONS
    from ..segmentation.defaults import resolve_segmenter
    from ..segmentation.inference import segment
    from ..segmentation.model_bundle import load_segmenter
    from ..translate import resolve_device

    start = time.perf_counter()
    if args.overlap is not None and not 0.0 <= args.overlap < 1.0:
        raise InputError(f"--overlap must lie in [0, 1), got {args.overlap}")
    if args.steps < 1:
        raise InputError(f"--steps must be at least 1, got {args.steps}")
    outputs = _label_outputs(args)
    given = _given_inputs(args)
    if not given:
        raise InputError("give the input volumes: --t1, --t1ce, --t2 and --flair")
    for contrast, path in given.items():
        if not path.exists():
            raise InputError(f"{FLAG[contrast]}: no such file or folder: {path}")
    device = resolve_device(args.device)
    segmenter = load_segmenter(resolve_segmenter(args.model), device)  # validated completely before any work
    channels = segmenter.manifest.channels
    plan = _translation_plan(args, given, channels)
    absent = [FLAG.get(c, c) for c in channels if c not in given and (plan is None or c != plan[0])]
    if absent:
        raise InputError(f"the segmenter needs {', '.join(FLAG.get(c, c) for c in channels)}; missing: "
                         f"{', '.join(absent)} (or synthesize one with --synthesize-missing CONTRAST "
                         "--translation-model MODEL)")
    unused = [FLAG[c] for c in given if c not in channels]
    if unused:
        raise InputError(f"the segmenter does not use {', '.join(unused)} (its channels: {', '.join(channels)})")

    if args.labels == "auto":
        convention, evidence = detect_label_convention(list(given.values()))
        how = f"auto: from the file name {evidence}" if convention else "auto: the segmenter's default"
        convention = convention or segmenter.manifest.label_convention
    else:
        convention, how = args.labels, "--labels"

    volumes = _load_inputs(given)
    synthesis = None
    synthesized = None
    if plan is not None:
        synthesized, synthesis = _synthesize(args, plan, volumes, device)
        volumes[plan[0]] = synthesized

    bar, progress = _bar(args, "segmenting", "window")
    try:
        result = segment(volumes, segmenter, device=device, label_convention=convention, overlap=args.overlap,
                         progress=progress)
    finally:
        bar.close()

    m = segmenter.manifest
    provenance = {
        "software": f"ScoreFusion {__version__}",
        "command": "scorefusion segment",
        **({"argv": list(args.argv)} if getattr(args, "argv", None) is not None else {}),
        "inputs": {c: {"flag": FLAG[c], "file": str(p.resolve()), "sha256": _sha256(p)} for c, p in given.items()},
        "segmenter": {**result.provenance()["segmenter"], "path": str(segmenter.path.resolve()),
                      "layout": m.layout, "normalization": m.normalization, "source": m.source,
                      "license": m.license},
        "label_convention": convention,
        "label_convention_from": how,
        "labels": {name: value for name, value in CONVENTIONS[convention].items()},
        "synthesis": synthesis,
        "probabilities": ({r: str(args.probabilities / f"{r}.nii.gz") for r in result.probabilities}
                          if args.probabilities is not None else None),
        "device": device,
        "seconds": {"synthesis": synthesis["seconds"] if synthesis else 0.0,
                    "segmentation": round(result.seconds, 3), "total": round(time.perf_counter() - start, 3)},
        "intended_use": NOT_FOR_DIAGNOSIS,
    }
    _write(args, result, provenance, synthesized, synthesis, outputs)
    return 0


def _synthesize(args: argparse.Namespace, plan, volumes: dict, device: str):
    """The missing contrast synthesized from the given ones, zero outside the head, and its provenance."""
    from ..segmentation.preprocess import zero_outside_head
    from ..translate import SamplingOptions, synthesize

    missing, bundle, spec = plan
    options = SamplingOptions(method=args.method, sampler=args.sampler, steps=args.steps, seed=args.seed,
                              device=device)
    bar, progress = _bar(args, f"synthesizing {missing}", "step")
    try:
        result = synthesize({c: volumes[c] for c in spec.inputs}, bundle, options, progress=progress)
    finally:
        bar.close()
    # The segmenter z-scores each channel over its *nonzero* voxels, and the real (skull-stripped)
    # inputs are exactly 0 outside the head. A synthesized image has a nonzero background, so
    # without this its statistics would include the air around the head and its normalised
    # values inside the head would be shifted relative to what the segmenter was trained on.
    reals = list(volumes.values())
    volume = zero_outside_head(result.volume, reals)
    provenance = {**result.provenance, "contrast": missing, "translation_model": str(Path(bundle).resolve()),
                  "requested_model": str(args.translation_model),
                  "zeroed_where_all_given_inputs_are_zero": True,
                  "saved_to": str(args.save_synthesized) if args.save_synthesized is not None else None}
    return volume, provenance


def _write(args: argparse.Namespace, result, provenance: dict, synthesized, synthesis: dict | None,
           outputs: list[Path]) -> None:
    """Write every output atomically, the label map last; on failure remove what this run wrote."""
    import numpy as np

    from ..atomic import write_text_atomic
    from ..volume_io import save_volume, sidecar_path

    written: list[Path] = []
    new_folders: set[Path] = set()  # folders save_volume will create, removed again on failure
    for path in outputs:
        for folder in path.parents:
            if folder.exists():
                break
            new_folders.add(folder)
    try:
        if args.probabilities is not None:
            for region, volume in result.probabilities.items():
                path = args.probabilities / f"{region}.nii.gz"
                save_volume(volume.with_array(np.asarray(volume.array, dtype=np.float32)), path,
                            description=f"ScoreFusion {region} probability; not for diagnosis")
                written.append(path)
        if synthesized is not None and args.save_synthesized is not None:
            side = sidecar_path(args.save_synthesized)
            write_text_atomic(side, json.dumps(synthesis, indent=2) + "\n")
            written.append(side)
            save_volume(synthesized, args.save_synthesized,
                        description=f"AI-generated synthetic {synthesis['contrast']}; not for diagnosis")
            written.append(args.save_synthesized)
        sidecar = sidecar_path(args.output)
        write_text_atomic(sidecar, json.dumps(provenance, indent=2) + "\n")
        written.append(sidecar)
        labels = result.labels.with_array(np.asarray(result.labels.array, dtype=np.uint8))
        save_volume(labels, args.output, description="AI-generated tumour labels; not for diagnosis")
        written.append(args.output)
    except BaseException:
        for path in written:  # never leave maps or provenance for a label map that was not written
            path.unlink(missing_ok=True)
        # nor the folders made for them (deepest first; only those left empty)
        for folder in sorted(new_folders, key=lambda d: len(d.parts), reverse=True):
            try:
                folder.rmdir()
            except OSError:
                pass
        raise
    if not args.quiet:
        print(f"wrote {args.output} ({provenance['label_convention']} labels) and {sidecar_path(args.output)}")
