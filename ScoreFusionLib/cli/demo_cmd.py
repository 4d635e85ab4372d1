"""``scorefusion demo``: run the embedded default models on the real ICBM152 T1 and a simulated case."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DESCRIPTION = """\
Run the embedded default models end to end and compare them with non-learned baselines:

  sr4    the real ICBM152 T1 (nilearn wheel, 2 mm) average-pooled x4, super-resolved by
         trilinear interpolation, the plane average and Score-Fusion (model t1-sr4-iso);
  flair  FLAIR synthesised from the T1w of a SIMULATED case, next to the best linear
         intensity mapping of the T1w fitted against the truth (model t1-to-flair).

Writes OUT/<task>/*.nii.gz, each with a JSON provenance sidecar (model id and sha256,
method, sampler, steps, seed, package version), OUT/summary.json (PSNR, SSIM and seconds
per task and method) and OUT/comparison.png (input, each method and the ground truth in
three planes, with error maps). Demonstration models; not for diagnosis.
"""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "demo", help="run the default models on sample data and compare methods",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: scorefusion demo --out demo_output/",
    )
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder (must not exist)")
    parser.add_argument("--steps", type=int, default=None,
                        help="sampling steps for every model (default: each model's registry default)")
    parser.add_argument("--sampler", choices=("ddpm", "ddim", "dpmpp_2m"), default=None,
                        help="sampler for every model (default: each model's registry default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling noise (default 0)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..demo import DemoOptions, run_demo
    from ..demo.runner import print_report
    from ..errors import InputError

    if args.steps is not None and args.steps < 1:
        raise InputError(f"--steps must be at least 1, got {args.steps}")

    def progress(label: str, total: int):
        bar = tqdm(total=total, desc=label, unit="step", file=sys.stderr, disable=args.no_progress, leave=False)

        def update(done: int, total_steps: int) -> None:
            bar.total = total_steps
            bar.n = done
            bar.refresh()
            if done >= total_steps:
                bar.close()

        return update

    options = DemoOptions(out=args.out, steps=args.steps, sampler=args.sampler, seed=args.seed, device=args.device,
                          overwrite=args.overwrite)
    print_report(run_demo(options, progress))
    return 0
