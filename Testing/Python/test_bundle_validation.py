"""validate_bundle refuses every kind of broken bundle with a message naming the file or field."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from jsonschema import Draft202012Validator

from bundle_fixtures import add_fuser, make_random_bundle
from ScoreFusionLib.bundle import BundleError, Manifest, load_weights, save_weights
from ScoreFusionLib.bundle_validation import bundle_file, inspect_bundle, manifest_schema, validate_bundle
from ScoreFusionLib.data.task import TaskSpec
from ScoreFusionLib.degradation import AveragePool
from ScoreFusionLib.nets.fuser_config import fuser_config


@pytest.fixture
def bundle(tmp_path):
    spec = TaskSpec(kind="sr", inputs=[], target="t1n", degradation=AveragePool(2))
    return add_fuser(make_random_bundle(tmp_path / "b", spec, planes=("axial", "sagittal")))


def _edit(bundle, change):
    """Apply ``change`` to the manifest's JSON in place."""
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _rewrite(bundle, plane, sets, relink_fuser=True):
    """Replace a plane's weight file and record its new checksum (and, by default, re-link the fuser)."""
    name = f"plane-{plane}.safetensors"
    sha = save_weights(bundle / name, sets)

    def change(data):
        data["planes"][plane]["sha256"] = sha
        if relink_fuser and "fuser" in data:
            data["fuser"]["plane_sha256"][plane] = sha

    _edit(bundle, change)
    return sha


def test_valid_bundle_reports_files_and_weight_sets(bundle):
    manifest = validate_bundle(bundle)
    assert isinstance(manifest, Manifest)
    assert set(manifest.planes) == {"axial", "sagittal"}
    report = inspect_bundle(bundle)
    assert [f.role for f in report.files] == ["axial", "sagittal", "fuser"]
    assert report.weight_sets == {"plane-axial.safetensors": ("raw", "ema"),
                                  "plane-sagittal.safetensors": ("raw", "ema"),
                                  "fuser-crops.safetensors": ("raw", "ema")}
    assert report.common_weight_sets == ("raw", "ema")
    files = ["manifest.json", "plane-axial.safetensors", "plane-sagittal.safetensors", "fuser-crops.safetensors"]
    assert report.total_bytes == sum((bundle / f).stat().st_size for f in files)
    assert report.model == {}


def test_the_schema_is_a_valid_draft_2020_12_schema():
    Draft202012Validator.check_schema(manifest_schema())


