"""Cost of one denoising step per fusion method and volume size: seconds, throughput and peak memory.

One sampler step is one call of the epsilon model (the sampler's own arithmetic is a few
volume-sized additions and is left out). This benchmark builds plane models and a fuser with
random weights of the chosen presets (no bundle, no training; cost does not depend on the
weights), a synthetic cubic volume, and times that call for each method:

* ``single``: one plane model (sagittal) over all slices;
* ``tpdm``: one plane per step, drawn with the official probabilities;
* ``average``: the three plane models, averaged;
* ``score-fusion``: the three plane models plus the 3D fuser on the whole volume (untiled);
* ``score-fusion-tiled``: the same with the fuser on overlapping ``--tile-size`` tiles
  whose heads are blended (method.md 6.6).

Every (method, size) runs in its own fresh subprocess, because the CPU peak (resident-set
size) is process-wide and never goes down: a measurement after a bigger one would see nothing.
Inside it the models, the conditioning tensors and the noisy state are allocated first
("setup"); then one warm-up call, which gives the memory peak, and ``--repeats`` timed calls
run under ``torch.no_grad``, as in the samplers. Every number comes from this run; nothing is
hard-coded.

    .venv/bin/python benchmarks/sampling.py                                  # CPU, tiny/tiny, 48..160
    .venv/bin/python benchmarks/sampling.py --sizes 32 48 --repeats 1 --threads 1    # smoke test
    .venv/bin/python benchmarks/sampling.py --aligned --tile-size 32 --json out.json
    .venv/bin/python benchmarks/sampling.py --device cuda --sizes 64 128 192 --paper-grid

``--paper-grid`` (CUDA only) adds rows for the ``paper`` plane and fuser presets with feature
alignment on the paper's 192x192x152 grid (D, H, W = 152, 192, 192). On CUDA the networks
run under autocast as in ``translate`` (``--amp auto``: bf16 where supported).

Columns of the table
--------------------
method, size
    The fusion method and the volume (a cube of that side, or D x H x W).
voxels
    Voxels of the volume.
s/step
    Median wall-clock seconds of one epsilon-model call over ``--repeats`` calls (after one
    warm-up call; CUDA calls are synchronised).
Mvoxel·steps/s
    Throughput: voxels / (s/step) / 1e6.
step peak MiB
    Peak memory of the step beyond what setup holds, measured on the warm-up call. CPU: the
    largest resident-set increase over the value after setup, polled every 5 ms
    (:class:`ScoreFusionLib.peak_memory.PeakMemory`; misses spikes shorter than that). For
    this call glibc is told (``mallopt``) to return freed blocks over 64 KiB at once, so the
    resident set follows live memory rather than the allocator's cache, which would make the
    figure depend on what ran before; it includes the first call's one-time costs (kernel
    set-up, some MiB). The timed calls run with glibc's usual caching; their peak over the
    setup value is ``timed_step_peak_bytes`` in the JSON. CUDA: torch's peak of allocated
    tensor memory over the value after setup (no allocator cache, no CUDA context).
state MiB
    Bytes of the volume-sized float32 tensors the method holds at once: the noisy state,
    the conditions, the 3 coordinate channels and the mask (these exist from setup on), the
    plane estimates (score-fusion: N; average: 2, the running sum and the current one;
    single and tpdm: 1) and, with ``--aligned``, the fuser-grid buffers of the aligned
    features. The score-fusion step also creates volume-sized temporaries (the per-plane
    outputs before they are stacked, the fuser's input stack, its head, the blending sums when
    tiled, the fused output; not all alive at once); they are itemised in the JSON
    (``volume_temporaries_bytes``) but not in this column.
tiles
    Score-fusion only: number of fuser tiles x the tile's extent (the tile side clipped to the
    volume; 1 x the volume side when untiled or when the volume fits in one tile).
process peak MiB
    The whole process's peak: CPU the lifetime maximum resident set (interpreter, torch,
    models, setup and the step); CUDA the peak of allocated tensor memory.
fuser est. MiB
    Score-fusion only: the library's estimate of the fuser's working set for one tile
    (:func:`ScoreFusionLib.fusion.tiling.estimate_fuser_bytes_per_voxel` x tile voxels), the
    figure automatic tiling budgets with; compare it with ``step peak MiB``.

A configuration is skipped ("skipped (too slow)") when the previous, smaller size of the same
method took longer than ``--max-seconds`` per step, and ("skipped (previous size failed)")
after a failure such as running out of memory.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ScoreFusionLib.errors import InputError
from ScoreFusionLib.fusion.tiling import estimate_fuser_bytes_per_voxel
from ScoreFusionLib.nets.configs import UNET2D_PRESETS, unet2d_config
from ScoreFusionLib.nets.fuser_config import FUSER_PRESETS, fuser_config

METHODS = ("single", "tpdm", "average", "score-fusion", "score-fusion-tiled")
PLANES = ("axial", "coronal", "sagittal")
PLANE_AXES = {"axial": 0, "coronal": 1, "sagittal": 2}
#: The paper's model grid (D, H, W), method.md 6.5/6.7.
PAPER_GRID = (152, 192, 192)
MIB = float(1 << 20)
N_CONDITIONS = 1  # super-resolution: one condition
RESULT_MARK = "@@sampling-benchmark-result "


# -- configurations (pure Python, shared by the parent and the child) ------------------------------
def _configs(plane_preset: str, fuser_preset: str, aligned: bool) -> tuple[Any, Any]:
    """Plane-model and fuser configurations for three planes and one condition."""
    plane = unet2d_config(plane_preset, in_channels=N_CONDITIONS + 3 + 1 + 1)
    n = len(PLANES)
    sources: tuple = ()
    channels: tuple = ()
    if aligned:
        sources = tuple((p, PLANE_AXES[p]) for p in PLANES)
        channels = tuple(sorted(plane.feature_channels.items(), reverse=True))
    fuser = fuser_config(fuser_preset, 1 + N_CONDITIONS + 3 + 1 + n, n, aligned_sources=sources,
                         aligned_channels=channels)
    return plane, fuser


def _fuser_multiple(fuser: Any) -> int:
    """What :class:`ScoreFusionModel` requires of sides and tile sizes."""
    return int(max(fuser.required_divisor, *(f for f, _ in fuser.aligned_channels or [(1, 0)])))


def _grid_multiple(plane: Any, fuser: Any) -> int:
    return math.lcm(plane.required_divisor, _fuser_multiple(fuser))


def _state_bytes(method: str, shape: tuple[int, int, int], fuser: Any) -> dict[str, int]:
    """Volume-sized float32 tensors the method holds at once (the 'state MiB' column), itemised."""
    voxels = math.prod(shape)
    held = {"single": 1, "tpdm": 1, "average": 2}.get(method, fuser.n_estimates)
    items = {"state": voxels * 4, "conditions": N_CONDITIONS * voxels * 4, "coords": 3 * voxels * 4,
             "mask": voxels * 4, "estimates": held * voxels * 4}
    if method.startswith("score-fusion") and fuser.aligned_channels:
        items["aligned_buffers"] = sum(
            fuser.injection_channels(f) * math.prod(s // f for s in shape) * 4 for f, _ in fuser.aligned_channels
        )
    return items


def _temporaries_bytes(method: str, shape: tuple[int, int, int], fuser: Any, tiles: int) -> dict[str, int]:
    """Volume-sized temporaries of a score-fusion step not counted in 'state MiB' (not all alive at once)."""
    if not method.startswith("score-fusion"):
        return {}
    voxels = math.prod(shape)
    n = fuser.n_estimates
    items = {"plane_outputs_before_stacking": n * voxels * 4, "fuser_input_stack": fuser.in_channels * voxels * 4}
    if tiles > 1:
        items.update(blend_sum=n * voxels * 4, blend_weight_sum=voxels * 4)
    items.update(head=n * voxels * 4, fused_output=voxels * 4)
    return items


# -- one measurement (runs in a fresh subprocess) --------------------------------------------------
def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def _lifetime_max_rss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


#: glibc ``mallopt`` parameters.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _glibc() -> Any:
    """glibc through ctypes (for ``mallopt``/``malloc_trim``), or ``None`` elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


