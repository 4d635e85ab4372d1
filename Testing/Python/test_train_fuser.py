"""Fuser training (``train_fuser``, ``scorefusion train fuser``; method.md 5.2-5.4, pitfalls 7, 11, 12).

One module fixture writes five 16x24x16 generated cases (four train, one validates) and trains
three tiny plane models (dropout 0.1, 3 steps each) on them; every test trains its fuser in its
own copy of that bundle, on one CPU thread. What is proven:

- phase crops writes ``fuser-crops.safetensors`` and a manifest ``fuser`` entry (phase, file
  sha256, the plane sha256s and weight set it was trained with, held-out metrics, ``phases``)
  that :func:`load_fuser` accepts; the callback sees finite step losses; no checkpoint is left;
- a run stopped after 2 of 4 steps and resumed ends with bitwise the same raw and EMA weights
  and validation history as the uninterrupted run; a resume with a changed option is refused
  naming the field, and a resume of a finished phase is refused (it would retrain and replace
  it); neither writes anything;
- phase full starts from phase crops' EMA (not raw) ``net`` weights with zero alignment convs,
  so before its first step it fuses exactly like the crops fuser at inference (an independent
  :class:`ScoreFusionModel`); it then trains the alignment and records both phases; retraining
  phase crops drops the stale phase full; phase full without a crops fuser needs --from-scratch;
- the frozen plane models stay in eval mode (dropout off) with ``requires_grad`` False and no
  gradients, also after validation passes, and their weights (files and memory) never change;
- the EMA rule: a plain copy up to ``ema_start``, then ``d * ema + (1 - d) * raw`` every step;
- bad options, an existing phase without --overwrite and another cohort's cases (or another split)
  are refused with specific messages and nothing written;
- the CLI trains and prints the bundle (exit 0) and refuses a missing bundle (exit 2);
- ``fuser_loss`` is ``5 mean|d| + 150 mean d^2``; the defaults are the paper's;
- two ``torchrun`` processes (gloo) give the same weights as one process with the same batch.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cohort_fixtures import write_cases
from ScoreFusionLib.bundle import load_fuser, load_plane_models, load_weights, read_manifest, sha256_file
from ScoreFusionLib.errors import InputError
from ScoreFusionLib.train import PlaneTrainingOptions, train_planes
from ScoreFusionLib.train import fuser as fuser_mod
from ScoreFusionLib.train.fuser import FUSER_SIGNATURE_FIELDS, fuser_loss, train_fuser
from ScoreFusionLib.train.fuser_options import FuserTrainingOptions
from ScoreFusionLib.train.outputs import ResumeError
from ScoreFusionLib.train.state import load_training_state

REPO = Path(__file__).resolve().parents[2]
PLANES = ("axial", "coronal", "sagittal")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, Path]:
    """(data folder, plane bundle): 5 cases, three tiny planes with dropout, 3 steps each."""
    root = tmp_path_factory.mktemp("fuser")
    data = write_cases(root / "data", 5)
    planes = root / "planes"
    train_planes(PlaneTrainingOptions(data=str(data), out=str(planes), target="t2f", task="sr", config="tiny",
                                      grid=None, planes=PLANES, batch_size=2, steps=3, lr=1e-3, dropout=0.1,
                                      val_every=0, quiet=True, threads=1, device="cpu"))
    return data, planes


@pytest.fixture
def bundle(cohort, tmp_path) -> Path:
    """A private copy of the plane bundle."""
    return Path(shutil.copytree(cohort[1], tmp_path / "bundle"))


@pytest.fixture
def data(cohort) -> Path:
    return cohort[0]


def opts(bundle: Path, data: Path, **kw) -> FuserTrainingOptions:
    base = dict(bundle=str(bundle), data=str(data), phase="crops", config="tiny", crop_size=16, steps=3,
                batch_size=2, lr=1e-3, val_every=0, val_draws=2, device="cpu", quiet=True)
    base.update(kw)
    return FuserTrainingOptions(**base)


def tree(path: Path) -> dict[str, str]:
    """Every file under ``path`` with its sha256 (to prove that nothing changed)."""
    return {str(p.relative_to(path)): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def weights(bundle: Path, phase: str, which: str) -> dict:
    return load_weights(bundle / f"fuser-{phase}.safetensors", which)


def strip_times(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if "time" not in k} for h in history]


# ---------------------------------------------------------------------------------------------
# phase crops: outputs
# ---------------------------------------------------------------------------------------------


def test_crops_phase_writes_a_loadable_fuser(bundle, data):
    events: list[dict] = []
    planes_before = {p: sha256_file(bundle / f"plane-{p}.safetensors") for p in PLANES}
    out = train_fuser(opts(bundle, data, lr=1e-5), callback=events.append)
    assert out == bundle.resolve()

    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3]
    assert all(math.isfinite(e["loss"]) and e["loss"] > 0 for e in steps)
    assert [e["step"] for e in events if e["event"] == "validation"] == [3]  # val_every=0: only at the end

    assert not (bundle / "checkpoints").exists()
    assert sorted(p.name for p in bundle.iterdir()) == sorted(
        ["manifest.json", "fuser-crops.safetensors", *(f"plane-{p}.safetensors" for p in PLANES)])
    m = read_manifest(bundle)
    f = m.fuser
    assert f["phase"] == "crops" and f["file"] == "fuser-crops.safetensors" and f["steps"] == 3
    assert f["sha256"] == sha256_file(bundle / "fuser-crops.safetensors")
    assert f["plane_sha256"] == {p: e.sha256 for p, e in m.planes.items()} == planes_before
    assert f["plane_weights"] == "ema"
    met = f["metrics"]
    for key in ("val_eps_mse", "val_eps_mse_average", "val_loss"):
        assert math.isfinite(met[key]) and met[key] > 0, key
    assert met["val_cases"] == ["ScoreFusionSim-00005"] and [h["step"] for h in met["history"]] == [3]
    assert list(f["phases"]) == ["crops"] and f["phases"]["crops"]["sha256"] == f["sha256"]
    assert f["config"]["aligned_sources"] == [] and f["config"]["base_channels"] == 8  # tiny, no alignment
    assert f["training"]["train_case_ids"] == m.training["train_case_ids"]
    assert f["training"]["crop_dhw"] == [16, 16, 16]
    assert f["training"]["options"]["lr"] == 1e-5

    _, model = load_fuser(bundle)
    assert model.alignment is None and not model.training
    assert same(model.state_dict(), weights(bundle, "crops", "ema"))


# ---------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------


def test_resume_is_bitwise_identical(bundle, data, tmp_path):
    kw = dict(steps=4, ema_start=2, ema_every=1)  # the EMA switches from copying to averaging mid-run
    straight = Path(shutil.copytree(bundle, tmp_path / "straight"))
    train_fuser(opts(straight, data, **kw))

    train_fuser(opts(bundle, data, stop_after=2, **kw))
    assert read_manifest(bundle).fuser is None  # nothing finished yet
    state = load_training_state(bundle, "fuser-crops")
    assert state["info"]["step"] == 2 and state["info"]["ema"]["updates"] == 0
    assert same(state["raw"], state["ema"])  # steps 1-2 <= ema_start: a plain copy
    train_fuser(opts(bundle, data, resume=True, **kw))

    assert not (bundle / "checkpoints").exists()
    for which in ("raw", "ema"):
        assert same(weights(straight, "crops", which), weights(bundle, "crops", which)), which
    a, b = read_manifest(straight).fuser, read_manifest(bundle).fuser
    assert strip_times(a["metrics"]["history"]) == strip_times(b["metrics"]["history"])
    assert b["steps"] == 4
    assert max_diff(state["raw"], weights(bundle, "crops", "raw")) > 1e-4  # steps 3-4 moved the weights


def test_resume_with_changed_options_is_refused(bundle, data):
    train_fuser(opts(bundle, data, steps=4, stop_after=2))
    before = tree(bundle)
    for change, field in [({"lr": 2e-3}, "lr (--lr): was 0.001, now 0.002"), ({"seed": 1}, "seed (--seed)"),
                          ({"crop_size": 8}, "crop (--crop-size/--full-volume)"),
                          ({"l1_weight": 1.0}, "loss (--l1-weight/--mse-weight/--loss-weighting)")]:
        with pytest.raises(ResumeError, match="cannot resume") as exc:
            train_fuser(opts(bundle, data, steps=4, resume=True, **change))
        assert field in str(exc.value), str(exc.value)
        assert tree(bundle) == before, change
    assert set(FUSER_SIGNATURE_FIELDS) >= {"lr", "seed", "crop", "loss", "plane_sha256", "train_case_ids"}

    train_fuser(opts(bundle, data, steps=4, resume=True))  # the matching resume finishes the run
    finished = tree(bundle)
    assert "fuser-crops.safetensors" in finished and not (bundle / "checkpoints").exists()
    # a finished phase has nothing to resume: retraining would silently replace it (and drop phase full)
    with pytest.raises(ResumeError, match="nothing to resume.*finished"):
        train_fuser(opts(bundle, data, steps=4, resume=True, lr=2e-3))
    assert tree(bundle) == finished


# ---------------------------------------------------------------------------------------------
# phase full
# ---------------------------------------------------------------------------------------------


def _inference_eps(bundle: Path, fuser, item, t: int, eps):
    """Fused eps of the inference path (an independent ScoreFusionModel over the bundle's planes)."""
    from ScoreFusionLib.diffusion.schedule import FusedSchedule
    from ScoreFusionLib.fusion.score_fusion import MAIN_GROUP, PlaneGroup, ScoreFusionModel
    from ScoreFusionLib.fusion.slice_scorer import SliceScorer, VolumeConditioning

    manifest, planes = load_plane_models(bundle)
    cond = VolumeConditioning(item.conditions, item.coords, item.mask)
    scorers = {p: SliceScorer(m, p, manifest.neighbors, 8) for p, m in planes.items()}
    sfm = ScoreFusionModel(fuser, [PlaneGroup(MAIN_GROUP, scorers, cond)], cond)
    schedule = FusedSchedule()
    with torch.no_grad():
        return sfm(schedule.q_sample(item.r0, t, eps), t, schedule.abar(t))


def test_phase_full_continues_from_the_crops_ema(bundle, data, monkeypatch):
    train_fuser(opts(bundle, data, ema_start=0, ema_every=1))  # EMA != raw, to tell which one is loaded
    crops = read_manifest(bundle).fuser
    crops_ema, crops_raw = weights(bundle, "crops", "ema"), weights(bundle, "crops", "raw")
    assert max_diff(crops_ema, crops_raw) > 1e-5
    _, crops_fuser = load_fuser(bundle)

    seen: dict = {}
    build = fuser_mod._FuserSession.build

    def spy(session):
        model = build(session)
        case = session.data.train[0]
        item = fuser_mod._item(case, (0, 0, 0), case.shape, "cpu")
        eps = torch.randn(tuple(item.r0.shape), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            seen["full"] = session.predict(model, item, 300, eps)[0]
            seen["crops"] = session.predict(crops_fuser, item, 300, eps)[0]
        seen["inference"] = _inference_eps(bundle, crops_fuser, item, 300, eps)
        seen["state"] = {k: v.clone() for k, v in model.state_dict().items()}
        seen["crop"] = (session.crop, case.shape)
        return model

    with pytest.raises(InputError, match="differs from the 'paper' preset"):  # phase B keeps phase A's net
        train_fuser(opts(bundle, data, phase="full", config="paper", steps=1, batch_size=1))
    monkeypatch.setattr(fuser_mod._FuserSession, "build", spy)
    train_fuser(opts(bundle, data, phase="full", config=None, steps=2, batch_size=1, val_draws=1))

    state = seen["state"]
    net = {k: v for k, v in state.items() if k.startswith("net.")}
    align = {k: v for k, v in state.items() if k.startswith("alignment.")}
    assert align and all(not v.any() for v in align.values())  # zero-initialised alignment (pitfall 11)
    assert same(net, crops_ema) and not same(net, crops_raw)  # phase B starts from phase A's EMA
    assert seen["crop"][0] == tuple(seen["crop"][1]) and sorted(seen["crop"][0]) == [16, 16, 24]  # whole volumes
    assert torch.equal(seen["full"], seen["crops"])
    assert torch.allclose(seen["full"], seen["inference"], atol=1e-5, rtol=0)
    assert float((seen["full"] - seen["full"].mean()).abs().max()) > 0  # not a degenerate output

    m = read_manifest(bundle)
    f = m.fuser
    assert f["phase"] == "full" and f["file"] == "fuser-full.safetensors" and f["steps"] == 2
    assert f["sha256"] == sha256_file(bundle / "fuser-full.safetensors")
    assert list(f["phases"]) == ["crops", "full"] and f["phases"]["crops"] == crops["phases"]["crops"]
    assert [s for s, _ in f["config"]["aligned_sources"]] == list(PLANES)
    _, full = load_fuser(bundle)
    assert full.alignment is not None
    assert any(p.abs().max() > 0 for p in full.alignment.parameters())  # the alignment convs trained
    assert same(weights(bundle, "crops", "ema"), crops_ema)  # phase A's file untouched

    monkeypatch.setattr(fuser_mod._FuserSession, "build", build)
    with pytest.raises(InputError, match="already has a phase-crops fuser"):
        train_fuser(opts(bundle, data, steps=1))
    train_fuser(opts(bundle, data, steps=1, overwrite=True))
    f = read_manifest(bundle).fuser
    assert f["phase"] == "crops" and list(f["phases"]) == ["crops"]  # the stale phase B is dropped
    assert load_fuser(bundle)[1].alignment is None


def test_phase_full_needs_a_crops_fuser_or_from_scratch(bundle, data):
    before = tree(bundle)
    with pytest.raises(InputError, match="no phase-crops fuser to start phase full from.*--from-scratch"):
        train_fuser(opts(bundle, data, phase="full", steps=1, batch_size=1))
    assert tree(bundle) == before

    train_fuser(opts(bundle, data, phase="full", from_scratch=True, steps=1, batch_size=1, val_draws=1))
    f = read_manifest(bundle).fuser
    assert f["phase"] == "full" and list(f["phases"]) == ["full"]
    assert load_fuser(bundle)[1].alignment is not None


# ---------------------------------------------------------------------------------------------
# frozen planes, EMA
# ---------------------------------------------------------------------------------------------


def test_plane_models_stay_frozen_and_in_eval_mode(bundle, data, monkeypatch):
    files = {p: sha256_file(bundle / f"plane-{p}.safetensors") for p in PLANES}
    calls: list[tuple[bool, bool, bool, bool]] = []
    sessions = []
    predict = fuser_mod._FuserSession.predict

    def spy(session, model, item, t, eps, checkpoint=False):
        modules = [m for plane in session.planes.values() for m in plane.modules()]
        params = [p for plane in session.planes.values() for p in plane.parameters()]
        calls.append((model.training, any(m.training for m in modules), any(p.requires_grad for p in params),
                      any(p.grad is not None for p in params)))
        if not sessions:
            sessions.append(session)
        return predict(session, model, item, t, eps, checkpoint)

    monkeypatch.setattr(fuser_mod._FuserSession, "predict", spy)
    # validation after every step: pitfall 12 is a train() after a validation pass re-enabling dropout
    train_fuser(opts(bundle, data, steps=3, val_every=1, val_draws=1))

    assert [c[0] for c in calls] == [True, True, False] * 3  # 2 training items, 1 validation item per step
    assert not any(c[1] for c in calls), "a plane model was in training mode (dropout on)"
    assert not any(c[2] for c in calls), "a plane parameter requires grad"
    assert not any(c[3] for c in calls), "a plane parameter received a gradient"
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in sessions[0].planes["axial"].modules())
    for plane, model in sessions[0].planes.items():
        assert same(model.state_dict(), load_weights(bundle / f"plane-{plane}.safetensors", "ema")), plane
    assert {p: sha256_file(bundle / f"plane-{p}.safetensors") for p in PLANES} == files
    assert read_manifest(bundle).fuser["plane_sha256"] == files


def test_ema_is_a_copy_before_ema_start_then_an_average(bundle, data, tmp_path):
    copy = Path(shutil.copytree(bundle, tmp_path / "copy"))
    train_fuser(opts(copy, data, steps=3, ema_start=10, ema_every=1))
    raw, ema = weights(copy, "crops", "raw"), weights(copy, "crops", "ema")
    assert same(raw, ema)

    avg = Path(shutil.copytree(bundle, tmp_path / "avg"))
    train_fuser(opts(avg, data, steps=3, ema_start=0, ema_every=1))
    assert max_diff(weights(avg, "crops", "raw"), weights(avg, "crops", "ema")) > 1e-5
    assert same(raw, weights(avg, "crops", "raw"))  # the EMA rule does not touch the trained weights

    # step 1 <= ema_start=1: copy; step 2: ema = d * raw_1 + (1 - d) * raw_2
    kw = dict(steps=2, ema_start=1, ema_every=1, ema_decay=0.9)
    train_fuser(opts(bundle, data, stop_after=1, **kw))
    first = load_training_state(bundle, "fuser-crops")
    assert same(first["raw"], first["ema"])
    train_fuser(opts(bundle, data, resume=True, **kw))
    raw2, ema2 = weights(bundle, "crops", "raw"), weights(bundle, "crops", "ema")
    expected = {k: 0.9 * first["raw"][k].double() + 0.1 * raw2[k].double() for k in raw2}
    assert max_diff(ema2, expected) < 1e-6
    assert max_diff(ema2, raw2) > 1e-5


# ---------------------------------------------------------------------------------------------
# refused input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        ({"phase": "middle"}, "unknown --phase 'middle'"),
        ({"crop_size": 12}, "--crop-size must be a multiple of 8"),
        ({"resume": True, "overwrite": True}, "--resume and --overwrite contradict"),
        ({"l1_weight": 0.0, "mse_weight": 0.0}, "--l1-weight and --mse-weight cannot both be 0"),
        ({"from_scratch": True}, "--from-scratch only applies to --phase full"),
        ({"config": "huge"}, "unknown fuser --config 'huge'"),
        ({"batch_size": 0}, "--batch-size must be a whole number >= 1"),
        ({"plane_weights": "best"}, "--plane-weights must be ema or raw"),
    ],
)
def test_bad_options_are_refused(bundle, data, change, message):
    before = tree(bundle)
    with pytest.raises(InputError) as exc:
        train_fuser(opts(bundle, data, **change))
    assert message in str(exc.value), str(exc.value)
    assert tree(bundle) == before


