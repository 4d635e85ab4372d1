"""MONAI model-zoo ``brats_mri_segmentation`` weights: safe loading, conversion, and exact equivalence with MONAI."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from segmenter_fixtures import tumour_volumes

torch = pytest.importorskip("torch")
monai = pytest.importorskip("monai")

from ScoreFusionLib.bundle import BundleError, load_weights  # noqa: E402
from ScoreFusionLib.cli.main import main  # noqa: E402
from ScoreFusionLib.errors import InputError  # noqa: E402
from ScoreFusionLib.segmentation.inference import segment, window_count  # noqa: E402
from ScoreFusionLib.segmentation.model_bundle import load_segmenter, validate_segmenter_bundle  # noqa: E402
from ScoreFusionLib.segmentation.zoo import convert_monai_brats  # noqa: E402
from ScoreFusionLib.volume import Volume  # noqa: E402

#: Set when an object from a refused pickle was ever constructed (it must never be).
EXECUTED: list[str] = []


def _mark_executed() -> str:
    EXECUTED.append("payload ran")
    return "payload"


class Payload:
    """An arbitrary pickled object: unpickling it would call :func:`_mark_executed`."""

    def __reduce__(self):
        return (_mark_executed, ())


def zoo_network(seed: int = 0):
    """The zoo's network exactly as its ``inference.json`` builds it (MONAI directly, not our preset)."""
    from monai.networks.nets import SegResNet

    torch.manual_seed(seed)
    net = SegResNet(blocks_down=[1, 2, 2, 4], blocks_up=[1, 1, 1], init_filters=16, in_channels=4,
                    out_channels=3, dropout_prob=0.2)
    with torch.no_grad():  # non-trivial norms, so a channel or axis mix-up changes the output
        for name, p in net.named_parameters():
            if "norm" in name:
                p.add_(torch.randn(p.shape) * 0.3)
    return net.eval()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A random zoo network and its state dict saved as the zoo's bare ``model.pt``."""
    net = zoo_network()
    path = tmp_path_factory.mktemp("zoo") / "model.pt"
    torch.save(net.state_dict(), path)
    return net, path


def _nothing_beside(folder: Path, keep: set[str]) -> None:
    leftovers = sorted(p.name for p in folder.iterdir() if p.name not in keep)
    assert leftovers == [], f"conversion left {leftovers}"