def test_missing_manifest_and_invalid_json(bundle, tmp_path):
    with pytest.raises(BundleError, match="manifest.json not found"):
        validate_bundle(tmp_path)
    with pytest.raises(BundleError, match="not a model bundle folder"):
        validate_bundle(tmp_path / "nowhere")
    (bundle / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        validate_bundle(bundle)
    (bundle / "manifest.json").write_text("[1, 2]")
    with pytest.raises(BundleError, match="must hold a JSON object"):
        validate_bundle(bundle)


def test_unknown_format_and_version_keep_their_clear_messages(bundle):
    _edit(bundle, lambda d: d.update(format_version=2))
    with pytest.raises(BundleError, match="format version 2; this ScoreFusion reads version 1"):
        validate_bundle(bundle)
    _edit(bundle, lambda d: d.update(format_version=1, format="other"))
    with pytest.raises(BundleError, match="not a ScoreFusion bundle manifest"):
        validate_bundle(bundle)


@pytest.mark.parametrize(("change", "where", "what"), [
    (lambda d: d.pop("task"), r"\$", "'task' is a required property"),
    (lambda d: d["task"].update(kind="denoise"), r"\$\.task\.kind", "is not one of"),
    (lambda d: d["planes"]["axial"].update(sha256="ABC"), r"\$\.planes\.axial\.sha256", "does not match"),
    (lambda d: d["planes"]["axial"].update(steps=-1), r"\$\.planes\.axial\.steps", "less than the minimum"),
    (lambda d: d["planes"].update(oblique=d["planes"]["axial"]), r"\$\.planes", "'oblique' was unexpected"),
    (lambda d: d["planes"]["axial"]["config"].update(depth=3), r"\$\.planes\.axial\.config", "'depth' was unexpected"),
    (lambda d: d["fuser"].update(plane_weights="best"), r"\$\.fuser\.plane_weights", "is not one of"),
    (lambda d: d["fuser"].pop("plane_sha256"), r"\$\.fuser", "'plane_sha256' is a required property"),
    (lambda d: d.update(model={"id": "Bad Id"}), r"\$\.model\.id", "does not match"),
    (lambda d: d.update(model={"card": "../card.md"}), r"\$\.model\.card", "does not match"),
    (lambda d: d.update(neighbors="0"), r"\$\.neighbors", "is not of type 'integer'"),
])
def test_schema_violations_name_the_field(bundle, change, where, what):
    _edit(bundle, change)
    with pytest.raises(BundleError, match=f"violates the bundle manifest schema at {where}: .*{what}"):
        validate_bundle(bundle)


def test_file_names_cannot_leave_the_bundle(bundle, tmp_path):
    _edit(bundle, lambda d: d["planes"]["axial"].update(file="../plane-axial.safetensors"))
    with pytest.raises(BundleError, match=r"schema at \$\.planes\.axial\.file"):
        validate_bundle(bundle)
    _edit(bundle, lambda d: d["planes"]["axial"].update(file="plane-axial.safetensors"))
    validate_bundle(bundle)
    # a link to a file outside the folder passes the name pattern but resolves elsewhere
    outside = tmp_path / "outside.safetensors"
    shutil.move(bundle / "plane-axial.safetensors", outside)
    (bundle / "plane-axial.safetensors").symlink_to(outside)
    with pytest.raises(BundleError, match="plane-axial.safetensors escapes the bundle folder"):
        validate_bundle(bundle)
    for name in ("../x", "a/b", "a\\b", "C:x", "..", ""):
        with pytest.raises(BundleError, match="not a plain file name"):
            bundle_file(bundle, name)


def test_missing_truncated_and_corrupted_weight_files(bundle):
    path = bundle / "plane-sagittal.safetensors"
    original = path.read_bytes()
    path.unlink()
    with pytest.raises(BundleError, match=r"weight file plane-sagittal.safetensors \(sagittal\) is missing"):
        validate_bundle(bundle)
    path.write_bytes(original[: len(original) // 2])
    with pytest.raises(BundleError, match=r"plane-sagittal.safetensors \(sagittal\) is truncated or not a safetensors"):
        validate_bundle(bundle)
    corrupted = bytearray(original)
    corrupted[-7] ^= 0x01
    path.write_bytes(bytes(corrupted))
    with pytest.raises(BundleError, match=r"plane-sagittal.safetensors \(sagittal\) is corrupted or was replaced"):
        validate_bundle(bundle)
    path.write_bytes(original)
    validate_bundle(bundle)


def test_tensors_are_checked_against_the_configured_network(bundle):
    state = load_weights(bundle / "plane-axial.safetensors", "ema")
    first = sorted(state)[0]
    label = r"plane-axial.safetensors \(axial\), 'ema' set"

    partial = {k: v for k, v in state.items() if k != first}
    _rewrite(bundle, "axial", {"raw": state, "ema": partial})
    with pytest.raises(BundleError, match=rf"{label} does not fit .*1 missing tensors \['{first}'\], 0 unexpected"):
        validate_bundle(bundle)

    _rewrite(bundle, "axial", {"raw": state, "ema": {**state, "surplus.weight": torch.zeros(2)}})
    with pytest.raises(BundleError, match=rf"{label} does not fit .*0 missing tensors \[\], 1 unexpected tensors "
                                          r"\['surplus.weight'\]"):
        validate_bundle(bundle)

    _rewrite(bundle, "axial", {"raw": state, "ema": {**state, first: torch.zeros(3, 3)}})
    with pytest.raises(BundleError, match=rf"{label}: tensor {first} has shape \(3, 3\), the network expects"):
        validate_bundle(bundle)

    _rewrite(bundle, "axial", {"raw": state, "ema": {**state, first: state[first].double()}})
    with pytest.raises(BundleError, match=rf"{label}: tensor {first} has dtype F64, the network expects F32"):
        validate_bundle(bundle)

    # the raw set is checked as well
    _rewrite(bundle, "axial", {"raw": partial, "ema": state})
    with pytest.raises(BundleError, match=r"plane-axial.safetensors \(axial\), 'raw' set does not fit"):
        validate_bundle(bundle)


def test_weight_sets_ema_required_raw_optional(bundle):
    state = load_weights(bundle / "plane-axial.safetensors", "ema")
    _rewrite(bundle, "axial", {"ema": state})
    report = inspect_bundle(bundle)
    assert report.weight_sets["plane-axial.safetensors"] == ("ema",)
    assert report.common_weight_sets == ("ema",)

    _rewrite(bundle, "axial", {"raw": state})
    with pytest.raises(BundleError, match=r"plane-axial.safetensors \(axial\) holds no 'ema' weights "
                                          r"\(present: \['raw'\]"):
        validate_bundle(bundle)


def test_tensors_outside_the_weight_sets_are_refused(bundle):
    from safetensors.torch import save_file

    path = bundle / "plane-axial.safetensors"
    state = load_weights(path, "ema")
    flat = {f"ema/{k}": v for k, v in state.items()}
    save_file({**flat, "best/extra": torch.zeros(1)}, str(path))
    _rewrite_sha(bundle, "axial")
    with pytest.raises(BundleError, match="holds tensor 'best/extra' outside the raw and ema weight sets"):
        validate_bundle(bundle)


def _rewrite_sha(bundle, plane):
    from ScoreFusionLib.bundle import sha256_file

    sha = sha256_file(bundle / f"plane-{plane}.safetensors")

    def change(data):
        data["planes"][plane]["sha256"] = sha
        data["fuser"]["plane_sha256"][plane] = sha

    _edit(bundle, change)


def test_fuser_must_belong_to_the_plane_files(bundle):
    state = load_weights(bundle / "plane-sagittal.safetensors", "ema")
    _rewrite(bundle, "sagittal", {"ema": {k: v + 1 for k, v in state.items()}}, relink_fuser=False)
    with pytest.raises(BundleError, match="the sagittal plane model changed after the fuser was trained"):
        validate_bundle(bundle)


def test_fuser_plane_records_and_estimates_must_match_the_planes(bundle):
    _edit(bundle, lambda d: d["fuser"]["plane_sha256"].update(coronal="0" * 64))
    with pytest.raises(BundleError, match="trained with the coronal plane model"):
        validate_bundle(bundle)
    _edit(bundle, lambda d: d["fuser"]["plane_sha256"].pop("coronal"))
    validate_bundle(bundle)
    _edit(bundle, lambda d: d["fuser"]["config"].update(n_estimates=3,
                                                        in_channels=d["fuser"]["config"]["in_channels"] + 1))
    with pytest.raises(BundleError, match="fuses 3 plane estimates, but the bundle has 2 plane models"):
        validate_bundle(bundle)


def test_fuser_running_on_raw_plane_weights_needs_them(bundle):
    _edit(bundle, lambda d: d["fuser"].update(plane_weights="raw"))
    validate_bundle(bundle)
    state = load_weights(bundle / "plane-axial.safetensors", "ema")
    _rewrite(bundle, "axial", {"ema": state})
    with pytest.raises(BundleError, match=r"runs with the 'raw' plane weights, but weight file plane-axial"):
        validate_bundle(bundle)


def test_paper_size_fuser_is_checked_without_allocating_it(bundle):
    config = fuser_config("paper", 1 + 1 + 3 + 1 + 2, 2).to_dict()
    _edit(bundle, lambda d: d["fuser"].update(config=config))
    # the tiny fuser's file cannot fit the paper network; the expected 55M-parameter layout comes from a meta build
    with pytest.raises(BundleError, match=r"fuser-crops.safetensors \(fuser\), 'ema' set does not fit"):
        validate_bundle(bundle)


def test_semantically_invalid_configs_and_tasks(bundle):
    _edit(bundle, lambda d: d["planes"]["axial"]["config"].update(norm_groups=7))
    with pytest.raises(BundleError, match="the axial config in the manifest is invalid: .*norm_groups=7"):
        validate_bundle(bundle)
    _edit(bundle, lambda d: d["planes"]["axial"]["config"].update(norm_groups=8))
    _edit(bundle, lambda d: d.update(neighbors=1))
    with pytest.raises(BundleError, match="the axial network of .* takes 6 input channels, but its task .* gives 8"):
        validate_bundle(bundle)
    _edit(bundle, lambda d: d.update(neighbors=0))
    _edit(bundle, lambda d: d["task"].update(degradation=None))
    with pytest.raises(BundleError, match="the task in .* is invalid: .*needs a degradation operator"):
        validate_bundle(bundle)


def test_duplicate_weight_file_references(bundle):
    _edit(bundle, lambda d: d["planes"]["sagittal"].update(file="plane-axial.safetensors",
                                                          sha256=d["planes"]["axial"]["sha256"]))
    _edit(bundle, lambda d: d["fuser"]["plane_sha256"].update(sagittal=d["planes"]["axial"]["sha256"]))
    with pytest.raises(BundleError, match="plane-axial.safetensors is named by both the axial and the sagittal"):
        validate_bundle(bundle)


def test_model_card_must_exist(bundle):
    _edit(bundle, lambda d: d.update(model={"id": "demo", "version": "1.0.0", "card": "MODEL_CARD.md"}))
    with pytest.raises(BundleError, match="the model card MODEL_CARD.md named in .* is missing"):
        validate_bundle(bundle)
    (bundle / "MODEL_CARD.md").write_text("# Demo\n")
    report = inspect_bundle(bundle)
    assert report.model == {"id": "demo", "version": "1.0.0", "card": "MODEL_CARD.md"}
    files = ["manifest.json", "plane-axial.safetensors", "plane-sagittal.safetensors", "fuser-crops.safetensors",
             "MODEL_CARD.md"]
    assert report.total_bytes == sum((bundle / f).stat().st_size for f in files)


def test_bundle_without_fuser_is_valid(tmp_path):
    spec = TaskSpec(kind="mt", inputs=["t1n"], target="t2f")
    bundle = make_random_bundle(tmp_path / "mt", spec, planes=("coronal",))
    report = inspect_bundle(bundle)
    assert report.manifest.fuser is None
    assert [f.role for f in report.files] == ["coronal"]