def _allocator_exact(libc: Any) -> bool:
    """Make freed memory leave the process at once, so the resident set follows live memory."""
    return bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, 64 << 10)
                and libc.mallopt(_M_TRIM_THRESHOLD, 128 << 10))


def _allocator_cached(libc: Any) -> None:
    """glibc's steady state after large frees (its dynamic maxima): blocks up to 32 MiB are reused."""
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)


def _autocast(amp: str, device: str) -> Any:
    """Autocast factory as in ``translate`` (CUDA only), or a null context."""
    if not device.startswith("cuda") or amp == "none":
        return contextlib.nullcontext
    import torch

    if amp == "auto":
        if not torch.cuda.is_bf16_supported():
            return contextlib.nullcontext
        amp = "bf16"
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return lambda: torch.autocast(device_type="cuda", dtype=dtype)


def _synthetic_conditioning(shape: tuple[int, int, int], device: str) -> Any:
    """A smooth ellipsoid 'head' in [-1, 1] with -1 background, full-grid coordinates and its mask."""
    import numpy as np
    import torch

    from ScoreFusionLib.fusion.slice_scorer import VolumeConditioning
    from ScoreFusionLib.intensity import mask_channel

    axes = [2.0 * np.arange(n) / n - 1.0 for n in shape]
    zz, yy, xx = np.meshgrid(*axes, indexing="ij")
    radius = np.sqrt((zz / 0.8) ** 2 + (yy / 0.9) ** 2 + (xx / 0.75) ** 2)
    texture = 0.3 * np.sin(7.0 * xx) * np.cos(5.0 * yy) * np.sin(3.0 * zz)
    cond = np.where(radius < 1.0, np.clip(0.2 + texture - 0.5 * radius, -0.98, 1.0), -1.0).astype(np.float32)
    coords = np.stack([xx, yy, zz]).astype(np.float32)
    return VolumeConditioning(
        conditions=torch.from_numpy(cond[None]).to(device),
        coords=torch.from_numpy(coords).to(device),
        mask=torch.from_numpy(mask_channel(cond)[None]).to(device),
    )


