"""Task preparation, coordinates, the canonical plane layout and the 2D/3D datasets."""

from __future__ import annotations

import numpy as np
import pytest

from brats_fixtures import make_case
from ScoreFusionLib.data import (
    LoadedCase,
    PlaneSliceDataset,
    RandomCropDataset,
    TaskSpec,
    concat_plane_input,
    coordinate_channels,
    discover_cases,
    load_prepared,
    neighbor_indices,
    plane_input_channels,
    plane_network_input,
    plane_slices,
    prepare_case,
    save_prepared,
    slice_shape,
)
from ScoreFusionLib.degradation import AveragePool, ThickSlice
from ScoreFusionLib.errors import DatasetError, GeometryError, InputError
from ScoreFusionLib.intensity import Normalization
from ScoreFusionLib.volume import Volume

SHAPE_DHW = (4, 6, 8)  # non-cubic (D, H, W); all sides even for 2x pooling


def _brain(seed: int, shape=SHAPE_DHW, scale: float = 100.0, offset: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    arr = np.zeros(shape, dtype=np.float32)
    arr[1:-1, 1:-1, 1:-1] = offset + 10.0 + scale * rng.random(tuple(n - 2 for n in shape))
    return arr


def _loaded(case_id="case0", seed=0, shape=SHAPE_DHW, contrasts=("t2f", "t1c", "t1n")) -> LoadedCase:
    vols = {c: Volume(_brain(seed * 7 + n, shape, scale=50.0 * (n + 1), offset=n), np.eye(4))
            for n, c in enumerate(contrasts)}
    return LoadedCase(case_id=case_id, volumes=vols, label_convention="brats2023")


def _pool_blocks(y: np.ndarray, f: int) -> np.ndarray:
    """Independent f^3 block average of a (D, H, W) array."""
    d, h, w = y.shape
    return y.reshape(d // f, f, h // f, f, w // f, f).mean(axis=(1, 3, 5))


def _repeat(y: np.ndarray, f: int) -> np.ndarray:
    return np.repeat(np.repeat(np.repeat(y, f, 0), f, 1), f, 2)


# -- coordinates ----------------------------------------------------------------------------


def test_coordinate_channels_formula_and_order():
    d, h, w = 3, 5, 8
    c = coordinate_channels((d, h, w))
    assert c.shape == (3, d, h, w) and c.dtype == np.float32
    for z in range(d):
        for y in range(h):
            for x in range(w):
                np.testing.assert_allclose(c[:, z, y, x], [2 * x / w - 1, 2 * y / h - 1, 2 * z / d - 1],
                                           atol=1e-7)
    assert c[0].min() == -1.0 and np.isclose(c[0].max(), 1 - 2 / w)
    assert not c.flags.writeable
    with pytest.raises(GeometryError):
        coordinate_channels((0, 2, 2))


# -- task spec ------------------------------------------------------------------------------


def test_task_spec_normalises_inputs():
    op = AveragePool(2)
    assert TaskSpec("sr", [], "flair", op).inputs == ("t2f",)
    assert TaskSpec("sr", ["t2f"], "t2f", op).condition_names == ("t2f_degraded",)
    both = TaskSpec("both", ["t1ce"], "FLAIR", op)
    assert both.inputs == ("t2f", "t1c") and both.n_conditions == 2
    assert both.condition_names == ("t2f_degraded", "t1c")
    assert TaskSpec("mt", ["t1ce"], "flair").inputs == ("t1c",)
    d = both.to_dict()
    back = TaskSpec.from_dict(d)
    assert back.to_dict() == d


@pytest.mark.parametrize(
    "args, message",
    [
        (("seg2flair", ["t1c"], "t2f"), "unknown task kind"),
        (("mt", ["t1x"], "t2f"), "unknown contrast"),
        (("mt", [], "t2f"), "at least one input"),
        (("mt", ["t2f"], "t2f"), "cannot use its target"),
        (("mt", ["t1c"], "t2f", AveragePool(2)), "no degradation"),
        (("sr", [], "t2f"), "needs a degradation"),
        (("sr", ["t1c"], "t2f", AveragePool(2)), "use kind 'both'"),
        (("both", ["t2f"], "t2f", AveragePool(2)), "besides the target"),
        (("both", ["t1c", "t2f"], "t2f", AveragePool(2)), "first condition"),
        (("mt", ["t1c"], "seg"), "segmentation"),
        (("mt", ["t1c"], "t2f", None, "zscore"), "unknown normalisation"),
    ],
)
def test_task_spec_errors(args, message):
    with pytest.raises(InputError, match=message):
        TaskSpec(*args)


# -- preparation ----------------------------------------------------------------------------


def test_prepare_mt():
    loaded = _loaded()
    p = prepare_case(loaded, TaskSpec("mt", ["t1c", "t1n"], "t2f"))
    y, a, b = (loaded.volumes[c].array.astype(np.float64) for c in ("t2f", "t1c", "t1n"))

    def mm(v):
        return 2 * (v - v.min()) / (v.max() - v.min()) - 1

    np.testing.assert_allclose(p.target, mm(y), atol=1e-6)
    np.testing.assert_allclose(p.conditions[0], mm(a), atol=1e-6)
    np.testing.assert_allclose(p.conditions[1], mm(b), atol=1e-6)
    for arr in (p.conditions, p.target, p.mask, p.r0, p.coords):
        assert arr.dtype == np.float32
    assert p.conditions.shape == (2, *SHAPE_DHW)
    np.testing.assert_array_equal(p.r0, ((p.target - p.conditions[0]) / 2).astype(np.float32))
    np.testing.assert_array_equal(p.mask, np.where(p.conditions[0] > -0.99, 1.0, -1.0))
    assert p.reference_normalization == Normalization(float(a.min()), float(a.max()))
    np.testing.assert_allclose(p.normalizations["t2f"].invert(p.target), y, rtol=1e-5)
    assert p.measurement is None
    np.testing.assert_array_equal(p.coords, coordinate_channels(SHAPE_DHW))


def test_prepare_sr_normalisation_fitted_on_degraded_input():
    loaded = _loaded()
    y = loaded.volumes["t2f"].array.astype(np.float64)
    p = prepare_case(loaded, TaskSpec("sr", [], "t2f", AveragePool(2)))
    lr = _pool_blocks(y, 2)
    lo, hi = lr.min(), lr.max()
    norm = p.normalizations["t2f"]
    assert np.isclose(norm.low, lo) and np.isclose(norm.high, hi)
    assert p.reference_normalization is norm
    np.testing.assert_allclose(p.target, 2 * (y - lo) / (hi - lo) - 1, atol=1e-5)
    np.testing.assert_allclose(p.conditions[0], _repeat(2 * (lr - lo) / (hi - lo) - 1, 2), atol=1e-5)
    np.testing.assert_allclose(p.measurement, 2 * (lr - lo) / (hi - lo) - 1, atol=1e-5)
    # Pooling shrinks the extremes, so the target exceeds [-1, 1] with the input's range.
    assert p.target.max() > 1.0
    np.testing.assert_allclose(p.r0, (p.target - p.conditions[0]) / 2, atol=1e-7)
    # The residual of an average-pool task lies in the operator's null space.
    np.testing.assert_allclose(_pool_blocks(p.r0.astype(np.float64), 2), 0.0, atol=1e-5)
    # Blocky mask from the degraded reference.
    np.testing.assert_array_equal(p.mask, np.where(p.conditions[0] > -0.99, 1.0, -1.0))


def test_prepare_sr_paper_normalisation():
    loaded = _loaded()
    y = loaded.volumes["t2f"].array.astype(np.float64)
    p = prepare_case(loaded, TaskSpec("sr", [], "t2f", AveragePool(2), sr_normalization="target"))
    yn = 2 * (y - y.min()) / (y.max() - y.min()) - 1
    np.testing.assert_allclose(p.target, yn, atol=1e-6)
    assert p.target.min() == -1.0 and np.isclose(p.target.max(), 1.0)
    np.testing.assert_allclose(p.conditions[0], _repeat(_pool_blocks(yn, 2), 2), atol=1e-6)


def test_prepare_both():
    loaded = _loaded()
    p = prepare_case(loaded, TaskSpec("both", ["t1c"], "t2f", AveragePool(2)))
    sr = prepare_case(loaded, TaskSpec("sr", [], "t2f", AveragePool(2)))
    mt = prepare_case(loaded, TaskSpec("mt", ["t1c"], "t2f"))
    np.testing.assert_array_equal(p.conditions[0], sr.conditions[0])
    np.testing.assert_array_equal(p.conditions[1], mt.conditions[0])
    np.testing.assert_array_equal(p.target, sr.target)
    np.testing.assert_array_equal(p.mask, sr.mask)
    np.testing.assert_array_equal(p.r0, sr.r0)
    assert p.reference_normalization == sr.normalizations["t2f"]


def test_prepare_thick_slice_and_grid_multiple():
    loaded = _loaded()
    p = prepare_case(loaded, TaskSpec("sr", [], "t2f", ThickSlice(axis=2, factor=2, profile="box")))
    assert p.measurement.shape == (2, 6, 8)
    with pytest.raises(GeometryError):
        prepare_case(loaded, TaskSpec("sr", [], "t2f", AveragePool(3)))


def test_prepare_errors():
    loaded = _loaded(contrasts=("t2f",))
    with pytest.raises(DatasetError, match="case0 lacks contrast 't1c'"):
        prepare_case(loaded, TaskSpec("mt", ["t1c"], "t2f"))
    bad = _brain(0)
    bad[2, 2, 2] = np.nan
    nan_case = LoadedCase("nan", {"t2f": Volume(bad, np.eye(4)), "t1c": Volume(_brain(1), np.eye(4))})
    with pytest.raises(InputError, match="NaN"):
        prepare_case(nan_case, TaskSpec("mt", ["t1c"], "t2f"))
    moved = np.eye(4)
    moved[0, 3] = 1.0
    off = LoadedCase("off", {"t2f": Volume(_brain(0), np.eye(4)), "t1c": Volume(_brain(1), moved)})
    with pytest.raises(GeometryError):
        prepare_case(off, TaskSpec("mt", ["t1c"], "t2f"))


def test_prepare_from_record_on_disk(tmp_path):
    make_case(tmp_path, "brats2021", seg_values=(0, 1, 4))
    (rec,) = discover_cases(tmp_path)
    p = prepare_case(rec, TaskSpec("both", ["t1ce"], "flair", AveragePool(4)), grid_shape_ijk=(16, 12, 8),
                     seg=True)
    assert p.conditions.shape == (2, 8, 12, 16)
    assert p.seg.shape == (8, 12, 16) and set(np.unique(p.seg)) == {0, 1, 4}
    assert p.label_convention == "brats2021"
    assert p.original_shape_ijk == (12, 10, 8) and p.original_affine is not None
    # Padding with each volume's minimum maps to exactly -1 (background).
    assert p.conditions[1, 0, 0, 0] == -1.0 and p.mask[0, 0, 0] == -1.0


# -- canonical plane layout -----------------------------------------------------------------


def test_plane_axes_and_shapes():
    assert slice_shape(SHAPE_DHW, "axial") == (6, 8)
    assert slice_shape(SHAPE_DHW, "coronal") == (4, 8)
    assert slice_shape(SHAPE_DHW, "sagittal") == (4, 6)
    assert plane_input_channels(1, 0) == 6 and plane_input_channels(1, 2) == 10
    assert plane_input_channels(2, 0) == 7 and plane_input_channels(2, 2) == 15
    with pytest.raises(InputError, match="unknown plane"):
        plane_slices(np.zeros((1, *SHAPE_DHW)), "transverse", 0)
    with pytest.raises(InputError, match="unknown plane"):
        PlaneSliceDataset([prepare_case(_loaded(), TaskSpec("mt", ["t1c"], "t2f"))], plane="Axial")


def test_neighbor_indices_replicate_edges():
    assert neighbor_indices(0, 5, 2) == [0, 0, 0, 1, 2]
    assert neighbor_indices(4, 5, 2) == [2, 3, 4, 4, 4]
    assert neighbor_indices(2, 5, 0) == [2]
    with pytest.raises(InputError):
        neighbor_indices(5, 5, 2)


def _direct(vol: np.ndarray, plane: str, i: int) -> np.ndarray:
    """Plain indexing of a (C, D, H, W) array, written out per plane."""
    if plane == "axial":
        return vol[:, i, :, :]
    if plane == "coronal":
        return vol[:, :, i, :]
    return vol[:, :, :, i]


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_slice_dataset_equals_direct_indexing(plane):
    cases = [prepare_case(_loaded(f"c{n}", seed=n), TaskSpec("mt", ["t1c", "t1n"], "t2f")) for n in range(2)]
    ds = PlaneSliceDataset(cases, plane=plane, neighbors=0)
    n_slices = SHAPE_DHW[{"axial": 0, "coronal": 1, "sagittal": 2}[plane]]
    assert len(ds) == 2 * n_slices
    item = 0
    for ci, case in enumerate(cases):
        for si in range(n_slices):
            got = ds[item]
            assert (got["case_index"], got["slice_index"]) == (ci, si)
            np.testing.assert_array_equal(got["cond"], _direct(case.conditions, plane, si))
            np.testing.assert_array_equal(got["coords"], _direct(case.coords, plane, si))
            np.testing.assert_array_equal(got["mask"], _direct(case.mask[None], plane, si))
            np.testing.assert_array_equal(got["r0"], _direct(case.r0[None], plane, si))
            np.testing.assert_array_equal(got["target"], _direct(case.target[None], plane, si))
            for key in ("cond", "coords", "mask", "r0", "target"):
                assert got[key].dtype == np.float32 and got[key].flags.c_contiguous
            item += 1
    with pytest.raises(IndexError):
        ds[len(ds)]


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_neighbour_stacking_condition_major_with_replicate_edges(plane):
    case = prepare_case(_loaded(), TaskSpec("mt", ["t1c", "t1n"], "t2f"))
    ds = PlaneSliceDataset([case], plane=plane, neighbors=2)
    n = len(ds)
    for si in range(n):
        cond = ds[si]["cond"]
        assert cond.shape[0] == 2 * 5
        expected = []
        for m in range(2):  # condition-major: all five slices of condition 0, then of 1
            for o in (-2, -1, 0, 1, 2):
                j = min(max(si + o, 0), n - 1)
                expected.append(_direct(case.conditions[m : m + 1], plane, j)[0])
        np.testing.assert_array_equal(cond, np.stack(expected))
    # Edge: the first slice's two lower neighbours are copies of slice 0.
    first = ds[0]["cond"]
    np.testing.assert_array_equal(first[0], first[2])
    np.testing.assert_array_equal(first[1], first[2])


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_training_item_equals_slice_scorer_input(plane):
    """Pitfall 9: a dataset item, assembled, equals the 3D scorer's slice input (numpy and torch)."""
    torch = pytest.importorskip("torch")
    case = prepare_case(_loaded(), TaskSpec("both", ["t1c"], "t2f", AveragePool(2)))
    noisy = np.random.default_rng(3).standard_normal(SHAPE_DHW).astype(np.float32)
    ds = PlaneSliceDataset([case], plane=plane, neighbors=2)
    cond_v, coords_v, mask_v, noisy_v = case.conditions, case.coords, case.mask[None], noisy[None]
    all_idx = list(range(len(ds)))
    stacked = plane_network_input(cond_v, coords_v, mask_v, noisy_v, plane, all_idx, neighbors=2)
    batched_t = plane_network_input(*(torch.from_numpy(np.array(v))[None]
                                      for v in (cond_v, coords_v, mask_v, noisy_v)),
                                    plane, all_idx, neighbors=2)
    assert stacked.shape == (len(ds), plane_input_channels(2, 2), *slice_shape(SHAPE_DHW, plane))
    for si in all_idx:
        item = ds[si]
        train = concat_plane_input(item["cond"], item["coords"], item["mask"],
                                   plane_slices(noisy_v, plane, si))
        scorer = plane_network_input(cond_v, coords_v, mask_v, noisy_v, plane, si, neighbors=2)
        np.testing.assert_array_equal(train, scorer)
        np.testing.assert_array_equal(stacked[si], scorer)
        np.testing.assert_array_equal(batched_t[0, si].numpy(), scorer)
        # noisy residual last, mask just before it
        np.testing.assert_array_equal(scorer[-1], _direct(noisy_v, plane, si)[0])
        np.testing.assert_array_equal(scorer[-2], _direct(mask_v, plane, si)[0])


def test_slice_dataset_with_dataloader():
    torch = pytest.importorskip("torch")
    spec = TaskSpec("sr", [], "t2f", AveragePool(2))
    cases = [prepare_case(_loaded(f"c{n}", seed=n), spec) for n in range(2)]
    ds = PlaneSliceDataset(cases, plane="coronal", neighbors=2)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2, shuffle=False)))
    assert batch["cond"].shape == (2, 5, 4, 8) and batch["cond"].dtype == torch.float32
    assert batch["coords"].shape == (2, 3, 4, 8)
    assert batch["r0"].shape == (2, 1, 4, 8)
    assert batch["slice_index"].tolist() == [0, 1]


