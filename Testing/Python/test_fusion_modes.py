"""Slice-wise score volumes and the plane-only fusion modes (single, tpdm, average)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ScoreFusionLib.data.coords import coordinate_channels
from ScoreFusionLib.data.loading import LoadedCase
from ScoreFusionLib.data.slices import PlaneSliceDataset, concat_plane_input, plane_input_channels
from ScoreFusionLib.data.task import TaskSpec, prepare_case
from ScoreFusionLib.errors import InputError
from ScoreFusionLib.fusion.modes import PlaneEnsemble
from ScoreFusionLib.fusion.slice_scorer import SliceScorer, VolumeConditioning
from ScoreFusionLib.nets.configs import unet2d_config
from ScoreFusionLib.nets.unet2d import UNet2D, kaiming_reinit_
from ScoreFusionLib.volume import Volume

SHAPE = (8, 12, 16)  # (D, H, W)
PLANES = ("axial", "coronal", "sagittal")


class NoisySliceEcho(torch.nn.Module):
    """Returns the noisy-residual channel (always last) and records every gamma it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.gammas: list[float] = []
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        self.gammas.extend(float(g) for g in gamma)
        self.inputs.append(x.clone())
        return x[:, -1:]


class ConstantModel(torch.nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value
        self.calls = 0

    def forward(self, x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.full_like(x[:, :1], self.value)


def conditioning(m: int = 1, seed: int = 0) -> VolumeConditioning:
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(m, *SHAPE, generator=g)
    return VolumeConditioning(cond, torch.from_numpy(np.array(coordinate_channels(SHAPE))),
                              torch.sign(torch.randn(1, *SHAPE, generator=g)))


@pytest.mark.parametrize("plane", PLANES)
def test_echo_model_restacks_the_state_exactly(plane):
    cond = conditioning()
    r_t = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(1))
    eps = SliceScorer(NoisySliceEcho(), plane, neighbors=2, batch_size=3)(r_t, 0.5, cond)
    assert torch.equal(eps, r_t)


@pytest.mark.parametrize("plane", PLANES)
def test_batched_equals_unbatched_with_a_real_network(plane):
    torch.manual_seed(0)
    model = UNet2D(unet2d_config("tiny", plane_input_channels(2, 1)))
    kaiming_reinit_(model, generator=torch.Generator().manual_seed(3))
    cond = conditioning(m=2)
    r_t = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(2))
    one = SliceScorer(model, plane, neighbors=1, batch_size=1)(r_t, 0.3, cond)
    many = SliceScorer(model, plane, neighbors=1, batch_size=5)(r_t, 0.3, cond)
    every = SliceScorer(model, plane, neighbors=1, batch_size=64)(r_t, 0.3, cond)
    assert one.abs().max() > 0
    torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(every, one, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("plane", PLANES)
def test_scorer_input_equals_the_training_item(plane):
    """Training batch and slice-scorer input are identical for the same volume and slice."""
    rng = np.random.default_rng(5)
    vols = {c: Volume(rng.random(SHAPE) + 0.1, np.eye(4)) for c in ("t1n", "t2w", "t2f")}
    loaded = LoadedCase("c1", vols, None, None, False, None, np.eye(4), (16, 12, 8))
    spec = TaskSpec(kind="mt", inputs=["t1n", "t2w"], target="t2f")
    prepared = prepare_case(loaded, spec, grid_shape_ijk=None)
    dataset = PlaneSliceDataset([prepared], plane=plane, neighbors=2)
    echo = NoisySliceEcho()
    cond = VolumeConditioning(torch.from_numpy(prepared.conditions), torch.from_numpy(np.array(prepared.coords)),
                              torch.from_numpy(prepared.mask[None]))
    noisy = torch.from_numpy(prepared.r0[None])  # the noisy slot carries r0 so both sides are comparable
    SliceScorer(echo, plane, neighbors=2, batch_size=4)(noisy, 0.7, cond)
    scored = torch.cat(echo.inputs).numpy()
    assert scored.shape[0] == len(dataset)
    for i in range(len(dataset)):
        item = dataset[i]
        expected = concat_plane_input(item["cond"], item["coords"], item["mask"], item["r0"])
        np.testing.assert_array_equal(scored[item["slice_index"]], expected)


def test_average_is_the_mean_of_the_planes_and_gamma_is_abar():
    cond = conditioning()
    models = {p: ConstantModel(v) for p, v in zip(PLANES, (1.0, 2.0, 6.0))}
    scorers = {p: SliceScorer(m, p) for p, m in models.items()}
    ensemble = PlaneEnsemble(scorers, cond, mode="average")
    eps = ensemble(torch.zeros(1, *SHAPE), 10, 0.25)
    assert torch.allclose(eps, torch.full((1, *SHAPE), 3.0))
    echo = NoisySliceEcho()
    PlaneEnsemble({"axial": SliceScorer(echo, "axial")}, cond, mode="single")(torch.zeros(1, *SHAPE), 7, 0.123456789)
    # gamma arrives as a float64 tensor: exactly abar_t, not a float32 rounding of it
    assert echo.gammas and all(g == 0.123456789 for g in echo.gammas)


def test_single_defaults_to_sagittal_and_runs_one_plane():
    cond = conditioning()
    models = {p: ConstantModel(v) for p, v in zip(PLANES, (1.0, 2.0, 6.0))}
    ensemble = PlaneEnsemble({p: SliceScorer(m, p) for p, m in models.items()}, cond, mode="single")
    eps = ensemble(torch.zeros(1, *SHAPE), 3, 0.5)
    assert torch.all(eps == 6.0)
    assert models["axial"].calls == 0 and models["coronal"].calls == 0


def test_tpdm_alternation_and_random_choice():
    cond = conditioning()
    models = {p: ConstantModel(v) for p, v in zip(("coronal", "sagittal"), (1.0, 2.0))}
    scorers = {p: SliceScorer(m, p) for p, m in models.items()}
    alt = PlaneEnsemble(scorers, cond, mode="tpdm", tpdm_cycle=["coronal", "sagittal"])
    values = [float(alt(torch.zeros(1, *SHAPE), 0, 0.5).mean()) for _ in range(4)]
    assert values == [1.0, 2.0, 1.0, 2.0]

    three = {p: SliceScorer(ConstantModel(0.0), p) for p in PLANES}
    rand = PlaneEnsemble(three, cond, mode="tpdm", seed=7)
    assert rand.probabilities == {"axial": 0.1, "coronal": 0.6, "sagittal": 0.3}
    picks = [rand.planes_for_next_step()[0] for _ in range(3000)]
    freq = {p: picks.count(p) / len(picks) for p in PLANES}
    assert abs(freq["axial"] - 0.1) < 0.025 and abs(freq["coronal"] - 0.6) < 0.03
    again = PlaneEnsemble(three, cond, mode="tpdm", seed=7)
    assert [again.planes_for_next_step()[0] for _ in range(3000)] == picks


def test_bad_modes_and_probabilities_are_rejected():
    cond = conditioning()
    scorers = {p: SliceScorer(ConstantModel(0.0), p) for p in ("coronal", "sagittal")}
    with pytest.raises(InputError, match="unknown fusion mode"):
        PlaneEnsemble(scorers, cond, mode="median")
    with pytest.raises(InputError, match="sum to 1"):
        PlaneEnsemble(scorers, cond, mode="tpdm", tpdm_probabilities={"coronal": 0.5, "sagittal": 0.2})
    with pytest.raises(InputError, match="no model"):
        PlaneEnsemble(scorers, cond, mode="single", plane="axial")
    with pytest.raises(InputError, match="noisy state"):
        scorers["coronal"](torch.zeros(1, 4, 4, 4), 0.5, cond)