def measure_one(spec: dict) -> dict:
    """Build the method's epsilon model on a synthetic volume and time/measure one step."""
    import torch

    from ScoreFusionLib.diffusion.schedule import FusedSchedule
    from ScoreFusionLib.fusion.modes import PlaneEnsemble
    from ScoreFusionLib.fusion.score_fusion import MAIN_GROUP, PlaneGroup, ScoreFusionModel
    from ScoreFusionLib.fusion.slice_scorer import SliceScorer
    from ScoreFusionLib.nets.score_fuser import ScoreFuser
    from ScoreFusionLib.nets.unet2d import UNet2D, kaiming_reinit_
    from ScoreFusionLib.peak_memory import PeakMemory

    torch.set_num_threads(int(spec["threads"]))
    device = spec["device"]
    cuda = device.startswith("cuda")
    libc = None if cuda else _glibc()
    exact = _allocator_exact(libc)
    method = spec["method"]
    shape = tuple(int(s) for s in spec["shape"])
    generator = torch.Generator().manual_seed(int(spec["seed"]))
    plane_cfg, fuser_cfg = _configs(spec["plane_config"], spec["fuser_config"], bool(spec["aligned"]))
    autocast = _autocast(spec["amp"], device)

    # ---- setup: conditioning, models, noisy state ----
    cond = _synthetic_conditioning(shape, device)
    planes = ["sagittal"] if method == "single" else list(PLANES)
    scorers = {}
    for p in planes:
        net = kaiming_reinit_(UNet2D(plane_cfg), generator).to(device).eval()
        net.requires_grad_(False)
        scorers[p] = SliceScorer(net, p, neighbors=0, batch_size=int(spec["slice_batch"]))
    model: Any
    tiles, tile_side, fuser_estimate = None, None, None
    if method.startswith("score-fusion"):
        fuser = ScoreFuser(fuser_cfg).to(device).eval()
        fuser.requires_grad_(False)
        tile = int(spec["tile_size"]) if method == "score-fusion-tiled" else None
        model = ScoreFusionModel(fuser, [PlaneGroup(MAIN_GROUP, scorers, cond)], cond, tile, autocast)
        tiles, tile_side = len(model.plan.starts), [int(n) for n in model.plan.sizes]
        per_voxel = estimate_fuser_bytes_per_voxel(fuser_cfg.level_channels, fuser_cfg.num_res_blocks)
        fuser_estimate = per_voxel * math.prod(model.plan.sizes)
        call = model
    else:
        ensemble = PlaneEnsemble(scorers, cond, method, seed=int(spec["seed"]))

        def call(r: Any, t: int, abar: float) -> Any:
            with autocast():
                return ensemble(r, t, abar).float()

    r_t = torch.randn((1, *shape), generator=generator).to(device)
    schedule = FusedSchedule()
    t = int(spec["t"])
    abar_t = schedule.abar(t)
    gc.collect()
    if cuda:
        torch.cuda.synchronize(device)
        setup_bytes = torch.cuda.memory_allocated(device)
    else:
        if libc is not None:
            libc.malloc_trim(0)
        setup_bytes = _rss_bytes() or 0

    def one_call() -> float:
        start = time.perf_counter()
        eps = call(r_t, t, abar_t)
        if cuda:
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        if tuple(eps.shape) != (1, *shape) or not bool(torch.isfinite(eps).all()):
            raise RuntimeError(f"{method}: bad epsilon estimate of shape {tuple(eps.shape)}")
        return elapsed

    # ---- the step: the warm-up call gives the memory peak, then the timed repeats ----
    with torch.no_grad():
        with PeakMemory(device) as peak:
            warmup = one_call()
        # CPU: back to glibc's caching for the timing (returning every block costs page faults)
        _allocator_cached(libc)
        entry = 0 if cuda else (_rss_bytes() or 0) - setup_bytes
        with PeakMemory(device) as timed_peak:
            seconds = [one_call() for _ in range(int(spec["repeats"]))]
    if cuda:  # PeakMemory resets the peak statistics on entry: combine the two blocks
        process_peak = max(int(setup_bytes) + int(peak.peak_bytes), int(torch.cuda.max_memory_allocated(device)))
    else:
        process_peak = _lifetime_max_rss_bytes()

    per_step = statistics.median(seconds)
    voxels = math.prod(shape)
    state = _state_bytes(method, shape, fuser_cfg)
    return {
        "method": method, "shape": list(shape), "voxels": voxels, "device": device,
        "seconds_per_step": per_step, "seconds": seconds, "warmup_seconds": warmup,
        "mvoxel_steps_per_second": voxels / per_step / 1e6,
        "memory_kind": peak.kind, "cpu_allocator_exact": exact,
        "setup_bytes": int(setup_bytes), "step_peak_bytes": int(peak.peak_bytes),
        "timed_step_peak_bytes": int(max(0, entry + timed_peak.peak_bytes)),
        "process_peak_bytes": process_peak,
        "state_bytes": sum(state.values()), "state_items": state,
        "volume_temporaries_bytes": _temporaries_bytes(method, shape, fuser_cfg, tiles or 1),
        "tiles": tiles, "tile_size": tile_side, "fuser_estimate_bytes": fuser_estimate,
        "plane_parameters": sum(p.numel() for p in scorers[planes[0]].model.parameters()),
        "fuser_parameters": (model.fuser.num_parameters() if method.startswith("score-fusion") else None),
        "status": "ok",
    }


