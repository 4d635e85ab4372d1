"""``scorefusion train planes`` and ``train fuser``: train the plane models, then the fuser, into a bundle.

Registered on the main command through :func:`add_parser`; the stages are listed in
:data:`TRAIN_STAGES`. The module can also
run on its own (``python -m ScoreFusionLib.cli.train_cmd planes ...``), with the same exit
codes as the main command (2 for bad input).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shlex
import sys
import textwrap
from collections.abc import Iterator, Sequence

HELP = ("train models: 'train planes' trains the axial/coronal/sagittal 2D plane models, 'train fuser' the 3D "
        "fuser on top of them, 'train segmenter' a brain-tumour segmenter")

PLANES_DESCRIPTION = textwrap.dedent(
    """\
    Train one 2D conditional diffusion model per plane and write a
    model bundle: OUT/plane-<name>.safetensors (raw + EMA weights) and OUT/manifest.json
    (task, networks, grid, diffusion conventions, sha256s, validation metrics, provenance).

    Training: gamma from the 2000-step continuous schedule, r = sqrt(g) r0 + sqrt(1-g) eps
    with r0 = (y - c_ref)/2, loss MSE(eps_hat, eps), Adam without weight decay, gradient
    clipping, EMA after every step with warm-up min(decay, (1+n)/(10+n)). The first
    (1 - val-fraction) of the cases (sorted by id) train; the rest validate on fixed
    slices with fixed noise: the eps loss at fixed gamma draws, and a one-step denoising
    PSNR of c_ref + 2 r0_hat at gamma = --val-psnr-gamma (a progress measure, not the
    PSNR of full sampling), next to the PSNR of c_ref alone.

    Every draw depends only on (--seed, plane, step), so --resume continues exactly where
    a run stopped (bitwise on CPU), and 'torchrun --nproc_per_node N' (DDP; gloo on CPU,
    nccl on CUDA) trains on the same samples as one process with the same --batch-size,
    which is the global batch. The manifest is rewritten after each finished plane, so the
    bundle is loadable at any time; unfinished planes resume from OUT/checkpoints/.
    """
)

PLANES_EPILOG = textwrap.dedent(
    """\
    examples:
      scorefusion train planes --data sim --task sr --target t2f --factor 4 --config tiny \\
          --grid native --steps 2000 --out bundle-sr
      scorefusion train planes --data BraTS2021 --task mt --inputs t1n --target t2f \\
          --neighbors 2 --config paper --steps 100000 --out bundle-mt
      torchrun --nproc_per_node 2 -m ScoreFusionLib train planes ... --batch-size 6
    """
)


def _add_planes_parser(stages: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = stages.add_parser(
        "planes", help="train the plane models (2D, one per slicing direction)",
        description=PLANES_DESCRIPTION, epilog=PLANES_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("data and task")
    g.add_argument("--data", required=True, metavar="DIR_OR_MANIFEST",
                   help="dataset folder (BraTS 2021/2023 or ScoreFusionSim layout) or a .csv/.json manifest")
    g.add_argument("--task", choices=("sr", "mt", "both"), default="sr",
                   help="sr: super-resolution of the target; mt: synthesis from --inputs; both (default sr)")
    g.add_argument("--inputs", default="", metavar="C1[,C2]",
                   help="input contrasts, e.g. t1n or t1n,t2w (mt/both; sr needs none)")
    g.add_argument("--target", required=True, metavar="C", help="target contrast, e.g. t2f")
    g.add_argument("--factor", default=None, metavar="N|I,J,K",
                   help="average-pool SR factor, isotropic or per axis I,J,K of the RAS-reoriented "
                        "volume (i = left-right, j = posterior-anterior, k = inferior-superior; default 4)")
    g.add_argument("--thick-slice-axis", default=None, metavar="A",
                   help="thick-slice SR instead of pooling: the slice axis of the RAS-reoriented volume "
                        "(i, j, k or 0, 1, 2; k = inferior-superior, i.e. axial slices)")
    g.add_argument("--thick-slice-factor", type=int, default=None, metavar="P",
                   help="slice distance in high-resolution voxels")
    g.add_argument("--slice-fwhm", type=float, default=None, metavar="F",
                   help="slice profile FWHM in voxels (default: the factor)")
    g.add_argument("--slice-profile", choices=("gaussian", "box"), default="gaussian",
                   help="slice profile (default gaussian)")
    g.add_argument("--grid", nargs="+", default=["192", "192", "152"], metavar="N",
                   help="model grid I J K (after reorientation to RAS) reached by centred crop/pad "
                        "(default 192 192 152), or 'native' "
                        "(sides must then be multiples of the net's divisor and the SR factors)")
    g.add_argument("--normalization", choices=("minmax", "percentile"), default="minmax",
                   help="intensity normalisation to [-1, 1] (default minmax)")
    g.add_argument("--sr-normalization", choices=("input", "target"), default="input",
                   help="SR: fit the normalisation on the degraded input (default) or the target (paper)")
    g.add_argument("--val-fraction", type=float, default=0.2, metavar="F",
                   help="share of cases held out for validation, last by sorted id (default 0.2, the paper "
                        "split)")

    g = p.add_argument_group("networks")
    g.add_argument("--planes", default="axial,coronal,sagittal", metavar="P[,P...]",
                   help="planes to train, in order (default axial,coronal,sagittal)")
    g.add_argument("--config", choices=("tiny", "small", "paper"), default="paper",
                   help="U-Net preset (default paper; tiny for CPU tests)")
    g.add_argument("--neighbors", type=int, default=0, metavar="K",
                   help="2.5D neighbour slices per side: 0 (2D, default) or 2 (paper 2.5D)")
    g.add_argument("--noise-embedding", choices=("gamma-sinusoidal", "log-snr"), default="gamma-sinusoidal",
                   help="noise-level embedding (default: sinusoid of the raw gamma, official)")
    g.add_argument("--dropout", type=float, default=None, metavar="P",
                   help="override the preset's dropout (paper 0.2, small 0.1, tiny 0)")
    g.add_argument("--kaiming-init", action="store_true",
                   help="re-initialise conv/linear weights Kaiming-normal like the official script")

    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=50000, metavar="N", help="optimiser steps per plane (default 50000)")
    g.add_argument("--batch-size", type=int, default=3, metavar="B",
                   help="global batch, split over DDP processes (default 3; the paper: 3 per GPU x 2)")
    g.add_argument("--lr", type=float, default=5e-5, help="Adam learning rate (default 5e-5)")
    g.add_argument("--ema-decay", type=float, default=0.9999, metavar="D", help="EMA decay (default 0.9999)")
    g.add_argument("--no-ema-warmup", dest="ema_warmup", action="store_false",
                   help="use the plain decay from the first step (no min(decay, (1+n)/(10+n)) warm-up)")
    g.add_argument("--grad-clip", type=float, default=1.0, metavar="C",
                   help="gradient-norm clip, 0 = off (default 1.0)")
    g.add_argument("--seed", type=int, default=0, help="run seed (default 0)")

    g = p.add_argument_group("run")
    g.add_argument("--out", required=True, metavar="BUNDLE_DIR", help="bundle folder to write")
    g.add_argument("--overwrite", action="store_true", help="replace the bundle files in a non-empty --out")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out: skip finished planes, resume the others from their "
                        "checkpoints (the options must match the original run, except --steps, which applies "
                        "to the unfinished planes, and run options such as --device or --val-every)")
    g.add_argument("--val-every", type=int, default=1000, metavar="N",
                   help="validate every N steps (0: only at the end; default 1000)")
    g.add_argument("--val-slices", type=int, default=32, metavar="N",
                   help="fixed validation slices per plane (default 32)")
    g.add_argument("--val-psnr-gamma", type=float, default=0.5, metavar="G",
                   help="noise level of the one-step validation PSNR (default 0.5)")
    g.add_argument("--checkpoint-every", type=int, default=1000, metavar="N",
                   help="write a resume checkpoint every N steps (0: only when stopping; default 1000)")
    g.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop after N steps in this invocation (summed over planes), with a checkpoint; "
                        "continue with --resume")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="device (default auto)")
    g.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"), default="auto",
                   help="autocast on CUDA (auto: bf16 where supported; fp16 uses a gradient scaler); "
                        "CPU always runs none")
    g.add_argument("--num-workers", type=int, default=0, metavar="N", help="DataLoader workers (default 0)")
    g.add_argument("--cache", default=None, metavar="DIR",
                   help="store prepared cases here and memory-map them (about 90 MB per BraTS case; use it "
                        "when the training set does not fit in memory)")
    g.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads for this run")
    g.add_argument("--quiet", action="store_true", help="no progress bar or log lines (summary still printed)")
    p.set_defaults(func=run_planes)
    return p


FUSER_DESCRIPTION = textwrap.dedent(
    """\
    Train the 3D fuser of a bundle's plane models and store it in the bundle
    (BUNDLE/fuser-<phase>.safetensors, raw + EMA; the manifest's 'fuser' entry).

    Phase crops (A): random crops (--crop-size, default 64), no feature alignment.
    Phase full (B): whole volumes with the planes' decoder features aligned into the fuser's
    encoder (zero-initialised alignment convolutions), starting from phase A's EMA weights.

    Per item: t ~ U{0..999}, r_t by the fused schedule; the frozen plane models (eval mode,
    --plane-weights) score the item's slices at gamma = abar_t; the fuser fuses their
    estimates; loss 5 mean|eps_hat - eps| + 150 mean (eps_hat - eps)^2; Adam without weight
    decay; --batch-size items per step with gradient accumulation; EMA copied before
    --ema-start, then decay --ema-decay every --ema-every steps. Validation compares the
    held-out eps error of the fused estimate with that of the plain plane average.
    Draws depend only on (--seed, phase, item), so --resume continues exactly and
    'torchrun' processes split each step's items and average their gradients.
    """
)

FUSER_EPILOG = textwrap.dedent(
    """\
    examples:
      scorefusion train fuser --bundle bundle-sr --data sim --phase crops --config tiny --steps 2000
      scorefusion train fuser --bundle bundle-sr --data sim --phase full --steps 1000
      torchrun --nproc_per_node 4 -m ScoreFusionLib train fuser --bundle B --data BraTS2021 --batch-size 4
    """
)


def _add_fuser_parser(stages: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..nets.fuser_config import FUSER_PRESETS

    d = _fuser_defaults()
    p = stages.add_parser("fuser", help="train the 3D fuser of a bundle", description=FUSER_DESCRIPTION,
                          epilog=FUSER_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("bundle and data")
    g.add_argument("--bundle", required=True, metavar="BUNDLE_DIR", help="bundle with the trained plane models")
    g.add_argument("--data", required=True, metavar="DIR_OR_MANIFEST",
                   help="the dataset the plane models were trained on (the same split is used)")
    g.add_argument("--phase", choices=("crops", "full"), default=d.phase, help="crops (A) or full (B)")
    g.add_argument("--cache", default=None, metavar="DIR", help="memory-map prepared cases from this folder")
    g = p.add_argument_group("network and optimisation")
    g.add_argument("--config", choices=FUSER_PRESETS, default=None,
                   help="fuser preset (default: paper for crops; phase full continues phase crops' configuration)")
    g.add_argument("--steps", type=int, default=d.steps, help=f"optimiser steps (default {d.steps})")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"items per step over all processes, accumulated one at a time (default {d.batch_size})")
    g.add_argument("--crop-size", type=int, default=d.crop_size,
                   help=f"crop side for phase crops, or for phase full with --crops (default {d.crop_size})")
    g.add_argument("--crops", action="store_true", help="phase full on crops instead of whole volumes")
    g.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate (default {d.lr})")
    g.add_argument("--l1-weight", type=float, default=d.l1_weight, help=f"default {d.l1_weight}")
    g.add_argument("--mse-weight", type=float, default=d.mse_weight, help=f"default {d.mse_weight}")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="gradient-norm clip (default 0: off)")
    g.add_argument("--loss-weighting", choices=("uniform", "min-snr"), default=d.loss_weighting,
                   help="uniform over t (the paper, default) or min-snr: scale down items near t = 0, whose noise "
                   "is invisible in r_t and whose error barely affects the clean estimate")
    g.add_argument("--ema-decay", type=float, default=d.ema_decay, help=f"default {d.ema_decay}")
    g.add_argument("--ema-every", type=int, default=d.ema_every, help=f"default {d.ema_every}")
    g.add_argument("--ema-start", type=int, default=d.ema_start,
                   help=f"EMA = raw weights before this step (default {d.ema_start})")
    g.add_argument("--plane-weights", choices=("ema", "raw"), default=d.plane_weights,
                   help="plane weights the fuser is trained with and must later run with (default ema)")
    g.add_argument("--from-scratch", action="store_true", help="phase full without a phase-crops fuser")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute fuser activations in the backward pass (less memory, slower)")
    g.add_argument("--slice-batch", type=int, default=d.slice_batch, help="slices per plane-model call")
    g.add_argument("--seed", type=int, default=d.seed)
    g = p.add_argument_group("run control")
    g.add_argument("--val-every", type=int, default=d.val_every, help="validation period (0: only at the end)")
    g.add_argument("--val-draws", type=int, default=d.val_draws, help="fixed noise levels per held-out case")
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    g.add_argument("--resume", action="store_true", help="continue an interrupted run of this phase")
    g.add_argument("--overwrite", action="store_true", help="replace an existing fuser of this phase")
    g.add_argument("--stop-after", type=int, default=None, metavar="N", help="stop after N steps (resume later)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"), default="auto",
                   help="autocast on CUDA (auto: bf16 where supported); CPU always runs none")
    g.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads for this run")
    g.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    p.set_defaults(func=run_fuser)
    return p


def _fuser_defaults():  # -> FuserTrainingOptions
    from ..train.fuser_options import FuserTrainingOptions

    return FuserTrainingOptions(bundle="", data="")


def run_fuser(args: argparse.Namespace) -> int:
    """Train one fuser phase, then print its summary (rank 0 only)."""
    from ..bundle import read_manifest
    from ..train.distributed import world_from_env
    from ..train.fuser import format_fuser_summary, train_fuser
    from ..train.fuser_options import FuserTrainingOptions

    argv = getattr(args, "argv", None)
    options = FuserTrainingOptions(
        bundle=args.bundle, data=args.data, phase=args.phase, config=args.config, steps=args.steps,
        batch_size=args.batch_size, crop_size=args.crop_size, full_volume=not args.crops, lr=args.lr,
        l1_weight=args.l1_weight, mse_weight=args.mse_weight, loss_weighting=args.loss_weighting,
        grad_clip=args.grad_clip, ema_decay=args.ema_decay,
        ema_every=args.ema_every, ema_start=args.ema_start, plane_weights=args.plane_weights,
        from_scratch=args.from_scratch, gradient_checkpointing=args.gradient_checkpointing,
        slice_batch=args.slice_batch, val_every=args.val_every, val_draws=args.val_draws, seed=args.seed,
        device=args.device, amp=args.amp, cache=args.cache, checkpoint_every=args.checkpoint_every,
        resume=args.resume, overwrite=args.overwrite, stop_after=args.stop_after, threads=args.threads,
        quiet=args.quiet, command_line=shlex.join(["scorefusion", *(sys.argv[1:] if argv is None else argv)]),
    )
    is_main = world_from_env()[0] == 0
    with training_log(options.quiet, is_main):
        out = train_fuser(options)
    if is_main:
        fuser = read_manifest(out).fuser
        if fuser and fuser.get("phase") == options.phase and options.quiet:
            print(format_fuser_summary(fuser, out), file=sys.stderr)
        print(out)
    return 0


def _add_segmenter_parser(stages: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from .train_segmenter_cmd import add_segmenter_parser

    return add_segmenter_parser(stages)


#: ``train`` stages: name -> function adding its parser.
TRAIN_STAGES = {"planes": _add_planes_parser, "fuser": _add_fuser_parser, "segmenter": _add_segmenter_parser}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``train`` (with its stages) on the ``scorefusion`` command."""
    parser = subparsers.add_parser("train", help=HELP, description=HELP)
    stages = parser.add_subparsers(dest="stage", metavar="STAGE")
    stages.required = True
    for add in TRAIN_STAGES.values():
        add(stages)
    return parser


class _TqdmHandler(logging.Handler):
    """Log lines written with ``tqdm.write`` so they do not break the progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


@contextlib.contextmanager
def training_log(quiet: bool, is_main: bool) -> Iterator[None]:
    """Route the training logger to stderr (through tqdm) for the duration of the command."""
    log = logging.getLogger("ScoreFusionLib.train")
    saved = (log.level, log.propagate)
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet or not is_main else logging.INFO)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]


def options_from_args(args: argparse.Namespace, argv: Sequence[str] | None = None):  # -> PlaneTrainingOptions
    """The :class:`PlaneTrainingOptions` of parsed ``train planes`` arguments."""
    from ..train.options import PlaneTrainingOptions, parse_grid

    return PlaneTrainingOptions(
        data=args.data, out=args.out, target=args.target, task=args.task, inputs=args.inputs,
        planes=args.planes, config=args.config, factor=args.factor, thick_slice_axis=args.thick_slice_axis,
        thick_slice_factor=args.thick_slice_factor, slice_fwhm=args.slice_fwhm,
        slice_profile=args.slice_profile, neighbors=args.neighbors, grid=parse_grid(args.grid),
        normalization=args.normalization, sr_normalization=args.sr_normalization,
        noise_embedding=args.noise_embedding, dropout=args.dropout, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, ema_decay=args.ema_decay, ema_warmup=args.ema_warmup,
        grad_clip=args.grad_clip, val_every=args.val_every, val_fraction=args.val_fraction,
        val_slices=args.val_slices, val_psnr_gamma=args.val_psnr_gamma, seed=args.seed, device=args.device,
        amp=args.amp, kaiming_init=args.kaiming_init, num_workers=args.num_workers, cache=args.cache,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume, overwrite=args.overwrite, stop_after=args.stop_after, threads=args.threads,
        quiet=args.quiet,
        command_line=shlex.join(["scorefusion", *(sys.argv[1:] if argv is None else argv)]),
    )


def run_planes(args: argparse.Namespace) -> int:
    """Train, then print the per-plane summary (rank 0 only)."""
    from ..bundle import read_manifest
    from ..train.distributed import world_from_env
    from ..train.planes import format_summary, train_planes

    options = options_from_args(args, getattr(args, "argv", None))
    is_main = world_from_env()[0] == 0
    with training_log(options.quiet, is_main):
        out = train_planes(options)
    if is_main and options.quiet:
        manifest = read_manifest(out)
        pending = manifest.training.get("planes_pending", [])
        print(format_summary(out, manifest.planes, pending), file=sys.stderr)
    if is_main:
        print(out)
    return 0
