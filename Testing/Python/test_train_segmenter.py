"""``scorefusion train segmenter``: learning, exact repeatability, DDP, the bundle it writes, refused input.

The cases are small generated heads (24^3 voxels of 2 mm) with a spherical lesion (oedema,
enhancing shell, necrotic centre) at a random place; the tiny SegResNet preset trains on 16^3
crops with one CPU thread.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from segmenter_fixtures import write_tumour_cases

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from ScoreFusionLib.bundle import load_weights  # noqa: E402
from ScoreFusionLib.cli.main import main  # noqa: E402
from ScoreFusionLib.metrics import dice  # noqa: E402
from ScoreFusionLib.segmentation.inference import segment  # noqa: E402
from ScoreFusionLib.segmentation.model_bundle import read_segmenter_manifest  # noqa: E402
from ScoreFusionLib.segmentation.training import SegmenterTrainingOptions, train_segmenter  # noqa: E402
from ScoreFusionLib.volume_io import load_volume  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
COMMON = ["--crop-size", "16", "--batch-size", "2", "--val-fraction", "0.4", "--threads", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Path:
    return write_tumour_cases(tmp_path_factory.mktemp("tumour-cases"), n=5)


@pytest.fixture(scope="module")
def trained(cases, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "seg"
    card = tmp_path_factory.mktemp("card") / "card.md"
    card.write_text("# test card\n")
    rc = main(["train", "segmenter", "--data", str(cases), "--steps", "120", "--lr", "5e-3", "--quiet",
               "--model-id", "test-seg", "--card", str(card), "--out", str(out), *COMMON])
    return rc, out


def test_cli_writes_a_complete_segmenter_bundle(trained, cases):
    rc, out = trained
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["card.md", "manifest.json", "segmenter.safetensors"]
    m = read_segmenter_manifest(out)
    assert m.channels == ("t1n", "t1c", "t2w", "t2f") and m.spacing_mm == (2.0, 2.0, 2.0)
    assert m.roi_size_ijk == (16, 16, 16) and m.label_convention == "brats2023"
    assert m.model == {"id": "test-seg", "card": "card.md"}
    t = m.training
    assert t["train_case_ids"] == [f"ScoreFusionSim-0000{i}" for i in (1, 2, 3)]
    assert t["val_case_ids"] == ["ScoreFusionSim-00004", "ScoreFusionSim-00005"]
    assert t["command"].startswith("scorefusion train segmenter --data")
    assert set(load_weights(out / "segmenter.safetensors", "raw")) == set(load_weights(out / "segmenter.safetensors"))


def test_training_learns_and_beats_a_baseline(trained, cases):
    _, out = trained
    m = read_segmenter_manifest(out)
    assert m.training["mean_loss_last_tenth"] < 0.5 * m.training["mean_loss_first_tenth"]
    # the held-out Dice of the manifest is what segment() gives on the held-out files
    for case_id in m.training["val_case_ids"]:
        folder = cases / case_id
        volumes = {c: load_volume(folder / f"{case_id}-{c}.nii.gz") for c in ("t1n", "t1c", "t2w", "t2f")}
        truth = load_volume(folder / f"{case_id}-seg.nii.gz").array.astype(np.uint8)
        labels = segment(volumes, out, device="cpu").labels.array
        head = volumes["t1n"].array != 0
        baseline = dice(head, truth > 0)  # "the whole head is tumour"
        assert dice(labels > 0, truth > 0) > max(0.8, baseline + 0.5), case_id
    assert min(m.metrics["held_out_dice"].values()) > 0.6


def _options(cases: Path, out: Path, **kw) -> SegmenterTrainingOptions:
    base = dict(data=str(cases), out=str(out), crop_size=16, steps=4, batch_size=2, val_fraction=0.4,
                threads=1, device="cpu", quiet=True, lr=5e-3)
    base.update(kw)
    return SegmenterTrainingOptions(**base)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_same_seed_same_weights_and_the_callers_random_state_is_kept(cases, tmp_path):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    train_segmenter(_options(cases, tmp_path / "a"))
    assert torch.equal(torch.rand(3), expected_next)
    train_segmenter(_options(cases, tmp_path / "b"))
    train_segmenter(_options(cases, tmp_path / "c", seed=1))
    a, b, c = (load_weights(tmp_path / n / "segmenter.safetensors", "raw") for n in "abc")
    assert _max_diff(a, b) == 0.0
    assert _max_diff(a, c) > 1e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one(cases, tmp_path):
    out2, out1 = tmp_path / "ddp", tmp_path / "single"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "-m", "ScoreFusionLib", "train", "segmenter",
           "--data", str(cases), "--steps", "4", "--lr", "1e-3", "--quiet", "--out", str(out2), *COMMON]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines() == [str(out2.resolve())]  # only rank 0 reports
    m2 = read_segmenter_manifest(out2)
    assert m2.training["world_size"] == 2 and m2.training["batch_size_per_process"] == 1
    train_segmenter(_options(cases, out1, lr=1e-3))
    m1 = read_segmenter_manifest(out1)
    # Same initialisation and the same crops: the first step's global loss agrees to rounding, and the
    # runs stay together. (Weights are not compared elementwise: Adam's first updates are about
    # lr * sign(g), so parameters with near-zero gradients move by rounding noise.)
    curve1, curve2 = m1.training["loss_curve"], m2.training["loss_curve"]
    assert len(curve1) == len(curve2) == 4
    assert curve2[0] == pytest.approx(curve1[0], rel=1e-5)
    assert curve2 == pytest.approx(curve1, rel=1e-3)
    a = load_weights(out1 / "segmenter.safetensors", "raw")
    b = load_weights(out2 / "segmenter.safetensors", "raw")
    changed = [k for k in a if float((a[k] - b[k]).abs().max()) > 1e-3]
    assert len(changed) < len(a) // 4, changed  # most tensors agree closely


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--crop-size", "20"], "multiple of 8"),
        (["--channels", "t1n,t1n"], "different contrasts"),
        (["--channels", "t1n,dwi"], "unknown contrast"),
        (["--val-fraction", "0"], "val fraction"),
        (["--preset", "monai-brats", "--crop-size", "12"], "multiple of 8"),
        (["--card", "no-such-card.md"], "cannot read the model card no-such-card.md"),
    ],
)
def test_bad_options_exit_2_and_write_nothing(cases, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    args = ["train", "segmenter", "--data", str(cases), "--steps", "2", "--out", str(out), *COMMON]
    # later flags win in argparse, so the bad value overrides COMMON's
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_unlabelled_cases_and_an_existing_output_are_refused(cases, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(cases, data)
    (data / "ScoreFusionSim-00002" / "ScoreFusionSim-00002-seg.nii.gz").unlink()
    out = tmp_path / "out"
    assert main(["train", "segmenter", "--data", str(data), "--steps", "2", "--out", str(out), *COMMON]) == 2
    assert "have no segmentation (ScoreFusionSim-00002)" in capsys.readouterr().err
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["train", "segmenter", "--data", str(cases), "--steps", "2", "--out", str(out), *COMMON]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_segmenter_is_a_train_stage(capsys):
    with pytest.raises(SystemExit):
        main(["train", "segmenter", "--help"])
    text = capsys.readouterr().out
    assert "torchrun" in text and "--tumour-fraction" in text
