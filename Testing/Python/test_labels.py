"""Tests of the BraTS label conventions (label 4: ET in 2021, resection cavity in 2023+)."""

from __future__ import annotations

import numpy as np
import pytest

from ScoreFusionLib.errors import InputError
from ScoreFusionLib.labels import (
    convert_labels,
    labels_from_compartments,
    region_mask,
    validate_labels,
)

# Hand-made maps, one voxel per compartment: background, necrotic, edema, enhancing.
MAP_2021 = np.array([[[0, 1, 2, 4], [4, 2, 1, 0]]], dtype=np.uint8)
MAP_2023 = np.array([[[0, 1, 2, 3], [3, 2, 1, 0]]], dtype=np.uint8)
# 2023 map with a resection cavity (4) next to tumour.
MAP_2023_RC = np.array([[[0, 1, 2, 3], [4, 4, 2, 0]]], dtype=np.int16)


def test_convert_2021_to_2023_and_back():
    out = convert_labels(MAP_2021, "brats2021", "brats2023")
    np.testing.assert_array_equal(out, MAP_2023)
    assert out.dtype == MAP_2021.dtype
    np.testing.assert_array_equal(convert_labels(MAP_2023, "brats2023", "brats2021"), MAP_2021)
    np.testing.assert_array_equal(convert_labels(MAP_2021, "brats2021", "brats2021"), MAP_2021)


def test_convert_does_not_chain_or_modify_input():
    # 4 -> 3 must not be followed by any further remapping of the new 3s, and vice versa.
    src = np.array([[[4, 4, 1, 2, 0]]], dtype=np.int32)
    before = src.copy()
    np.testing.assert_array_equal(convert_labels(src, "brats2021", "brats2023"), [[[3, 3, 1, 2, 0]]])
    np.testing.assert_array_equal(src, before)
    back = np.array([[[3, 3, 1, 2, 0]]], dtype=np.int32)
    np.testing.assert_array_equal(convert_labels(back, "brats2023", "brats2021"), [[[4, 4, 1, 2, 0]]])


def test_resection_cavity_cannot_be_converted_to_2021():
    with pytest.raises(InputError, match="resection_cavity"):
        convert_labels(MAP_2023_RC, "brats2023", "brats2021")
    # ... but a 2023 map without a cavity converts fine, and to 2023 it is kept.
    convert_labels(MAP_2023, "brats2023", "brats2021")
    np.testing.assert_array_equal(convert_labels(MAP_2023_RC, "brats2023", "brats2023"), MAP_2023_RC)


def test_region_masks_2021():
    wt = [[[0, 1, 1, 1], [1, 1, 1, 0]]]
    tc = [[[0, 1, 0, 1], [1, 0, 1, 0]]]
    et = [[[0, 0, 0, 1], [1, 0, 0, 0]]]
    for region, expected in (("WT", wt), ("TC", tc), ("ET", et)):
        got = region_mask(MAP_2021, region, "brats2021")
        assert got.dtype == bool
        np.testing.assert_array_equal(got, np.array(expected, dtype=bool))


def test_region_masks_2023_exclude_resection_cavity():
    wt = [[[0, 1, 1, 1], [0, 0, 1, 0]]]
    tc = [[[0, 1, 0, 1], [0, 0, 0, 0]]]
    et = [[[0, 0, 0, 1], [0, 0, 0, 0]]]
    for region, expected in (("WT", wt), ("TC", tc), ("ET", et)):
        np.testing.assert_array_equal(region_mask(MAP_2023_RC, region, "brats2023"), np.array(expected, bool))


def test_label_4_means_different_things():
    four = np.array([[[4]]])
    assert region_mask(four, "ET", "brats2021").all()
    assert not region_mask(four, "ET", "brats2023").any()
    assert not region_mask(four, "WT", "brats2023").any()


def test_region_masks_agree_across_conversion():
    converted = convert_labels(MAP_2021, "brats2021", "brats2023")
    for region in ("WT", "TC", "ET"):
        np.testing.assert_array_equal(
            region_mask(MAP_2021, region, "brats2021"), region_mask(converted, region, "brats2023")
        )


@pytest.mark.parametrize(
    ("labels", "convention", "bad"),
    [
        (np.array([[[0, 1, 3]]]), "brats2021", "[3]"),
        (np.array([[[0, 5, 2, 7]]]), "brats2023", "[5, 7]"),
        (np.array([[[0, -1]]]), "brats2023", "[-1]"),
        (np.array([[[0.0, 1.0, 4.5]]]), "brats2021", "[4.5]"),
        (np.array([[[0.0, 0.5]]]), "brats2023", "[0.5]"),
        (np.array([[[0.0, np.nan]]]), "brats2021", "nan"),
    ],
)
def test_unexpected_values_raise(labels, convention, bad):
    with pytest.raises(InputError, match=f"{convention}") as info:
        validate_labels(labels, convention)
    assert bad in str(info.value)
    with pytest.raises(InputError):
        convert_labels(labels, convention, "brats2023")


def test_integer_valued_floats_are_accepted():
    labels = np.array([[[0.0, 1.0, 2.0, 4.0]]])
    validate_labels(labels, "brats2021")
    np.testing.assert_array_equal(convert_labels(labels, "brats2021", "brats2023"), [[[0, 1, 2, 3]]])


def test_unknown_convention_or_region():
    with pytest.raises(InputError, match="convention"):
        validate_labels(MAP_2021, "brats2019x")
    with pytest.raises(InputError, match="convention"):
        convert_labels(MAP_2021, "brats2021", "msd")
    with pytest.raises(InputError, match="region"):
        region_mask(MAP_2021, "NCR", "brats2021")


def test_labels_from_compartments():
    necrotic = np.array([[[1, 0, 0, 0]]], dtype=bool)
    edema = np.array([[[1, 1, 0, 0]]], dtype=bool)
    enhancing = np.array([[[0, 0, 1, 0]]], dtype=bool)
    masks = {"necrotic": necrotic, "edema": edema, "enhancing": enhancing}
    out21 = labels_from_compartments(masks, "brats2021")
    np.testing.assert_array_equal(out21, [[[2, 2, 4, 0]]])  # later names win (edema over necrotic)
    assert out21.dtype == np.uint8
    np.testing.assert_array_equal(labels_from_compartments(masks, "brats2023"), [[[2, 2, 3, 0]]])
    with pytest.raises(InputError, match="resection_cavity"):
        labels_from_compartments({"resection_cavity": necrotic}, "brats2021")