def test_slice_dataset_rejects_mixed_condition_counts():
    a = prepare_case(_loaded(), TaskSpec("mt", ["t1c"], "t2f"))
    b = prepare_case(_loaded(), TaskSpec("mt", ["t1c", "t1n"], "t2f"))
    with pytest.raises(DatasetError, match="different numbers of conditions"):
        PlaneSliceDataset([a, b], "axial")
    with pytest.raises(DatasetError):
        PlaneSliceDataset([], "axial")


# -- random crops ---------------------------------------------------------------------------


def _crop_cases():
    shape = (8, 10, 12)
    return [prepare_case(_loaded(f"c{n}", seed=n, shape=shape), TaskSpec("mt", ["t1c", "t1n"], "t2f"))
            for n in range(2)]


def test_random_crops_reproducible_and_aligned():
    cases = _crop_cases()
    size = (4, 6, 5)
    ds = RandomCropDataset(cases, crop_size=size, samples_per_case=3, seed=11)
    again = RandomCropDataset(cases, crop_size=size, samples_per_case=3, seed=11)
    other = RandomCropDataset(cases, crop_size=size, samples_per_case=3, seed=12)
    assert len(ds) == 6
    starts = [ds.crop_start(i) for i in range(len(ds))]
    assert starts == [again.crop_start(i) for i in range(len(ds))]
    assert starts != [other.crop_start(i) for i in range(len(ds))]
    ds.set_epoch(1)
    assert starts != [ds.crop_start(i) for i in range(len(ds))]
    ds.set_epoch(0)
    for i in range(len(ds)):
        item = ds[i]
        case = cases[item["case_index"]]
        assert item["case_index"] == i // 3
        d, h, w = (int(v) for v in item["start"])
        assert (d, h, w) == starts[i]
        sl = (slice(d, d + 4), slice(h, h + 6), slice(w, w + 5))
        np.testing.assert_array_equal(item["cond"], case.conditions[(slice(None), *sl)])
        np.testing.assert_array_equal(item["target"][0], case.target[sl])
        np.testing.assert_array_equal(item["r0"][0], case.r0[sl])
        np.testing.assert_array_equal(item["mask"][0], case.mask[sl])
        # Global coordinates: the crop's corner voxel carries the full grid's position.
        nd, nh, nw = case.shape
        corner = [2 * w / nw - 1, 2 * h / nh - 1, 2 * d / nd - 1]
        np.testing.assert_allclose(item["coords"][:, 0, 0, 0], corner, atol=1e-7)
        np.testing.assert_array_equal(item["coords"], coordinate_channels(case.shape)[(slice(None), *sl)])
        assert item["cond"].shape == (2, 4, 6, 5) and item["cond"].dtype == np.float32
        assert all(item[k].flags.writeable for k in ("cond", "coords", "mask", "r0", "target"))


