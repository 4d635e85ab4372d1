"""``scorefusion evaluate``: run methods side by side on a held-out split and tabulate the metrics.

The library side is :mod:`ScoreFusionLib.evaluation`; this module only turns arguments into
:class:`~ScoreFusionLib.evaluation.EvaluationOptions`, shows a progress bar on stderr and prints
the markdown summary on stdout. The library is imported when the command runs, not when the
parser is built, so every ``scorefusion`` call stays fast; names of methods, splits and samplers
are therefore validated (with the valid choices listed) by the library, not by argparse.
"""

from __future__ import annotations

import argparse
import sys
import textwrap

from ..errors import InputError

HELP = "compare interpolation baselines and fusion modes on a held-out split (PSNR, SSIM, MMD, cost)"

DESCRIPTION = textwrap.dedent(
    """\
    Evaluate methods side by side on the cases of DATA, loaded exactly as training loaded
    them (the bundle's grid by centred crop/pad, reoriented to RAS). SR inputs are the
    ground truth degraded by the task's operator; MT inputs are the case's other contrasts.
    Model methods share one seed, sampler and step count.

    Methods: the interpolation baselines nearest, trilinear and bspline (SR only, no model
    needed) and the fusion modes single, tpdm, average and score-fusion of one --model bundle.

    Metric protocol (method.md 8.1): result and ground truth are mapped with the ground
    truth's min/max (result not clipped); PSNR over the whole volume with peak 1; SSIM with
    scikit-image's 3D defaults; "fg" variants over the foreground (gt > min); linear MMD
    over all evaluated volumes of a method (compare only at one grid); seconds and peak
    memory (CUDA: allocated tensors; CPU: resident-set increase, rough) per method call.

    Output in --out: per_case.csv (one row per case and method), summary.json
    (mean/std per method, MMD, configuration, bundle manifest sha256, case ids) and
    summary.md (the table printed at the end); with --save-volumes also
    volumes/CASE_METHOD.nii.gz. Every file is written atomically.
    """
)

