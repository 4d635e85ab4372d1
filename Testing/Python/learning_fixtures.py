"""The shared learning-test setup: tiny SR x2 plane models trained on a small simulated cohort.

* data: 5 simulated cases (2 mm, no noise, seed 11), central 48x56x48 crop; the paper split
  trains on 4 and holds out ``ScoreFusionSim-00005``;
* training: ``tiny`` planes, axial + coronal + sagittal, SR x2 (average pooling), 300 steps each,
  batch 8, lr 1e-3, EMA 0.999.

The planes and the fuser learning tests share one training run (a session fixture in
``conftest.py``) because it is the slowest part of the suite.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ScoreFusionLib.simulator import write_cohort
from ScoreFusionLib.train import PlaneTrainingOptions, train_planes

GRID = (48, 56, 48)
STEPS = 300
HELD_OUT = "ScoreFusionSim-00005"


def train_learning_planes(root: Path) -> tuple[Path, Path, dict[str, list[float]]]:
    """Simulate the cohort and train the planes; returns (data folder, bundle, per-plane losses)."""
    data = root / "sim"
    write_cohort(data, 5, seed=11, spacing=2.0, noise=False)
    losses: dict[str, list[float]] = {}

    def record(event: dict) -> None:
        if event["event"] == "step":
            losses.setdefault(event["plane"], []).append(float(event["loss"]))

    threads = torch.get_num_threads()
    try:
        bundle = train_planes(
            PlaneTrainingOptions(
                data=data, out=root / "bundle", target="t1n", task="sr", inputs=[],
                planes=["axial", "coronal", "sagittal"], config="tiny", factor="2", grid=GRID,
                steps=STEPS, batch_size=8, lr=1e-3, ema_decay=0.999, val_every=STEPS, seed=0,
                device="cpu", quiet=True,
            ),
            callback=record,
        )
    finally:
        torch.set_num_threads(threads)
    return data, bundle, losses