def test_random_crops_cover_positions_uniformly():
    cases = _crop_cases()[:1]
    ds = RandomCropDataset(cases, crop_size=(8, 10, 10), samples_per_case=200, seed=0)
    ws = {ds.crop_start(i)[2] for i in range(len(ds))}
    assert ws == {0, 1, 2}
    assert {ds.crop_start(i)[0] for i in range(len(ds))} == {0}


def test_random_crops_offset_multiple_and_halo():
    cases = _crop_cases()
    ds = RandomCropDataset(cases, crop_size=(4, 4, 4), samples_per_case=20, seed=1, offset_multiple=4, halo=2)
    for i in range(len(ds)):
        item = ds[i]
        start = item["start"]
        assert all(int(s) % 4 == 0 for s in start)
        case = cases[item["case_index"]]
        idx = [np.clip(np.arange(s - 2, s + 6), 0, n - 1) for s, n in zip(start, case.shape)]
        expected = case.conditions[:, idx[0]][:, :, idx[1]][:, :, :, idx[2]]
        np.testing.assert_array_equal(item["cond_halo"], expected)
        np.testing.assert_array_equal(item["cond_halo"][:, 2:-2, 2:-2, 2:-2], item["cond"])


def test_random_crop_too_large_and_bad_args():
    cases = _crop_cases()
    with pytest.raises(GeometryError, match="larger than case c0"):
        RandomCropDataset(cases, crop_size=(9, 4, 4))
    with pytest.raises(InputError):
        RandomCropDataset(cases, crop_size=(4, 4))
    with pytest.raises(InputError):
        RandomCropDataset(cases, crop_size=(4, 4, 4), samples_per_case=0)


