"""Plane-only Score-Fusion baselines on simulated data: quality and speed, printed as a table.

Trains (or reuses) ``tiny`` SR plane models on a simulated cohort, then super-resolves the
held-out case with interpolation baselines and the fuser-free modes (single, tpdm, average),
reporting PSNR/SSIM (paper protocol, whole volume and foreground), seconds and seconds per
step. Every number comes from this run; nothing is hard-coded.

    .venv/bin/python benchmarks/plane_modes.py --work /tmp/sf-bench --steps 300 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ScoreFusionLib.data import discover_cases, load_case
from ScoreFusionLib.degradation import AveragePool
from ScoreFusionLib.grid import crop_or_pad
from ScoreFusionLib.interpolation import upsample_volume
from ScoreFusionLib.metrics import volume_metrics
from ScoreFusionLib.simulator import write_cohort
from ScoreFusionLib.train import PlaneTrainingOptions, train_planes
from ScoreFusionLib.translate import SamplingOptions, super_resolve


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="folder for the cohort and the bundle (reused)")
    p.add_argument("--cases", type=int, default=5)
    p.add_argument("--factor", type=int, default=2)
    p.add_argument("--grid", type=int, nargs=3, default=(48, 56, 48))
    p.add_argument("--steps", type=int, default=300, help="training steps per plane")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--sampler", default="ddpm")
    p.add_argument("--time-grid", default="logsnr")
    p.add_argument("--noise", action="store_true", help="simulate Rician noise (default: noise-free)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the rows as JSON")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data = args.work / "sim"
    if not data.exists():
        write_cohort(data, args.cases, seed=11, spacing=2.0, noise=args.noise)
    bundle = args.work / f"bundle-x{args.factor}-{args.steps}"
    losses: dict[str, list[float]] = {}
    train_seconds = None
    if not bundle.exists():
        start = time.perf_counter()
        train_planes(
            PlaneTrainingOptions(
                data=data, out=bundle, target="t1n", task="sr", inputs=[], planes=["axial", "coronal", "sagittal"],
                config="tiny", factor=str(args.factor), grid=tuple(args.grid), steps=args.steps, batch_size=8,
                lr=1e-3, ema_decay=0.999, val_every=args.steps, seed=0, device="cpu", quiet=True,
            ),
            callback=lambda e: losses.setdefault(e["plane"], []).append(e["loss"]) if e["event"] == "step" else None,
        )
        train_seconds = time.perf_counter() - start
    held_out = discover_cases(data)[-1]
    hr = crop_or_pad(load_case(held_out, ["t1n"], grid_shape_ijk=None).volumes["t1n"], tuple(args.grid))
    lr = AveragePool(args.factor).degrade_volume(hr)

    rows = []
    for name in ("nearest", "trilinear", "bspline"):
        start = time.perf_counter()
        out = upsample_volume(lr, args.factor, name).array
        rows.append({"method": name, "seconds": time.perf_counter() - start, "steps": 0,
                     **volume_metrics(out, hr.array)})
    for mode in ("single", "tpdm", "average"):
        options = SamplingOptions(method=mode, sampler=args.sampler, steps=args.sample_steps,
                                  time_grid=args.time_grid, seed=0, device="cpu")
        start = time.perf_counter()
        out = super_resolve(lr, bundle, options).volume.array
        seconds = time.perf_counter() - start
        rows.append({"method": mode, "seconds": seconds, "steps": args.sample_steps, **volume_metrics(out, hr.array)})

    print(f"held-out case {held_out.case_id} (simulated), grid {tuple(args.grid)}, SR x{args.factor}, "
          f"{args.sampler} {args.sample_steps} steps ({args.time_grid} grid), torch threads {args.threads}")
    if losses:
        for plane, values in losses.items():
            n = max(len(values) // 5, 1)
            print(f"  {plane:9s} loss first 20% {np.mean(values[:n]):.4f} -> last 20% {np.mean(values[-n:]):.4f}")
        print(f"  training {train_seconds:.1f} s for {3 * args.steps} plane steps "
              f"({train_seconds / (3 * args.steps):.3f} s/step)")
    print("| method | PSNR dB | SSIM | PSNR fg | SSIM fg | seconds | s/step |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        per_step = f"{r['seconds'] / r['steps']:.2f}" if r["steps"] else "-"
        print(f"| {r['method']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['psnr_foreground']:.2f} | "
              f"{r['ssim_foreground']:.4f} | {r['seconds']:.2f} | {per_step} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
