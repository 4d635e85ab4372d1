"""Quality and cost of the embedded default models on volumes they were not trained on.

Super-resolution models (``task sr``) run on three real-anatomy T1 volumes, all on the models'
2 mm grid:

* ``icbm-heldout``: the real ICBM152 T1 under the deformation, bias field and noise of a
  simulator seed (99) that no model was trained with;
* ``colin27``: the real Colin27 T1 (Debian ``mricron-data``), an anatomy no model saw;
* ``icbm``: the undeformed ICBM152 T1 itself (what ``scorefusion demo`` shows).

Synthesis models run on a simulated case with a tumour from seed 2026 (not a training seed).
Each volume is degraded / translated with every method and scored against its truth with
``ScoreFusionLib.demo.compare`` (the demo's own code): PSNR and SSIM over the whole volume, and
seconds per call. Synthesis rows add ``cal`` columns: the scores after the best affine intensity
map onto the truth, the like-for-like comparison with the oracle linear map. Baselines:
nearest / trilinear / B-spline interpolation, and for synthesis the least-squares linear
mapping of the inputs fitted against the truth (an oracle).

    .venv/bin/python benchmarks/default_models.py                         # every model, registry defaults
    .venv/bin/python benchmarks/default_models.py --models t1-sr4-iso --configs ddpm:50 ddim:20 ddim:10
    .venv/bin/python benchmarks/default_models.py --bundle t1-sr4-iso=build/x --json out.json

``--configs`` compares samplers (``sampler:steps``; default: the registry's own). ``--bundle``
runs a bundle folder under a registry id (before it is packed). Colin27 rows are skipped, with
a note, where ``mricron-data`` is not installed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ScoreFusionLib.demo.compare import LINEAR_MAP, compare_super_resolution, compare_synthesis, registry_sampling
from ScoreFusionLib.demo.inputs import COLIN27_BRAIN, colin27_t1, real_icbm_t1, simulated_contrasts

HELD_OUT_SEED = 99
SYNTHESIS_SEED = 2026


def _sr_volumes(shape, spacing):
    volumes = {"icbm-heldout": simulated_contrasts(shape, spacing, seed=HELD_OUT_SEED, t1_source="icbm")[0]["t1n"]}
    if os.path.exists(COLIN27_BRAIN):
        volumes["colin27"] = colin27_t1(shape, spacing)
    else:
        print(f"note: {COLIN27_BRAIN} is missing (apt-get install mricron-data): no Colin27 rows", file=sys.stderr)
    volumes["icbm"] = real_icbm_t1(shape, spacing)
    return volumes


def _configs(args, entry):
    if not args.configs:
        s = registry_sampling(entry, "average")
        return [(s.sampler, s.steps)]
    return [(c.split(":")[0], int(c.split(":")[1])) for c in args.configs]


def run(args) -> list[dict]:
    from ScoreFusionLib.bundle import read_manifest
    from ScoreFusionLib.registry import load_registry, resolve_model

    registry = load_registry(args.registry)
    overrides = dict(b.split("=", 1) for b in args.bundle)
    ids = args.models or registry.ids()
    rows = []
    for model_id in ids:
        entry = registry.get(model_id)
        bundle = Path(overrides[model_id]) if model_id in overrides else resolve_model(model_id, registry=registry)
        manifest = read_manifest(bundle)
        shape, spacing = manifest.grid["shape_ijk"], float(manifest.grid["spacing"][0])
        learned = [m for m in ["average"] + (["score-fusion"] if manifest.fuser else [])
                   if not args.methods or m in args.methods]
        for sampler, steps in _configs(args, entry):
            def options_for(method, sampler=sampler, steps=steps, entry=entry):
                return registry_sampling(entry, method, steps=steps, sampler=sampler, seed=args.seed,
                                         device=args.device)

            first = (sampler, steps) == _configs(args, entry)[0]
            if manifest.task["kind"] == "mt":
                cases = {"sim-seed2026": simulated_contrasts(shape, spacing, seed=SYNTHESIS_SEED)[0]}
                methods = ([LINEAR_MAP] if first and not args.methods else []) + learned
                results = {name: compare_synthesis(images, bundle, methods, options_for)
                           for name, images in cases.items()}
            else:
                methods = (["trilinear", "bspline"] if first and not args.methods else []) + learned
                results = {name: compare_super_resolution(truth, bundle, methods, options_for)[1]
                           for name, truth in _sr_volumes(shape, spacing).items()}
            for volume, runs in results.items():
                for method, r in runs.items():
                    model_run = r.options is not None
                    rows.append({"model": model_id, "volume": volume, "method": method,
                                 "sampling": f"{sampler}:{steps}" if model_run else "-",
                                 "psnr": r.metrics["psnr"], "ssim": r.metrics["ssim"],
                                 "psnr_cal": r.metrics.get("psnr_calibrated"),
                                 "ssim_cal": r.metrics.get("ssim_calibrated"),
                                 "seconds": round(r.seconds, 2)})
                    print(_line(rows[-1]), flush=True)
    return rows


def _line(row: dict) -> str:
    cal = (f"{row['psnr_cal']:.2f} | {row['ssim_cal']:.4f}" if row["psnr_cal"] is not None else "- | -")
    return (f"| {row['model']} | {row['volume']} | {row['method']} | {row['sampling']} | {row['psnr']:.2f} | "
            f"{row['ssim']:.4f} | {cal} | {row['seconds']:.1f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", help="registry ids (default: every registry model)")
    parser.add_argument("--bundle", nargs="*", default=[], metavar="ID=DIR", help="run DIR under registry id ID")
    parser.add_argument("--methods", nargs="*", choices=("average", "score-fusion"),
                        help="only these model methods, and no baselines (default: all)")
    parser.add_argument("--configs", nargs="*", metavar="SAMPLER:STEPS", help="sampler configurations to compare")
    parser.add_argument("--registry", help="registry JSON (default: Resources/models.json)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    print("| model | volume | method | sampling | PSNR dB | SSIM | PSNR cal | SSIM cal | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