def test_random_crops_with_dataloader():
    torch = pytest.importorskip("torch")
    ds = RandomCropDataset(_crop_cases(), crop_size=(4, 4, 4), samples_per_case=2, seed=5)
    batches = list(torch.utils.data.DataLoader(ds, batch_size=2, shuffle=False))
    assert len(batches) == 2
    assert batches[0]["cond"].shape == (2, 2, 4, 4, 4) and batches[0]["coords"].shape == (2, 3, 4, 4, 4)
    assert batches[0]["start"].shape == (2, 3)
    np.testing.assert_array_equal(batches[1]["target"][1].numpy(), ds[3]["target"])


# -- cache ----------------------------------------------------------------------------------


def test_prepared_cache_round_trip_memory_mapped(tmp_path):
    case = prepare_case(_loaded(), TaskSpec("both", ["t1c"], "t2f", AveragePool(2)))
    save_prepared(case, tmp_path / "c0")
    back = load_prepared(tmp_path / "c0")
    assert isinstance(back.conditions, np.memmap)
    for name in ("conditions", "target", "mask", "r0", "measurement"):
        np.testing.assert_array_equal(getattr(back, name), getattr(case, name))
    assert back.normalizations == case.normalizations and back.spec.to_dict() == case.spec.to_dict()
    assert back.reorientation is None and back.original_affine is None
    a = PlaneSliceDataset([case], "sagittal", 2)[3]
    b = PlaneSliceDataset([back], "sagittal", 2)[3]
    for key in ("cond", "coords", "mask", "r0", "target"):
        np.testing.assert_array_equal(a[key], b[key])
    with pytest.raises(FileExistsError):
        save_prepared(case, tmp_path / "c0")
    # Geometry provenance survives the cache (here a flipped, reoriented case from disk).
    las = np.diag([-1.0, 1.0, 1.0, 1.0])
    make_case(tmp_path / "data", "brats2023", contrasts=["t2f"], seg=False, affine=las)
    (rec,) = discover_cases(tmp_path / "data")
    disk = prepare_case(rec, TaskSpec("sr", [], "t2f", AveragePool(2)), grid_shape_ijk=None, reorient=True)
    back = load_prepared(save_prepared(disk, tmp_path / "c1"), mmap=False)
    assert back.reorientation.perm == (0, 1, 2) and back.reorientation.flips == (True, False, False)
    np.testing.assert_array_equal(back.reorientation.original_affine, las)
    np.testing.assert_array_equal(back.original_affine, las)
    np.testing.assert_array_equal(back.affine, disk.affine)
    assert back.original_shape_ijk == (12, 10, 8)
    with pytest.raises(DatasetError):
        load_prepared(tmp_path / "nope")