def _child_main(payload: str) -> int:
    spec = json.loads(payload)
    result = measure_one(spec)
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


# -- the parent: one subprocess per (method, size) -------------------------------------------------
def run_one(spec: dict, timeout: float | None) -> dict:
    """Run :func:`measure_one` in a fresh interpreter and return its result (or a failure row)."""
    env = dict(os.environ)
    threads = str(spec["threads"])
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    base = {"method": spec["method"], "shape": spec["shape"], "voxels": math.prod(spec["shape"])}
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_one", json.dumps(spec)],
                              capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**base, "status": f"failed (over {timeout:.0f} s)"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
    if proc.returncode < 0:
        tail = f"killed by signal {-proc.returncode} (out of memory?)"
    return {**base, "status": f"failed: {tail[:160]}"}


def _size_label(shape: list[int]) -> str:
    return str(shape[0]) if len(set(shape)) == 1 else "x".join(str(s) for s in shape)


def _mib(value: Any) -> str:
    return "-" if value is None else f"{value / MIB:.1f}"


def print_table(rows: list[dict]) -> None:
    print("| method | size | voxels | s/step | Mvoxel·steps/s | step peak MiB | state MiB | tiles "
          "| process peak MiB | fuser est. MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        label = r["method"] + (" (paper)" if r.get("paper_grid") else "")
        size = _size_label(r["shape"])
        if r["status"] != "ok":
            print(f"| {label} | {size} | {r['voxels']:,} | {r['status']} | | | | | | |")
            continue
        tiles = f"{r['tiles']} x {_size_label(r['tile_size'])}" if r["tiles"] is not None else "-"
        print(f"| {label} | {size} | {r['voxels']:,} | {r['seconds_per_step']:.3f} | "
              f"{r['mvoxel_steps_per_second']:.3f} | {_mib(r['step_peak_bytes'])} | {_mib(r['state_bytes'])} | "
              f"{tiles} | {_mib(r['process_peak_bytes'])} | {_mib(r['fuser_estimate_bytes'])} |")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[48, 64, 96, 128, 160],
                   help="cube sides in voxels (multiples of the networks' grid, 8 for the presets)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--plane-config", choices=UNET2D_PRESETS, default="tiny")
    p.add_argument("--fuser-config", choices=FUSER_PRESETS, default="tiny")
    p.add_argument("--aligned", action="store_true", help="fuser with feature alignment (method.md 4.5)")
    p.add_argument("--tile-size", type=int, default=48, help="fuser tile side of score-fusion-tiled")
    p.add_argument("--slice-batch", type=int, default=8, help="slices per plane-model call")
    p.add_argument("--repeats", type=int, default=3, help="timed calls after one warm-up call")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"), default="auto",
                   help="autocast of the network calls on CUDA (ignored on the CPU)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each measurement")
    p.add_argument("--max-seconds", type=float, default=60.0,
                   help="skip a size when the previous size of the method took longer per step (0: never)")
    p.add_argument("--timeout", type=float, default=None, help="seconds before a measurement is abandoned")
    p.add_argument("--step", type=int, default=500, help="fused step t of the measured call (0..999)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--paper-grid", action="store_true",
                   help="CUDA only: also paper plane + fuser presets, aligned, on 192x192x152")
    p.add_argument("--json", type=Path, help="also write the rows as JSON")
    p.add_argument("--_one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._one is not None:
        return args
    if args.paper_grid and args.device != "cuda":
        p.error("--paper-grid runs the paper-size networks on a 152x192x192 volume, which is GPU work; "
                "use it with --device cuda")
    if args.repeats < 1 or args.threads < 1 or args.slice_batch < 1:
        p.error("--repeats, --threads and --slice-batch must be at least 1")
    if not 0 <= args.step <= 999:
        p.error("--step must lie in 0..999")
    try:
        plane, fuser = _configs(args.plane_config, args.fuser_config, args.aligned)
    except InputError as exc:
        p.error(f"--plane-config {args.plane_config} with --fuser-config {args.fuser_config}"
                f"{' --aligned' if args.aligned else ''}: {exc}")
    multiple = _grid_multiple(plane, fuser)
    bad = [s for s in args.sizes if s < 1 or s % multiple]
    if bad:
        p.error(f"sizes {bad} are not positive multiples of {multiple}, which these networks need")
    if "score-fusion-tiled" in args.methods:
        m = _fuser_multiple(fuser)
        if args.tile_size < m or args.tile_size % m:
            p.error(f"--tile-size must be a positive multiple of {m} for this fuser, got {args.tile_size}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: no CUDA device is available")
    args.sizes = sorted(set(args.sizes))
    return args


def _spec(args: argparse.Namespace, method: str, shape: tuple[int, int, int], plane: str, fuser: str,
          aligned: bool) -> dict:
    return {"method": method, "shape": list(shape), "plane_config": plane, "fuser_config": fuser,
            "aligned": aligned, "tile_size": args.tile_size, "slice_batch": args.slice_batch,
            "repeats": args.repeats, "device": args.device, "amp": args.amp, "threads": args.threads,
            "t": args.step, "seed": args.seed}


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args._one is not None:
        return _child_main(args._one)
    device = "cuda" if args.device == "cuda" else "cpu"
    print(f"one eps-model call per step; planes {args.plane_config}, fuser {args.fuser_config}"
          f"{' (aligned)' if args.aligned else ''}, tile {args.tile_size}, slice batch {args.slice_batch}, "
          f"device {device}, torch threads {args.threads}, median of {args.repeats} after 1 warm-up",
          file=sys.stderr)
    rows: list[dict] = []
    for method in args.methods:
        previous: dict | None = None
        for side in args.sizes:
            shape = (side, side, side)
            if previous is not None and previous["status"] != "ok":
                row = {"method": method, "shape": list(shape), "voxels": side**3,
                       "status": "skipped (previous size failed)"}
            elif previous is not None and args.max_seconds > 0 and previous["seconds_per_step"] > args.max_seconds:
                row = {"method": method, "shape": list(shape), "voxels": side**3, "status": "skipped (too slow)"}
            else:
                row = run_one(_spec(args, method, shape, args.plane_config, args.fuser_config, args.aligned),
                              args.timeout)
                previous = row
            print(f"  {method:18s} {_size_label(row['shape']):>12s}: {row['status']}"
                  + (f", {row['seconds_per_step']:.3f} s/step" if row["status"] == "ok" else ""), file=sys.stderr)
            rows.append(row)
    if args.paper_grid:
        plane, fuser = _configs("paper", "paper", True)
        if any(s % _grid_multiple(plane, fuser) for s in PAPER_GRID):
            raise InputError(f"the paper grid {PAPER_GRID} does not fit the paper networks")
        if args.tile_size % _fuser_multiple(fuser):
            print(f"paper grid: --tile-size {args.tile_size} is not a multiple of {_fuser_multiple(fuser)}; "
                  "score-fusion-tiled skipped there", file=sys.stderr)
        for method in args.methods:
            if method == "score-fusion-tiled" and args.tile_size % _fuser_multiple(fuser):
                continue
            row = run_one(_spec(args, method, PAPER_GRID, "paper", "paper", True), args.timeout)
            row["paper_grid"] = True
            print(f"  {method:18s} paper grid: {row['status']}", file=sys.stderr)
            rows.append(row)

    print(f"planes {args.plane_config}, fuser {args.fuser_config}{' with feature alignment' if args.aligned else ''}"
          f", tile {args.tile_size}, slice batch {args.slice_batch}, {device}, torch threads {args.threads}, "
          f"median of {args.repeats} call(s) after 1 warm-up; memory: "
          + ("torch allocated peak" if device == "cuda" else "resident-set increase, one process per row"))
    if args.paper_grid:
        print("rows marked (paper): paper plane + paper fuser presets, aligned, on 192x192x152 (D, H, W = "
              f"{', '.join(str(s) for s in PAPER_GRID)})")
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: (v if isinstance(v, (int, float, list, type(None))) else str(v))
                                                  for k, v in vars(args).items() if k != "_one"},
                                         "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