def test_converted_bundle_records_the_zoo_pipeline(zoo, tmp_path):
    _, checkpoint = zoo
    out = convert_monai_brats(checkpoint, tmp_path / "seg-monai")
    manifest = validate_segmenter_bundle(out)  # sha256, tensor names/shapes/dtypes, card
    assert manifest.channels == ("t1c", "t1n", "t2w", "t2f")
    assert manifest.layout == "ijk" and manifest.roi_size_ijk == (240, 240, 160)
    assert manifest.spacing_mm == (1.0, 1.0, 1.0) and manifest.normalization == "zscore-nonzero"
    assert manifest.label_convention == "brats2021" and manifest.threshold == 0.5 and manifest.overlap == 0.5
    assert manifest.network.to_dict() == {"init_filters": 16, "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1],
                                          "dropout": 0.2, "in_channels": 4, "out_channels": 3}
    assert manifest.source["origin"] == "MONAI model zoo brats_mri_segmentation"
    assert manifest.source["file"] == "model.pt"
    assert manifest.source["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert manifest.source["converted"].endswith("Z")
    assert "Apache-2.0" in manifest.license and "BraTS" in manifest.license and "responsibility" in manifest.license
    card = (out / "card.md").read_text(encoding="utf-8")
    assert manifest.source["sha256"] in card and "brats2021" in card


def test_wrapped_and_ddp_prefixed_checkpoints_convert_to_identical_weights(zoo, tmp_path):
    net, checkpoint = zoo
    state = net.state_dict()
    variants = {
        "model": {"model": state, "epoch": 300},
        "state_dict": {"state_dict": {f"module.{k}": v for k, v in state.items()}, "optimizer": {"lr": 1e-4}},
        "network": {"network": state},
        "ddp": {f"module.{k}": v for k, v in state.items()},
    }
    reference = load_weights(convert_monai_brats(checkpoint, tmp_path / "bare") / "segmenter.safetensors")
    assert set(reference) == set(state)
    for name, obj in variants.items():
        path = tmp_path / f"{name}.pt"
        torch.save(obj, path)
        out = convert_monai_brats(path, tmp_path / f"seg-{name}")
        converted = load_weights(out / "segmenter.safetensors")
        assert set(converted) == set(state), name
        for key, tensor in state.items():
            assert torch.equal(converted[key], tensor), (name, key)
        assert reference.keys() == converted.keys()


def test_segment_equals_monai_sliding_window_inference(zoo, tmp_path):
    """Our segment() on the converted bundle == MONAI's own pipeline on the zoo network.

    The reference is built only from MONAI: Orientation(RAS) of the (C, i, j, k) stack in the zoo's
    channel order T1c, T1, T2, FLAIR, NormalizeIntensity(nonzero, channel_wise), Gaussian sliding
    windows, sigmoid, and Orientation back to the input's axis codes. The input is 1 mm, not RAS
    (i and j flipped, axes permuted) and not cubic, so a wrong channel order, axis order or flip
    would change the probabilities.
    """
    import nibabel as nib
    from monai.data import MetaTensor
    from monai.inferers import sliding_window_inference
    from monai.transforms import NormalizeIntensity, Orientation

    net, checkpoint = zoo
    bundle = convert_monai_brats(checkpoint, tmp_path / "seg-monai")
    loaded = load_segmenter(bundle, "cpu")
    roi = (32, 32, 32)
    small = dataclasses.replace(loaded, manifest=dataclasses.replace(loaded.manifest, roi_size_ijk=roi))

    affine = np.array([[0.0, -1.0, 0.0, 30.0], [-1.0, 0.0, 0.0, 20.0], [0.0, 0.0, 1.0, -10.0], [0, 0, 0, 1]])
    raw, _ = tumour_volumes(shape_kji=(24, 32, 40), spacing=1.0, seed=3, centre=(12, 15, 22))
    volumes = {name: Volume(v.array, affine) for name, v in raw.items()}
    result = segment(volumes, small, device="cpu")

    stack_ijk = np.stack([np.transpose(volumes[c].array, (2, 1, 0)) for c in ("t1c", "t1n", "t2w", "t2f")])
    x = MetaTensor(torch.from_numpy(stack_ijk.astype(np.float32)), affine=torch.from_numpy(affine))
    axes = (("L", "R"), ("P", "A"), ("I", "S"))
    x = Orientation(axcodes="RAS", labels=axes)(x)
    assert tuple(x.shape[1:]) != tuple(stack_ijk.shape[1:])  # the orientation really permuted axes
    assert window_count(x.shape[1:], roi, 0.5) > 1  # and the window really slides (blending is compared too)
    x = NormalizeIntensity(nonzero=True, channel_wise=True)(x)
    with torch.inference_mode():
        logits = sliding_window_inference(x.as_tensor()[None], roi, 1, net, overlap=0.5, mode="gaussian")
        probs = torch.sigmoid(logits)[0]
    back = Orientation(axcodes="".join(nib.aff2axcodes(affine)), labels=axes)(MetaTensor(probs, affine=x.affine))
    expected = np.transpose(np.asarray(back), (0, 3, 2, 1))  # (3, k, j, i) on the input grid

    got = np.stack([result.probabilities[r].array for r in ("TC", "WT", "ET")])
    assert got.shape == expected.shape
    assert float(np.ptp(expected)) > 0.05  # the network's output varies, so the comparison means something
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert np.array_equal(result.labels.affine, affine)
    # the comparison has the power to see the layout and the channel order: getting either wrong fails it
    kji = dataclasses.replace(small, manifest=dataclasses.replace(small.manifest, layout="kji"))
    swapped = dataclasses.replace(small, manifest=dataclasses.replace(small.manifest,
                                                                       channels=("t1n", "t1c", "t2w", "t2f")))
    for wrong in (kji, swapped):
        other = segment(volumes, wrong, device="cpu").probabilities
        assert np.abs(np.stack([other[r].array for r in ("TC", "WT", "ET")]) - expected).max() > 1e-3


def test_refuses_pickled_objects_without_running_them(zoo, tmp_path):
    net, _ = zoo
    evil = tmp_path / "evil.pt"
    torch.save({"model": net.state_dict(), "extra": Payload()}, evil)
    EXECUTED.clear()
    with pytest.raises(BundleError, match=r"pickled Python objects \(\S*_mark_executed\)") as info:
        convert_monai_brats(evil, tmp_path / "out")
    assert "weights_only=False" not in str(info.value)
    assert EXECUTED == []
    _nothing_beside(tmp_path, {"evil.pt"})


def test_wrong_architecture_names_the_tensors(tmp_path):
    from monai.networks.nets import SegResNet

    other = SegResNet(blocks_down=[1, 2, 2, 4], blocks_up=[1, 1, 1], init_filters=8, in_channels=4, out_channels=3)
    path = tmp_path / "tiny.pt"
    torch.save(other.state_dict(), path)
    with pytest.raises(BundleError, match=r"misshapen tensors: .*convInit\.conv\.weight \(8, 4, 3, 3, 3\) "
                                          r"\(expected \(16, 4, 3, 3, 3\)\)"):
        convert_monai_brats(path, tmp_path / "out")

    state = zoo_network().state_dict()
    del state["conv_final.2.conv.weight"]
    state["decoder.extra.weight"] = torch.zeros(3)
    torch.save(state, path)
    with pytest.raises(BundleError) as info:
        convert_monai_brats(path, tmp_path / "out")
    assert "1 missing tensors: conv_final.2.conv.weight" in str(info.value)
    assert "1 unexpected tensors: decoder.extra.weight" in str(info.value)
    _nothing_beside(tmp_path, {"tiny.pt"})


def test_damaged_missing_and_odd_files_give_clear_errors(zoo, tmp_path):
    _, checkpoint = zoo
    data = checkpoint.read_bytes()
    cases = {
        "truncated.pt": (data[: len(data) // 2], BundleError, "corrupt, truncated"),
        "garbage.pt": (b"this is not a checkpoint at all", BundleError, "corrupt, truncated"),
        "empty.pt": (b"", BundleError, "empty"),
    }
    for name, (content, error, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(error, match=message):
            convert_monai_brats(tmp_path / name, tmp_path / "out")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(BundleError, match="holds a Tensor, not a state dict"):
        convert_monai_brats(tmp_path / "tensor.pt", tmp_path / "out")
    torch.save({"weights": {"a": torch.zeros(1)}, "epoch": 3}, tmp_path / "unwrapped.pt")
    with pytest.raises(BundleError, match="neither a state dict nor one wrapped under model, state_dict, network"):
        convert_monai_brats(tmp_path / "unwrapped.pt", tmp_path / "out")
    with pytest.raises(InputError, match="does not exist"):
        convert_monai_brats(tmp_path / "nope.pt", tmp_path / "out")
    _nothing_beside(tmp_path, {*cases, "tensor.pt", "unwrapped.pt"})


def test_existing_destination_needs_overwrite_and_must_be_a_segmenter_bundle(zoo, tmp_path):
    _, checkpoint = zoo
    out = convert_monai_brats(checkpoint, tmp_path / "seg")
    first = json.loads((out / "manifest.json").read_text())
    with pytest.raises(InputError, match="already exists"):
        convert_monai_brats(checkpoint, out)
    again = convert_monai_brats(checkpoint, out, overwrite=True)
    assert json.loads((again / "manifest.json").read_text())["weights"] == first["weights"]
    foreign = tmp_path / "my-data"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(InputError, match="not a segmenter bundle"):
        convert_monai_brats(checkpoint, foreign, overwrite=True)
    assert (foreign / "precious.txt").read_text() == "keep me"


def test_cli_converts_and_reports_errors_with_exit_2(zoo, tmp_path, capsys):
    _, checkpoint = zoo
    out = tmp_path / "seg"
    assert main(["models", "convert-monai-brats", str(checkpoint), "--out", str(out)]) == 0
    assert "scorefusion segment --model" in capsys.readouterr().out
    validate_segmenter_bundle(out)
    assert main(["models", "convert-monai-brats", str(checkpoint), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["models", "convert-monai-brats", str(checkpoint), "--out", str(out), "--overwrite"]) == 0
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 100)
    assert main(["models", "convert-monai-brats", str(bad), "--out", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "corrupt" in err
    assert not (tmp_path / "other").exists()
