"""Learning test: a briefly trained ``tiny`` fuser predicts the noise better than the plain plane average.

Setup: the tiny SR x2 planes of ``learning_fixtures`` (4 training cases, held-out case
``ScoreFusionSim-00005``), frozen with their EMA weights. Fuser: ``tiny`` preset, phase crops
(16^3 crops), batch 2, lr 1e-3, the paper's loss 5 L1 + 150 MSE, EMA equal to the raw
weights (``ema_start`` beyond the run). Judged by the trainer's own validation: the eps MSE on
the whole held-out volume at 8 fixed steps t = 0, 143, ..., 999 with fixed noise, for the fused
estimate and for the plain average of the three planes (what the fuser starts from).

Measured when written: see the assertion message (printed on failure) and the issue note.
"""

from __future__ import annotations

import shutil

from ScoreFusionLib.bundle import read_manifest
from ScoreFusionLib.train.fuser import train_fuser
from ScoreFusionLib.train.fuser_options import FuserTrainingOptions

STEPS = 120


def test_trained_fuser_beats_the_plane_average_on_the_held_out_volume(trained_sr_planes, tmp_path):
    data, planes, _ = trained_sr_planes
    bundle = tmp_path / "bundle"
    shutil.copytree(planes, bundle)
    losses: list[float] = []
    train_fuser(
        FuserTrainingOptions(bundle=str(bundle), data=str(data), phase="crops", config="tiny", crop_size=16,
                             steps=STEPS, batch_size=2, lr=1e-3, ema_start=STEPS, val_every=STEPS // 3,
                             val_draws=8, seed=0, device="cpu", quiet=True),
        callback=lambda e: losses.append(e["loss"]) if e["event"] == "step" else None,
    )
    metrics = read_manifest(bundle).fuser["metrics"]
    history = [(h["step"], round(h["val_eps_mse"], 5), round(h["val_eps_mse_average"], 5)) for h in metrics["history"]]
    fused, average = metrics["val_eps_mse"], metrics["val_eps_mse_average"]
    message = f"held-out eps MSE fused {fused:.5f} vs average {average:.5f}; (step, fused, average): {history}"
    assert metrics["val_cases"] == ["ScoreFusionSim-00005"]
    assert fused < 0.97 * average, message
    n = STEPS // 5
    assert sum(losses[-n:]) < sum(losses[:n]), f"training loss did not fall: {losses[:n]} ... {losses[-n:]}"
    print(message)
