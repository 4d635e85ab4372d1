"""Shared test fixtures: seeded randomness and random (oblique, permuted, flipped) IJK->RAS matrices."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from http_fixtures import server  # noqa: F401  (the 127.0.0.1 server fixture, shared by the download tests)

_PERMUTATIONS = tuple(itertools.permutations(range(3)))


def signed_permutation(rng: np.random.Generator) -> np.ndarray:
    """A random 3x3 matrix with one +-1 per row and column (axis permutation with flips)."""
    p = np.zeros((3, 3))
    perm = _PERMUTATIONS[rng.integers(len(_PERMUTATIONS))]
    for axis, ras in enumerate(perm):
        p[ras, axis] = rng.choice((-1.0, 1.0))
    return p


def random_direction(rng: np.random.Generator, max_oblique_deg: float = 25.0) -> np.ndarray:
    """Unit direction columns: a signed permutation tilted by up to ``max_oblique_deg`` degrees."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.radians(rng.uniform(0.0, max_oblique_deg))
    return Rotation.from_rotvec(axis * angle).as_matrix() @ signed_permutation(rng)


def random_affine(
    rng: np.random.Generator,
    max_oblique_deg: float = 25.0,
    spacing_range: tuple[float, float] = (0.4, 4.0),
) -> np.ndarray:
    """A 4x4 IJK->RAS matrix with random direction, per-axis spacing and origin (mm)."""
    m = np.eye(4)
    m[:3, :3] = random_direction(rng, max_oblique_deg) * rng.uniform(*spacing_range, size=3)
    m[:3, 3] = rng.uniform(-150.0, 150.0, size=3)
    return m


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240611)


@pytest.fixture
def make_affine(rng: np.random.Generator) -> Callable[..., np.ndarray]:
    """``make_affine(max_oblique_deg=25.0)``: a fresh random oblique/permuted/flipped matrix."""

    def make(max_oblique_deg: float = 25.0) -> np.ndarray:
        return random_affine(rng, max_oblique_deg)

    return make


@pytest.fixture(scope="session")
def sr_bundle(tmp_path_factory):
    """A bundle of three tiny random-weight plane models for average-pool SR x2 of t1n."""
    from bundle_fixtures import make_random_bundle
    from ScoreFusionLib.data.task import TaskSpec
    from ScoreFusionLib.degradation import AveragePool

    spec = TaskSpec(kind="sr", inputs=[], target="t1n", degradation=AveragePool(2))
    return make_random_bundle(tmp_path_factory.mktemp("sr") / "bundle", spec)


@pytest.fixture(scope="session")
def mt_bundle(tmp_path_factory):
    """A bundle of three tiny random-weight 2.5D plane models synthesising t2f from t1n + t2w."""
    from bundle_fixtures import make_random_bundle
    from ScoreFusionLib.data.task import TaskSpec

    spec = TaskSpec(kind="mt", inputs=["t1n", "t2w"], target="t2f")
    return make_random_bundle(tmp_path_factory.mktemp("mt") / "bundle", spec, neighbors=1)


@pytest.fixture(scope="session")
def trained_sr_planes(tmp_path_factory):
    """(data, bundle, losses) of the tiny SR x2 planes of ``learning_fixtures`` (trained once per session)."""
    from learning_fixtures import train_learning_planes

    return train_learning_planes(tmp_path_factory.mktemp("learning"))