def test_existing_phase_needs_overwrite(bundle, data):
    train_fuser(opts(bundle, data, steps=1))
    before = tree(bundle)
    with pytest.raises(InputError, match="already has a phase-crops fuser; pass --overwrite"):
        train_fuser(opts(bundle, data, steps=1, lr=2e-3))
    assert tree(bundle) == before


def test_other_cases_are_refused(bundle, data, tmp_path):
    before = tree(bundle)
    other = write_cases(tmp_path / "other", 5, first=11)  # same grid, other case ids
    with pytest.raises(InputError, match="training cases differ.*same split"):
        train_fuser(opts(bundle, other))
    fewer = write_cases(tmp_path / "fewer", 4)  # same ids, but the split moves case 4 to validation
    with pytest.raises(InputError, match="same split"):
        train_fuser(opts(bundle, fewer))
    assert tree(bundle) == before


# ---------------------------------------------------------------------------------------------
# CLI, loss, defaults
# ---------------------------------------------------------------------------------------------


def _cli(bundle: Path, data: Path, *extra: str) -> list[str]:
    return ["train", "fuser", "--bundle", str(bundle), "--data", str(data), "--config", "tiny", "--crop-size", "16",
            "--steps", "2", "--batch-size", "1", "--val-draws", "1", "--device", "cpu", "--quiet", *extra]


