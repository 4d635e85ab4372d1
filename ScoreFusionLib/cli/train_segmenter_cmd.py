"""``scorefusion train segmenter``: train a SegResNet brain-tumour segmenter into a segmenter bundle.

Registered as a stage of ``scorefusion train`` (see :mod:`.train_cmd`).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import textwrap

DESCRIPTION = textwrap.dedent(
    """\
    Train a brain-tumour segmenter (MONAI SegResNet, sigmoid outputs TC, WT, ET) on labelled
    cases (BraTS 2021/2023 or ScoreFusionSim folders, or a .csv/.json manifest) and write a
    segmenter bundle: OUT/segmenter.safetensors (raw + EMA weights) and OUT/manifest.json
    (channels, voxel size, normalisation, window, label convention, held-out Dice, provenance).

    Cases are sorted by id and the last --val-fraction are held out, as for the plane models,
    so a segmenter and a translation model trained on one data set share their test cases.
    Each step draws --batch-size random crops (tumour-centred with probability
    --tumour-fraction), flipped left-right at random, with per-channel intensity jitter; loss
    soft Dice + BCE; Adam; EMA weights for inference. 'torchrun --nproc_per_node N' splits each
    step's crops over N processes (DDP; gloo on CPU, nccl on CUDA) and trains on the same crops
    as one process with the same --batch-size.
    """
)

EPILOG = textwrap.dedent(
    """\
    examples:
      scorefusion train segmenter --data sim-tumour --grid 72 88 72 --crop-size 48 --steps 1200 --out seg
      torchrun --nproc_per_node 4 -m ScoreFusionLib train segmenter --data BraTS2021 --preset monai-brats \\
          --crop-size 128 --batch-size 8 --steps 40000 --out seg-brats
    """
)


def add_segmenter_parser(stages: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``segmenter`` stage on ``scorefusion train``."""
    from ..segmentation.network import PRESETS
    from ..segmentation.training import SegmenterTrainingOptions

    d = SegmenterTrainingOptions(data="", out="")
    p = stages.add_parser("segmenter", help="train a brain-tumour segmenter (SegResNet) into a segmenter bundle",
                          description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, metavar="DIR_OR_MANIFEST", help="labelled cases (folder or manifest)")
    g.add_argument("--channels", default=",".join(d.channels), metavar="C,C,C,C",
                   help=f"input contrasts in network order (default {','.join(d.channels)})")
    g.add_argument("--grid", nargs=3, type=int, default=None, metavar=("I", "J", "K"),
                   help="common grid reached by centred crop/pad after reorientation to RAS (default: each case's "
                        "own grid)")
    g.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help=f"share of cases held out, last by sorted id (default {d.val_fraction})")
    g = p.add_argument_group("network and optimisation")
    g.add_argument("--preset", choices=tuple(PRESETS), default=d.preset,
                   help=f"network size (default {d.preset}; monai-brats = the MONAI model zoo's architecture)")
    g.add_argument("--crop-size", type=int, default=d.crop_size,
                   help=f"training crop side in voxels, also the inference window (default {d.crop_size})")
    g.add_argument("--tumour-fraction", type=float, default=d.tumour_fraction,
                   help=f"share of crops centred on a tumour voxel (default {d.tumour_fraction})")
    g.add_argument("--steps", type=int, default=d.steps, help=f"optimiser steps (default {d.steps})")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"crops per step over all processes (default {d.batch_size})")
    g.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate (default {d.lr})")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"default {d.weight_decay}")
    g.add_argument("--ema-decay", type=float, default=d.ema_decay, help=f"default {d.ema_decay}")
    g.add_argument("--seed", type=int, default=d.seed, help=f"run seed (default {d.seed})")
    g = p.add_argument_group("run")
    g.add_argument("--out", required=True, metavar="BUNDLE_DIR", help="segmenter bundle folder to write")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out once the new bundle is done")
    g.add_argument("--card", default=None, metavar="MD", help="model card (Markdown) to store in the bundle")
    g.add_argument("--model-id", default=None, metavar="ID", help="model id recorded in the manifest")
    g.add_argument("--model-title", default=None, metavar="TEXT", help="model title recorded in the manifest")
    g.add_argument("--val-every", type=int, default=d.val_every,
                   help="also measure held-out Dice every N steps (default 0: only at the end)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device, help="device (default auto)")
    g.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads for this run")
    g.add_argument("--quiet", action="store_true", help="no progress bar or log lines (summary still printed)")
    p.set_defaults(func=run_segmenter)
    return p


def run_segmenter(args: argparse.Namespace) -> int:
    """Train, then print the held-out Dice and the bundle path (rank 0 only)."""
    from ..segmentation.model_bundle import read_segmenter_manifest
    from ..segmentation.training import SegmenterTrainingOptions, train_segmenter
    from ..train.distributed import world_from_env
    from .train_cmd import training_log

    argv = getattr(args, "argv", None)
    model = {k: v for k, v in (("id", args.model_id), ("title", args.model_title)) if v}
    options = SegmenterTrainingOptions(
        data=args.data, out=args.out, channels=args.channels, preset=args.preset, grid=args.grid,
        crop_size=args.crop_size, tumour_fraction=args.tumour_fraction, steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, weight_decay=args.weight_decay, ema_decay=args.ema_decay, val_fraction=args.val_fraction,
        val_every=args.val_every, seed=args.seed, device=args.device, threads=args.threads, overwrite=args.overwrite,
        quiet=args.quiet, card=args.card, model=model,
        command_line=shlex.join(["scorefusion", *(sys.argv[1:] if argv is None else argv)]),
    )
    is_main = world_from_env()[0] == 0
    with training_log(options.quiet, is_main):
        out = train_segmenter(options)
    if is_main:
        dice = read_segmenter_manifest(out).metrics["held_out_dice"]
        print("held-out Dice: " + ", ".join(f"{r} {v:.3f}" for r, v in dice.items()), file=sys.stderr)
        print(out)
    return 0