EPILOG = textwrap.dedent(
    """\
    examples:
      scorefusion evaluate --data BraTS2021 --model bundle-sr --steps 50 --out eval-sr \\
          --methods nearest,trilinear,bspline,tpdm,average
      scorefusion evaluate --data sim --task sr --target t2f --factor 4 --grid 48 56 48 \\
          --methods nearest,trilinear,bspline --out eval-interp
    """
)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``evaluate`` on the ``scorefusion`` command."""
    p = subparsers.add_parser("evaluate", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data and task")
    g.add_argument("--data", required=True, metavar="DIR_OR_MANIFEST",
                   help="dataset folder (BraTS or ScoreFusionSim layout) or a .csv/.json manifest")
    g.add_argument("--split", default="test",
                   help="test (default): the held-out last --val-fraction of the cases sorted by id, as in "
                        "training; train: the rest; all: every case")
    g.add_argument("--val-fraction", type=float, default=0.2, metavar="F",
                   help="held-out share used in training (default 0.2, the paper split)")
    g.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate only the first N cases")
    g.add_argument("--model", default=None, metavar="MODEL",
                   help="model id, bundle folder or bundle .zip; its task and grid define the evaluation "
                        "(needed by model methods)")
    g.add_argument("--task", choices=("sr", "mt", "both"), default=None,
                   help="with --model: must agree with the bundle; without: only 'sr' (with --target, --factor)")
    g.add_argument("--target", default=None, metavar="C", help="without --model: the contrast to super-resolve")
    g.add_argument("--factor", default=None, metavar="N|I,J,K",
                   help="without --model: average-pool SR factor, isotropic or per RAS axis I,J,K")
    g.add_argument("--grid", nargs="+", default=None, metavar="N",
                   help="model grid I J K (RAS) reached by centred crop/pad, or 'native' (default: the "
                        "bundle's recorded grid, else native; e.g. 192 192 152 for the BraTS paper grid)")

    g = p.add_argument_group("methods and sampling")
    g.add_argument("--methods", required=True, metavar="M[,M...]",
                   help="comma-separated methods, run in this order: nearest, trilinear, bspline, single, "
                        "tpdm, average, score-fusion")
    g.add_argument("--steps", type=int, default=50, help="sampling steps of model methods (default 50, the paper)")
    g.add_argument("--sampler", default="ddpm", help="ddpm (default, the paper's), ddim or dpmpp_2m")
    g.add_argument("--time-grid", default="default", help="default (the sampler's own) or logsnr")
    g.add_argument("--seed", type=int, default=0, help="seed shared by all model methods (default 0)")
    g.add_argument("--samples", type=int, default=1, metavar="K",
                   help="model methods draw K samples per case (seeds SEED..SEED+K-1) and are scored on their "
                        "mean, as `super-resolve --samples K` writes it (default 1, the paper)")
    g.add_argument("--tile-size", type=int, default=None, metavar="N",
                   help="score-fusion: fuser tile side in voxels (default: from --max-memory)")
    g.add_argument("--max-memory", type=float, default=None, metavar="GB",
                   help="score-fusion: memory the fuser may use per tile (default: half the free memory)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    g.add_argument("--no-consistency", action="store_true",
                   help="turn the SR data-consistency projection off (the paper runs baselines without it)")

    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, metavar="DIR", help="folder for the results (must be empty or new)")
    g.add_argument("--save-volumes", action="store_true", help="also write every result volume")
    g.add_argument("--overwrite", action="store_true",
                   help="allow a non-empty --out; a previous evaluation's outputs in it are removed first")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def _task_without_model(args: argparse.Namespace):  # -> TaskSpec
    from ..data.task import TaskSpec
    from ..degradation import AveragePool
    from ..train.options import parse_factors

    if args.task != "sr" or args.target is None or args.factor is None:
        raise InputError("without --model only interpolation baselines run; give --task sr --target C --factor N")
    return TaskSpec(kind="sr", inputs=[], target=args.target, degradation=AveragePool(list(parse_factors(args.factor))))


def _check_task_with_model(args: argparse.Namespace) -> None:
    from ..bundle import read_manifest

    if args.target is not None or args.factor is not None:
        raise InputError("--target and --factor describe a task without a model; with --model the bundle's "
                         "task is used")
    kind = read_manifest(args.model).task["kind"]
    if args.task is not None and args.task != kind:
        raise InputError(f"--task {args.task} disagrees with the bundle {args.model}, a '{kind}' model")


def options_from_args(args: argparse.Namespace):  # -> EvaluationOptions
    """The :class:`EvaluationOptions` these arguments describe."""
    from ..evaluation import EvaluationOptions
    from ..train.options import parse_grid

    task = None
    if args.model is None:
        task = _task_without_model(args)
    else:
        from ..registry import resolve_model

        args.model = resolve_model(args.model)
        _check_task_with_model(args)
    return EvaluationOptions(
        data=args.data, methods=args.methods, bundle=args.model, task=task, grid=parse_grid(args.grid),
        split=args.split, val_fraction=args.val_fraction, steps=args.steps, sampler=args.sampler,
        time_grid=args.time_grid, seed=args.seed, device=args.device, consistency=not args.no_consistency,
        samples=args.samples, tile_size=args.tile_size, max_memory_gb=args.max_memory, limit=args.limit,
        out=args.out, save_volumes=args.save_volumes, overwrite=args.overwrite,
    )


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..evaluation import evaluate

    options = options_from_args(args)
    bar = tqdm(total=0, desc="evaluate", unit="run", file=sys.stderr, disable=args.quiet)

    def progress(done: int, total: int, label: str) -> None:
        bar.total = total
        bar.n = done
        bar.set_postfix_str(label, refresh=False)
        bar.refresh()

    try:
        report = evaluate(options, progress=progress)
    finally:
        bar.close()
    print(report.markdown, end="")
    if not args.quiet:
        print(f"wrote per_case.csv, summary.json and summary.md to {report.out}", file=sys.stderr)
    return 0