def test_cli_trains_and_reports(bundle, data, tmp_path, capsys):
    from ScoreFusionLib.cli import main as cli_main

    assert cli_main.main(_cli(bundle, data)) == 0
    out = capsys.readouterr()
    assert out.out.strip().splitlines() == [str(bundle.resolve())]
    assert "fuser phase crops: 2 steps" in out.err and "held-out eps MSE fused" in out.err
    f = read_manifest(bundle).fuser
    assert f["steps"] == 2 and f["training"]["options"]["batch_size"] == 1
    assert f["training"]["options"]["command_line"].startswith("scorefusion train fuser --bundle")

    missing = tmp_path / "missing"
    assert cli_main.main(_cli(missing, data)) == 2
    assert "not a model bundle" in capsys.readouterr().err
    assert not missing.exists()


def test_fuser_loss_is_5_l1_plus_150_mse():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    d = (a - b).double().numpy()
    expected = 5 * np.abs(d).mean() + 150 * (d**2).mean()
    assert float(fuser_loss(a, b, 5.0, 150.0)) == pytest.approx(expected, rel=1e-6)
    assert float(fuser_loss(a.half(), b, 5.0, 150.0)) == pytest.approx(
        float(fuser_loss(a.half().float(), b, 5.0, 150.0)), rel=1e-7)  # computed in float32
    assert float(fuser_loss(a, a, 5.0, 150.0)) == 0.0
    d0 = FuserTrainingOptions(bundle="b", data="d")
    assert (d0.l1_weight, d0.mse_weight, d0.lr, d0.batch_size, d0.crop_size) == (5.0, 150.0, 1e-5, 4, 64)
    assert (d0.ema_decay, d0.ema_every, d0.ema_start, d0.plane_weights, d0.grad_clip) == (0.995, 10, 2000, "ema", 0.0)


