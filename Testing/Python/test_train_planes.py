"""Plane-model training: CLI bundle, learning, exact resume, EMA rule, DDP, refused input.

Every test trains the ``tiny`` net on a few 16x24x16 generated cases (smooth random tissue
inside an ellipsoid, zero background), with ``--grid native`` and one CPU thread.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cohort_fixtures import write_cases

torch = pytest.importorskip("torch")

from ScoreFusionLib.bundle import load_plane_models, load_weights, read_manifest, sha256_file  # noqa: E402
from ScoreFusionLib.cli import train_cmd  # noqa: E402
from ScoreFusionLib.data import TaskSpec  # noqa: E402
from ScoreFusionLib.degradation import AveragePool  # noqa: E402
from ScoreFusionLib.diffusion import PlaneTrainingSchedule  # noqa: E402
from ScoreFusionLib.nets import unet2d_config  # noqa: E402
from ScoreFusionLib.train import (  # noqa: E402
    EMA,
    PlaneTrainingOptions,
    StepBatchSampler,
    derive_seed,
    ema_decay_at,
    train_planes,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_cases(tmp_path_factory.mktemp("cases"))


def run_cli(argv: list[str]) -> int:
    """``scorefusion train ...`` in-process."""
    from ScoreFusionLib.cli import main as cli_main

    return cli_main.main(["train", *argv])


def cli_module_args() -> list[str]:
    return ["-m", "ScoreFusionLib", "train"]


def base_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["planes", "--data", str(data), "--target", "t2f", "--config", "tiny", "--grid", "native",
            "--batch-size", "4", "--threads", "1", "--device", "cpu", "--out", str(out), *extra]


def options(data: Path, out: Path, **kw) -> PlaneTrainingOptions:
    base = dict(data=str(data), out=str(out), target="t2f", task="sr", config="tiny", grid=None, batch_size=4,
                planes=("axial",), lr=1e-3, val_every=0, quiet=True, threads=1, device="cpu")
    base.update(kw)
    return PlaneTrainingOptions(**base)


def tree(path: Path) -> dict[str, str]:
    """Every file under ``path`` with its sha256 (to prove that nothing changed)."""
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


# ---------------------------------------------------------------------------------------------
# CLI -> bundle
# ---------------------------------------------------------------------------------------------


def test_cli_writes_a_loadable_bundle(data, tmp_path, capsys):
    out = tmp_path / "bundle"
    rc = run_cli(base_args(data, out, "--task", "both", "--inputs", "t1n", "--factor", "1,1,4",
                           "--neighbors", "2", "--planes", "axial,sagittal", "--steps", "4",
                           "--val-every", "2", "--seed", "3", "--lr", "1e-3"))
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "sagittal" in err and "val_psnr=" in err and "val PSNR" in err  # progress bars + summary

    m = read_manifest(out)
    spec = TaskSpec("both", ["t1n"], "t2f", degradation=AveragePool([1, 1, 4]))
    assert m.task == spec.to_dict()
    assert m.neighbors == 2
    assert list(m.planes) == ["axial", "sagittal"]
    assert m.grid == {"shape_ijk": [16, 24, 16], "spacing": [1.0, 1.0, 1.0], "source": "native", "orientation": "RAS"}
    assert m.diffusion["plane_training_schedule"] == PlaneTrainingSchedule().to_dict()
    assert m.diffusion["noise_embedding"] == "gamma-sinusoidal"
    t = m.training
    assert t["status"] == "complete" and t["planes_pending"] == []
    assert (t["seed"], t["steps"], t["batch_size"], t["lr"]) == (3, 4, 4, 1e-3)
    assert t["ema"]["decay"] == 0.9999 and t["ema"]["warmup"] is True
    assert t["data_source"] == str(data.resolve())
    assert t["train_case_ids"] == ["ScoreFusionSim-00001", "ScoreFusionSim-00002"]
    assert t["val_case_ids"] == ["ScoreFusionSim-00003"]
    assert t["device"] == "cpu" and t["torch_version"] == torch.__version__ and t["wall_time_s"] > 0
    assert "--factor 1,1,4" in t["command_line"]
    cfg = unet2d_config("tiny", 2 * 5 + 5).to_dict()  # 2 conditions x 5 slices + coords, mask, noisy
    for plane, entry in m.planes.items():
        assert entry.config == cfg
        assert entry.file == f"plane-{plane}.safetensors"
        assert entry.sha256 == sha256_file(out / entry.file)
        assert entry.steps == 4
        met = entry.metrics
        assert np.isfinite(met["val_loss"]) and np.isfinite(met["val_psnr"]) and np.isfinite(
            met["val_psnr_reference"])
        assert [h["step"] for h in met["history"]] == [2, 4]
    assert not (out / "checkpoints").exists()
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "plane-axial.safetensors",
                                                      "plane-sagittal.safetensors"]

    _, models = load_plane_models(out)
    for plane, model in models.items():
        ema = load_weights(out / m.planes[plane].file, "ema")
        raw = load_weights(out / m.planes[plane].file, "raw")
        state = model.state_dict()
        assert all(torch.equal(state[k], ema[k]) for k in ema)
        assert max_diff(raw, ema) > 0  # the EMA lags the raw weights
        assert not model.training


# ---------------------------------------------------------------------------------------------
# learning, resume, EMA
# ---------------------------------------------------------------------------------------------


def test_training_loss_falls(data, tmp_path):
    losses: list[float] = []
    train_planes(options(data, tmp_path / "b", steps=100, val_fraction=0.0),
                 callback=lambda e: e["event"] == "step" and losses.append(e["loss"]))
    assert len(losses) == 100
    first, last = float(np.mean(losses[:20])), float(np.mean(losses[-20:]))
    assert last < 0.5 * first, f"mean loss of steps 1-20 = {first:.4f}, of steps 81-100 = {last:.4f}"
    m = read_manifest(tmp_path / "b")
    assert m.training["val_case_ids"] == [] and "val_psnr" not in m.planes["axial"].metrics


def test_resume_is_bitwise_identical(data, tmp_path):
    """6 steps per plane in one go == stop after 9 steps (axial done, coronal at 3) + --resume.

    Dropout is on, so the per-step reseeding of the global generator is exercised too, and the
    interrupted run reads memory-mapped cached cases, so the cache must reproduce them exactly.
    """
    kw = dict(planes=("axial", "coronal"), steps=6, dropout=0.1, checkpoint_every=2, val_every=3,
              thick_slice_axis="k", thick_slice_factor=4, cache=str(tmp_path / "cache"))
    full, part = tmp_path / "full", tmp_path / "part"
    train_planes(options(data, full, **kw))  # prepares the cases into the cache
    assert len(list((tmp_path / "cache").glob("*/ScoreFusionSim-*/case.json"))) == 3
    train_planes(options(data, part, stop_after=9, **kw))  # memory-maps them

    m = read_manifest(part)
    assert m.training["status"] == "stopped" and m.training["planes_pending"] == ["coronal"]
    assert list(m.planes) == ["axial"]
    assert load_plane_models(part)[1].keys() == {"axial"}  # loadable while unfinished
    state = json.loads((part / "checkpoints" / "coronal-state.json").read_text())
    assert state["step"] == 3 and state["ema"]["updates"] == 3
    axial_sha = m.planes["axial"].sha256

    train_planes(options(data, part, resume=True, **kw))
    m = read_manifest(part)
    assert m.training["status"] == "complete" and m.training["resumed"] == 1
    assert m.planes["axial"].sha256 == axial_sha  # finished plane skipped, not retrained
    assert not (part / "checkpoints").exists()
    for plane in ("axial", "coronal"):
        for which in ("raw", "ema"):
            a = load_weights(full / f"plane-{plane}.safetensors", which)
            b = load_weights(part / f"plane-{plane}.safetensors", which)
            assert all(torch.equal(a[k], b[k]) for k in a), f"{plane} {which} weights differ after resume"
        assert read_manifest(full).planes[plane].metrics["history"] == m.planes[plane].metrics["history"]
    # the comparison is not vacuous: the planes trained, and differently
    a, c = (load_weights(full / f"plane-{p}.safetensors", "raw") for p in ("axial", "coronal"))
    assert max_diff(a, c) > 1e-3


def test_ema_follows_the_documented_update():
    lin = torch.nn.Linear(2, 2)
    lin.register_buffer("count", torch.zeros(()))
    ema = EMA(lin, decay=0.9, warmup=True)
    expected = {k: v.double().clone() for k, v in lin.state_dict().items()}
    decays = []
    for n in range(100):
        with torch.no_grad():
            for p in lin.parameters():
                p.add_(0.05 * (n % 7 - 3))
            lin.count.fill_(n + 1)
        d = min(0.9, (1 + n) / (10 + n))
        assert ema_decay_at(n, 0.9) == d
        decays.append(ema.update(lin))
        for k, v in lin.state_dict().items():
            expected[k] = v.double().clone() if k == "count" else d * expected[k] + (1 - d) * v.double()
        got = ema.state_dict()
        for k in expected:
            assert torch.allclose(got[k].double(), expected[k], atol=1e-6, rtol=1e-6), (n, k)
    assert decays[0] == pytest.approx(0.1) and decays[-1] == 0.9  # warm-up, then the plain decay
    assert ema.state()["updates"] == 100 and not any(p.requires_grad for p in ema.module.parameters())
    assert ema_decay_at(0, 0.9999, warmup=False) == 0.9999


# ---------------------------------------------------------------------------------------------
# DDP
# ---------------------------------------------------------------------------------------------


def test_batch_shares_are_disjoint_and_cover_the_global_batch():
    one = StepBatchSampler(10, 4, 0, 1, 7, "axial", 0, 9)
    two = [StepBatchSampler(10, 4, r, 2, 7, "axial", 0, 9) for r in range(2)]
    for step, (b, r0, r1) in enumerate(zip(one, *two)):
        assert r0 + r1 == b and len(r0) == len(r1) == 2, step
    stream = [i for b in StepBatchSampler(10, 4, 0, 1, 7, "axial", 0, 5) for i in b]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert list(StepBatchSampler(10, 4, 0, 1, 7, "axial", 3, 9)) == list(one)[3:]  # resumable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_ddp_two_processes_match_one(data, tmp_path):
    out2, out1 = tmp_path / "ddp", tmp_path / "single"
    args = base_args(data, out2, "--planes", "axial", "--steps", "6", "--lr", "1e-3", "--val-every", "3")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", *cli_module_args(), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines() == [str(out2.resolve())]  # only rank 0 reports
    assert proc.stderr.count("val PSNR") == 1  # one summary
    m2 = read_manifest(out2)
    assert m2.training["world_size"] == 2 and m2.training["batch_size_per_process"] == 2
    assert sorted(p.name for p in out2.iterdir()) == ["manifest.json", "plane-axial.safetensors"]
    load_plane_models(out2)

    train_planes(options(data, out1, steps=6, val_every=3))
    m1 = read_manifest(out1)
    for which in ("raw", "ema"):
        a = load_weights(out1 / "plane-axial.safetensors", which)
        b = load_weights(out2 / "plane-axial.safetensors", which)
        # DDP averages the same per-sample gradients in another summation order; Adam carries
        # the rounding differences (measured ~1e-6 after 6 steps) while 6 steps at lr 1e-3 move
        # weights by up to ~6e-3.
        assert max_diff(a, b) < 2e-5, which
    from ScoreFusionLib.nets.unet2d import UNet2D

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(0, "axial", "init"))  # the run's initialisation
        init = UNet2D(unet2d_config("tiny", 6)).state_dict()
    assert max_diff(init, load_weights(out2 / "plane-axial.safetensors", "raw")) > 1e-3  # not vacuous
    h1, h2 = m1.planes["axial"].metrics["history"], m2.planes["axial"].metrics["history"]
    assert [h["step"] for h in h2] == [3, 6]
    for a, b in zip(h1, h2):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)


# ---------------------------------------------------------------------------------------------
# refused input: exit code 2, a specific message, nothing written
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--planes", "axial,oblique"], "unknown plane 'oblique'"),
        (["--grid", "18", "24", "16"], "axis i has 18 voxels, not a multiple of 4"),
        (["--factor", "3"], "not a multiple of the SR factor 3"),
        (["--task", "mt", "--inputs", "t2w"], "has no 't2w' image"),
        (["--amp", "bf16"], "needs a CUDA device"),
        (["--resume"], "nothing to resume"),
        (["--factor", "4", "--thick-slice-axis", "k", "--thick-slice-factor", "4"], "not both"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(data, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    rc = run_cli(base_args(data, out, "--steps", "2", *extra))
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert not out.exists()


def test_native_grid_not_divisible(tmp_path, capsys):
    odd = write_cases(tmp_path / "odd", n=2, shape_ijk=(18, 24, 16))
    rc = run_cli(base_args(odd, tmp_path / "out", "--steps", "2"))
    err = capsys.readouterr().err
    assert rc == 2 and "native grid of case ScoreFusionSim-00001" in err and "18 voxels" in err, err
    assert not (tmp_path / "out").exists()


def test_uneven_ddp_split_is_refused(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    rc = run_cli(base_args(data, tmp_path / "out", "--steps", "2"))
    err = capsys.readouterr().err
    assert rc == 2 and "cannot be split evenly over 3 processes" in err, err
    assert not (tmp_path / "out").exists()


def test_existing_output_and_mismatched_resume(data, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    rc = run_cli(base_args(data, out, "--steps", "2", "--planes", "axial"))
    err = capsys.readouterr().err
    assert rc == 2 and "is not empty; pass --overwrite" in err, err
    assert tree(out) == {"notes.txt": sha256_file(out / "notes.txt")}

    assert run_cli(base_args(data, out, "--steps", "2", "--planes", "axial", "--overwrite", "--quiet")) == 0
    capsys.readouterr()
    before = tree(out)
    assert "notes.txt" in before and "plane-axial.safetensors" in before  # only bundle files replaced

    rc = run_cli(base_args(data, out, "--steps", "4", "--planes", "axial", "--resume", "--lr", "1e-2"))
    err = capsys.readouterr().err
    assert rc == 2 and "cannot resume" in err and "lr (--lr): was 5e-05, now 0.01" in err, err
    rc = run_cli(base_args(data, out, "--steps", "4", "--planes", "axial", "--resume", "--config", "small"))
    err = capsys.readouterr().err
    assert rc == 2 and "config (--config" in err, err
    rc = run_cli(base_args(data, out, "--steps", "2", "--planes", "axial", "--resume", "--overwrite"))
    assert rc == 2 and "contradict" in capsys.readouterr().err
    assert tree(out) == before

    # a matching --resume of a complete run changes no weights
    assert run_cli(base_args(data, out, "--steps", "2", "--planes", "axial", "--resume", "--quiet")) == 0
    after = tree(out)
    assert after["plane-axial.safetensors"] == before["plane-axial.safetensors"]


def test_train_is_registered_on_the_main_command(capsys):
    from ScoreFusionLib.cli import main as cli_main

    assert train_cmd in cli_main.SUBCOMMANDS, "add cli.train_cmd to ScoreFusionLib.cli.main.SUBCOMMANDS"
    with pytest.raises(SystemExit) as exc:
        cli_main.main(["train", "planes", "--help"])
    assert exc.value.code == 0
    assert "--thick-slice-axis" in capsys.readouterr().out


def test_training_sees_lps_files_in_the_orientation_inference_uses(tmp_path):
    """BraTS files are stored LPS; plane models must be trained on RAS-reoriented arrays, the
    orientation ``translate`` feeds them, or every slice would be mirrored at inference."""
    import nibabel as nib

    from ScoreFusionLib.data.task import TaskSpec
    from ScoreFusionLib.train.cases import load_training_data
    from ScoreFusionLib.train.options import PlaneTrainingOptions

    kji = (8, 12, 16)
    rng = np.random.default_rng(0)
    lps = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 11.0], [0, 0, 1.0, 0], [0, 0, 0, 1]])
    raw = {}
    for c in range(1, 3):
        cid = f"ScoreFusionSim-{c:05d}"
        (tmp_path / cid).mkdir()
        for con in ("t1n", "t2f"):
            arr = rng.random(kji).astype(np.float32) + 0.1
            raw[(cid, con)] = arr
            nib.save(nib.Nifti1Image(np.transpose(arr, (2, 1, 0)), lps), str(tmp_path / cid / f"{cid}-{con}.nii.gz"))
    options = PlaneTrainingOptions(data=tmp_path, out=tmp_path / "out", target="t2f", task="mt", inputs=["t1n"],
                                   config="tiny", grid=None, val_fraction=0.5)
    spec = TaskSpec(kind="mt", inputs=["t1n"], target="t2f")
    data = load_training_data(options, spec)
    case = data.train[0]
    expected = raw[(case.case_id, "t1n")][:, ::-1, ::-1]  # flip j (P->A) and i (L->R): RAS-aligned
    lo, hi = expected.min(), expected.max()
    np.testing.assert_allclose(case.conditions[0], 2 * (expected - lo) / (hi - lo) - 1, atol=1e-6)
    assert np.allclose(np.diag(case.affine)[:3], [1.0, 1.0, 1.0])
