"""``scorefusion evaluate-downstream``: does filling a missing contrast by synthesis help tumour segmentation?

The library side is :mod:`ScoreFusionLib.segmentation.downstream`; this module only turns
arguments into :class:`~ScoreFusionLib.segmentation.downstream.DownstreamOptions`, shows a progress
bar on stderr and prints the markdown summary on stdout. The library is imported when the command
runs, not when the parser is built, so every ``scorefusion`` call stays fast; method, contrast,
split and sampler names are therefore validated (with the valid choices listed) by the library.
"""

from __future__ import annotations

import argparse
import sys
import textwrap

HELP = "segment held-out cases with a missing contrast real, zero-filled, replaced or synthesised (Dice, HD95)"

DESCRIPTION = textwrap.dedent(
    """\
    Measure whether contrast synthesis helps tumour segmentation. Every case of the held-out
    split of DATA is segmented once per method with the segmenter's channels (t1n, t1c, t2w,
    t2f); only the --missing contrast differs between methods:

      real            the real contrast (the upper bound)
      zero-filled     an all-zero volume (the segmenter's "absent" input)
      other-contrast  another real contrast of the case (--replacement; default
                      t2f->t2w, t2w->t2f, t1c->t1n, t1n->t1c)
      average         synthesised by --translation-model with the plane average
      score-fusion    synthesised by --translation-model with its learned fuser

    The translation model must synthesise the missing contrast (an mt bundle whose target is
    --missing). Cases are loaded on its training grid (centred crop/pad, RAS) so it sees what
    it was trained on; synthesised volumes are set to 0 outside the head (voxels where every
    real input is 0) because the segmenter normalises each channel over its nonzero voxels.
    Test cases that trained either model are refused.

    Metrics per case and method: Dice of WT, TC and ET and HD95 in mm (infinite when one
    mask is empty: stored as null, counted, left out of the mean); per method the mean and
    std, and the mean per-case Dice difference to zero-filled.

    Output in --out: per_case.csv, summary.json (configuration, case ids, model paths and
    manifest sha256, sampling settings, protocol) and summary.md (the table printed at the
    end); with --save-volumes also labels/CASE_METHOD.nii.gz. Every file is written atomically.
    """
)

EPILOG = textwrap.dedent(
    """\
    examples:
      scorefusion evaluate-downstream --data sim --missing flair --translation-model t1-to-flair \\
          --steps 20 --out downstream-flair
      scorefusion evaluate-downstream --data BraTS2021 --missing t2f --segmenter my-segmenter/ \\
          --methods real,zero-filled,other-contrast --out downstream-baselines
    """
)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``evaluate-downstream`` on the ``scorefusion`` command."""
    p = subparsers.add_parser("evaluate-downstream", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data and models")
    g.add_argument("--data", required=True, metavar="DIR_OR_MANIFEST",
                   help="labelled dataset folder (BraTS or ScoreFusionSim layout) or a .csv/.json manifest")
    g.add_argument("--missing", required=True, metavar="C",
                   help="the contrast to leave out and fill in: t1n, t1c, t2w or t2f (aliases t1, t1ce, t2, flair)")
    g.add_argument("--translation-model", default=None, metavar="M",
                   help="model id, bundle folder or bundle .zip synthesising --missing (needed by average and "
                        "score-fusion); its grid and training cases also apply to the other methods")
    g.add_argument("--segmenter", default="default", metavar="S",
                   help="segmenter bundle folder or .zip, or 'default' for the shipped one (default)")
    g.add_argument("--split", default="test",
                   help="test (default): the held-out last --val-fraction of the cases sorted by id, as in "
                        "training; train: the rest; all: every case")
    g.add_argument("--val-fraction", type=float, default=0.2, metavar="F",
                   help="held-out share used in training (default 0.2, the paper split)")
    g.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate only the first N cases")

    g = p.add_argument_group("methods and sampling")
    g.add_argument("--methods", default="real,zero-filled,other-contrast,average,score-fusion", metavar="M[,M...]",
                   help="comma-separated methods, run in this order for each case (default: all five, "
                        "real,zero-filled,other-contrast,average,score-fusion)")
    g.add_argument("--replacement", default=None, metavar="C",
                   help="other-contrast's stand-in (default t2f->t2w, t2w->t2f, t1c->t1n, t1n->t1c)")
    g.add_argument("--steps", type=int, default=50, help="sampling steps of the synthesis methods (default 50)")
    g.add_argument("--sampler", default="ddpm", help="ddpm (default, the paper's), ddim or dpmpp_2m")
    g.add_argument("--time-grid", default="default", help="default (the sampler's own) or logsnr")
    g.add_argument("--seed", type=int, default=0, help="seed shared by both synthesis methods (default 0)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N for synthesis and segmentation")

    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, metavar="DIR", help="folder for the results (must be empty or new)")
    g.add_argument("--save-volumes", action="store_true", help="also write every label map")
    g.add_argument("--overwrite", action="store_true",
                   help="allow a non-empty --out; a previous run's outputs in it are removed first")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def options_from_args(args: argparse.Namespace):  # -> DownstreamOptions
    """The :class:`DownstreamOptions` these arguments describe."""
    from ..segmentation.downstream import DownstreamOptions

    return DownstreamOptions(
        data=args.data, missing=args.missing, translation_model=args.translation_model, segmenter=args.segmenter,
        methods=args.methods, replacement=args.replacement, split=args.split, val_fraction=args.val_fraction,
        limit=args.limit, steps=args.steps, sampler=args.sampler, time_grid=args.time_grid, seed=args.seed,
        device=args.device, out=args.out, save_volumes=args.save_volumes, overwrite=args.overwrite,
    )


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..segmentation.downstream import evaluate_downstream

    options = options_from_args(args)
    bar = tqdm(total=0, desc="evaluate-downstream", unit="run", file=sys.stderr, disable=args.quiet)

    def progress(done: int, total: int, label: str) -> None:
        bar.total = total
        bar.n = done
        bar.set_postfix_str(label, refresh=False)
        bar.refresh()

    try:
        report = evaluate_downstream(options, progress=progress)
    finally:
        bar.close()
    print(report.markdown, end="")
    if not args.quiet:
        print(f"wrote per_case.csv, summary.json and summary.md to {report.out}", file=sys.stderr)
    return 0
