"""``scorefusion simulate``: write a cohort of simulated multi-contrast cases."""

from __future__ import annotations

import argparse
import sys
import textwrap

HELP = "write simulated T1w/T1c/T2w/FLAIR/PDw cases (optionally with tumours) from ICBM152 maps"

DESCRIPTION = textwrap.dedent(
    """\
    Simulate co-registered MRI contrasts from the real ICBM152 2009a tissue maps shipped
    in the nilearn wheel (install with: pip install --no-deps nilearn==0.14.1), using
    spin-echo and inversion-recovery signal equations, per-case jittered relaxation
    times, a smooth random deformation, bias fields, global gain and Rician noise.

    Output (every file is marked SIMULATED in its NIfTI description):
      OUT/ScoreFusionSim-00001/ScoreFusionSim-00001-{t1n,t1c,t2w,t2f,pdw}.nii.gz
      OUT/ScoreFusionSim-00001/ScoreFusionSim-00001-seg.nii.gz   (with --tumor)
      OUT/ScoreFusionSim-00001/ScoreFusionSim-00001.json         (all sampled parameters)

    Case k depends only on (--seed, k): the same seed gives identical files.
    Grid: ceil(197x233x189 mm / SPACING) voxels covering the ICBM box, cell-centred
    (1 mm: 197x233x189, 2 mm: 99x117x95); tissue maps are block-averaged to it.
    """
)

EPILOG = "example: scorefusion simulate --out sim --cases 5 --seed 0 --tumor --spacing 2"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``simulate`` on the ``scorefusion`` command."""
    parser = subparsers.add_parser(
        "simulate",
        help=HELP,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created if needed)")
    parser.add_argument("--cases", type=int, default=1, metavar="N", help="number of cases (default 1)")
    parser.add_argument(
        "--seed", type=int, default=0, metavar="S", help="cohort seed, a non-negative integer (default 0)"
    )
    parser.add_argument(
        "--start", type=int, default=1, metavar="K",
        help="index of the first case, to extend a cohort (default 1 = ScoreFusionSim-00001)",
    )
    parser.add_argument("--tumor", action="store_true", help="add a synthetic tumour and write its -seg map")
    parser.add_argument(
        "--spacing", type=float, default=1.0, metavar="MM",
        help="isotropic voxel size in mm, 1 to 8 (default 1.0, the ICBM grid)",
    )
    parser.add_argument(
        "--convention", choices=("brats2023", "brats2021"), default="brats2023",
        help="label values of the -seg map: brats2023 (1 NETC, 2 SNFH, 3 ET; default) "
        "or brats2021 (1 NCR, 2 ED, 4 ET)",
    )
    parser.add_argument("--no-deform", action="store_true", help="keep the ICBM anatomy undeformed")
    parser.add_argument(
        "--no-noise", action="store_true",
        help="no Rician noise: the background outside the (skull-stripped) brain stays exactly zero",
    )
    parser.add_argument(
        "--no-mass-effect", action="store_true", help="do not push tissue away from the tumour"
    )
    parser.add_argument(
        "--t1-source", choices=("simulated", "icbm"), default="simulated",
        help="simulated: T1w from the signal equation (default); icbm: the real ICBM152 T1 under the "
        "case's deformation, bias field and noise (real anatomy contrast; no --tumor)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing case folders")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Simulate the cohort and print where it went."""
    from ..simulator import write_cohort

    folders = write_cohort(
        args.out,
        args.cases,
        args.seed,
        spacing=args.spacing,
        tumor=args.tumor,
        convention=args.convention,
        deform=not args.no_deform,
        noise=not args.no_noise,
        mass_effect=not args.no_mass_effect,
        t1_source=args.t1_source,
        overwrite=args.overwrite,
        first_index=args.start,
        progress=not args.quiet,
    )
    noun = "case" if len(folders) == 1 else "cases"
    print(f"wrote {len(folders)} simulated {noun} to {folders[0].parent}:")
    for folder in folders:
        print(f"  {folder}")
    sys.stdout.flush()
    return 0