# ---------------------------------------------------------------------------------------------
# DDP
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_ddp_two_processes_match_one(bundle, data, tmp_path):
    single = Path(shutil.copytree(bundle, tmp_path / "single"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    args = _cli(bundle, data, "--batch-size", "2", "--lr", "1e-3", "--ema-start", "0", "--ema-every", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "-m", "ScoreFusionLib", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines() == [str(bundle.resolve())]  # only rank 0 reports
    f2 = read_manifest(bundle).fuser
    assert f2["training"]["world_size"] == 2 and f2["steps"] == 2

    train_fuser(opts(single, data, steps=2, batch_size=2, val_draws=1, ema_start=0, ema_every=1))
    f1 = read_manifest(single).fuser
    assert f1["training"]["world_size"] == 1
    for which in ("raw", "ema"):
        # the all-reduced sum adds the same two per-item gradients in the same order: measured bitwise equal
        assert max_diff(weights(single, "crops", which), weights(bundle, "crops", which)) < 1e-6, which
    assert f1["metrics"]["val_eps_mse"] == pytest.approx(f2["metrics"]["val_eps_mse"], rel=1e-5)
    from ScoreFusionLib.nets.fuser_config import Fuser3DConfig
    from ScoreFusionLib.nets.score_fuser import ScoreFuser

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7919)  # the run's initialisation (seed 0)
        init = ScoreFuser(Fuser3DConfig.from_dict(f1["config"])).state_dict()
    assert max_diff(init, weights(single, "crops", "raw")) > 1e-4  # the two steps moved the weights


def test_min_snr_weighting_scales_down_only_the_nearly_noise_free_steps():
    from ScoreFusionLib.diffusion.schedule import FusedSchedule
    from ScoreFusionLib.train.fuser import MIN_SNR_GAMMA, loss_weight

    sched = FusedSchedule()
    for t in (0, 10, 50, 200, 999):
        assert loss_weight(t, "uniform") == 1.0
        snr = sched.abar(t) / (1 - sched.abar(t))
        assert loss_weight(t, "min-snr") == pytest.approx(min(snr, MIN_SNR_GAMMA) / snr, rel=1e-12)
    assert loss_weight(0, "min-snr") < 1e-3 and loss_weight(200, "min-snr") == 1.0
    with pytest.raises(InputError, match="loss-weighting"):
        FuserTrainingOptions(bundle="b", data="d", loss_weighting="snr").validate()
