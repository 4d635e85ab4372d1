"""Tests of the physics-based simulator (``ScoreFusionLib.simulator``, ``scorefusion simulate``).

They run on the 2 mm grid (99x117x95), plus a few cheap checks on the 1 mm grid without
deformation or noise. The ICBM152 maps come from the nilearn wheel; where they are absent
the data-driven tests skip on a user's machine but fail under CI (``CI=true``).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ScoreFusionLib import __version__
from ScoreFusionLib.cli.main import main
from ScoreFusionLib.errors import DatasetError, InputError
from ScoreFusionLib.geometry import low_resolution_affine
from ScoreFusionLib.labels import convert_labels
from ScoreFusionLib.simulator import (
    CONTRASTS,
    icbm_data_dir,
    load_tissue_maps,
    simulate_case,
    tissue,
)
from ScoreFusionLib.simulator import physics as ph

REPO = Path(__file__).resolve().parents[2]
DESCRIP = f"SIMULATED ScoreFusion {__version__} seed=0"
SUFFIXES = ("t1n", "t1c", "t2w", "t2f", "pdw", "seg")
CLI_ARGS = ["--cases", "2", "--tumor", "--seed", "0", "--spacing", "2", "--quiet"]


def _icbm_available() -> bool:
    try:
        icbm_data_dir()
    except DatasetError:
        return False
    return True


# Skip only off CI; under CI=true a missing install must fail loudly (the Makefile installs it).
needs_icbm = pytest.mark.skipif(
    not _icbm_available() and os.environ.get("CI") != "true",
    reason="nilearn's ICBM152 files are missing: pip install --no-deps nilearn==0.14.1",
)


def _corr(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    return float(np.corrcoef(a[mask].astype(np.float64), b[mask].astype(np.float64))[0, 1])


def _run_main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def _read(path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def maps2():
    return load_tissue_maps(2.0)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """The documented CLI call, run in-process once for the module."""
    out = tmp_path_factory.mktemp("sim") / "cohort"
    rc, stdout, stderr = _run_main(["simulate", "--out", str(out), *CLI_ARGS])
    assert rc == 0, stderr
    return out, stdout


@pytest.fixture(scope="module")
def tumour_case():
    """Case 1 of seed 0 through the Python API: the same case as the CLI's first."""
    return simulate_case(0, 1, spacing=2.0, tumor=True)


def _case_dir(out: Path, k: int) -> Path:
    return out / f"ScoreFusionSim-{k:05d}"


# --------------------------------------------------------------------------- grid and tissue
@needs_icbm
def test_2mm_grid_rule_and_affine(maps2):
    source = tissue._load_source()[1]
    assert maps2.shape == (95, 117, 99)  # (k, j, i) = ceil(189/2), ceil(233/2), ceil(197/2)
    np.testing.assert_allclose(maps2.affine, low_resolution_affine(source, 2.0), atol=1e-12)
    # cell-centred: the first 2 mm box starts where the first 1 mm box starts
    np.testing.assert_allclose(maps2.affine[:3, 3] - 1.0, source[:3, 3] - 0.5)
    total = maps2.gm + maps2.wm + maps2.csf
    np.testing.assert_allclose(total, maps2.brain, atol=1e-5)
    assert np.all(maps2.csf >= 0) and float(maps2.brain.max()) == pytest.approx(1.0)


@needs_icbm
def test_block_average_conserves_tissue_volume(maps2):
    maps1 = load_tissue_maps(1.0)
    assert maps1.shape == (189, 233, 197)
    for name in ("gm", "wm", "csf", "brain"):
        ml_1mm = float(getattr(maps1, name).sum(dtype=np.float64))
        ml_2mm = float(getattr(maps2, name).sum(dtype=np.float64)) * 8.0
        assert ml_2mm == pytest.approx(ml_1mm, rel=1e-5)


@pytest.mark.parametrize("bad", [0, -1, 0.5, 8.5, 100, float("nan"), float("inf"), "two"])
def test_spacing_validation(bad):
    with pytest.raises(InputError, match="spacing"):
        tissue.validate_spacing(bad)


def test_missing_nilearn_gives_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(tissue.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DatasetError, match=r"pip install --no-deps nilearn==0\.14\.1"):
        tissue.icbm_data_dir()

    class FakeSpec:
        submodule_search_locations = [str(tmp_path)]

    monkeypatch.setattr(tissue.importlib.util, "find_spec", lambda name: FakeSpec())
    with pytest.raises(DatasetError, match="missing"):
        tissue.icbm_data_dir()


# --------------------------------------------------------------------------- physics
def test_signal_equations():
    s = ph.spin_echo(0.8, 1000.0, 80.0, 500.0, 15.0)
    assert s == pytest.approx(0.8 * (1 - math.exp(-500.0 / 1000.0)) * math.exp(-15.0 / 80.0))
    ti0 = ph.csf_null_ti(4160.0, 9000.0)
    assert ti0 == pytest.approx(2431.0, abs=1.0)  # docs/data.md: about 2.43 s for TR 9 s
    assert ph.inversion_recovery(1.0, 4160.0, 2000.0, 9000.0, 100.0, ti0) == pytest.approx(0.0, abs=1e-9)
    assert ph.inversion_recovery(0.69, 830.0, 80.0, 9000.0, 100.0, ti0) > 0.1


@needs_icbm
@pytest.mark.parametrize("spacing", [1.0, 2.0])
def test_t1w_correlates_with_real_icbm_t1(spacing):
    maps = load_tissue_maps(spacing)
    t1w = ph.mix(maps.fractions(), ph.tissue_signals(ph.nominal_tissues(), ph.Sequence("spin_echo", 500, 15)))
    inside = maps.reference_t1 > 0
    r = _corr(t1w, maps.reference_t1, inside)
    print(f"T1w (TR 500, TE 15) vs real ICBM T1 at {spacing:g} mm, T1 > 0: r = {r:.4f}")
    assert r > 0.95


@needs_icbm
def test_t2w_anticorrelates_and_flair_nulls_csf(maps2):
    maps1 = load_tissue_maps(1.0)
    t2 = ph.tissue_signals(ph.nominal_tissues(), ph.Sequence("spin_echo", 4000, 100))
    flair = ph.tissue_signals(ph.nominal_tissues(), ph.Sequence("inversion_recovery", 9000, 100, 2500))
    r1 = _corr(ph.mix(maps1.fractions(), t2), maps1.reference_t1, maps1.reference_t1 > 0)
    # At 2 mm, cells straddling the brain edge are dark in every image; use whole-brain cells.
    whole = maps2.brain >= 1.0
    r2 = _corr(ph.mix(maps2.fractions(), t2), maps2.reference_t1, whole)
    rf = _corr(ph.mix(maps1.fractions(), flair), maps1.reference_t1, maps1.reference_t1 > 0)
    print(f"T2w (TR 4000, TE 100) vs real T1: r = {r1:.4f} at 1 mm (T1 > 0), {r2:.4f} at 2 mm (whole cells)")
    print(f"FLAIR (TR 9000, TI 2500, TE 100) vs real T1 at 1 mm: r = {rf:.4f}")
    assert r1 < -0.95 and r2 < -0.95
    fl = ph.mix(maps2.fractions(), flair)
    t2w = ph.mix(maps2.fractions(), t2)
    csf, wm = maps2.csf > 0.9, maps2.wm > 0.9
    assert csf.sum() > 100 and wm.sum() > 100
    assert fl[csf].mean() < 0.3 * fl[wm].mean()  # CSF dark in FLAIR
    assert t2w[csf].mean() > 2.0 * t2w[wm].mean()  # and bright in T2w


@needs_icbm
def test_simulated_case_keeps_the_real_contrast(maps2):
    """Jittered parameters, random timings, bias and noise still give a recognisable T1w."""
    inside = maps2.reference_t1 > 0
    noisy = simulate_case(0, 1, spacing=2.0, deform=False)
    clean = simulate_case(0, 1, spacing=2.0, deform=False, noise=False)
    r_noisy = _corr(noisy.images["t1n"].array, maps2.reference_t1, inside)
    r_clean = _corr(clean.images["t1n"].array, maps2.reference_t1, inside)
    whole = maps2.brain >= 1.0
    r_t2 = _corr(noisy.images["t2w"].array, maps2.reference_t1, whole)
    print(f"simulated t1n vs real T1 (seed 0, 2 mm): r = {r_noisy:.4f} with noise, {r_clean:.4f} without")
    print(f"simulated t2w vs real T1 (seed 0, 2 mm, whole cells): r = {r_t2:.4f}")
    assert r_noisy > 0.9 and r_clean > 0.95 and r_t2 < -0.9
    # switching noise off changes nothing else: same parameters, exact zero background
    assert noisy.params["contrasts"]["t1n"]["TR_ms"] == clean.params["contrasts"]["t1n"]["TR_ms"]
    outside = maps2.brain == 0
    for contrast in CONTRASTS:
        assert np.all(clean.images[contrast].array[outside] == 0.0)
        # with noise the background is Rayleigh: mean sigma * sqrt(pi / 2)
        sigma = noisy.params["contrasts"][contrast]["noise_sigma"]
        mean = float(noisy.images[contrast].array[outside].mean())
        assert mean == pytest.approx(sigma * math.sqrt(math.pi / 2), rel=0.05)


@needs_icbm
def test_icbm_t1_source_is_the_real_t1_under_the_same_deformation(maps2):
    """t1_source='icbm': without deformation and noise the t1n image is the real T1 up to
    gain x bias; with deformation it follows the same warp as the other contrasts."""
    plain = simulate_case(0, 1, spacing=2.0, deform=False, noise=False, t1_source="icbm")
    simulated = simulate_case(0, 1, spacing=2.0, deform=False, noise=False)
    inside = maps2.reference_t1 > 0
    assert plain.params["t1_source"] == "icbm"
    assert _corr(plain.images["t1n"].array, maps2.reference_t1, inside) > 0.99
    for contrast in ("t2w", "t2f"):  # the other contrasts are untouched
        assert np.array_equal(plain.images[contrast].array, simulated.images[contrast].array)
    warped = simulate_case(0, 1, spacing=2.0, noise=False, t1_source="icbm")
    same_warp = simulate_case(0, 1, spacing=2.0, noise=False)
    brain = warped.fractions["wm"] + warped.fractions["gm"] + warped.fractions["csf"] > 0.5
    assert _corr(warped.images["t1n"].array, same_warp.images["t1n"].array, brain) > 0.9
    # it matches the deformed anatomy better than the undeformed real T1 does
    assert _corr(plain.images["t1n"].array, same_warp.images["t1n"].array, brain) < _corr(
        warped.images["t1n"].array, same_warp.images["t1n"].array, brain)


def test_icbm_t1_source_refuses_a_tumour_and_unknown_sources(tmp_path):
    with pytest.raises(InputError, match="no tumour"):
        simulate_case(0, 1, spacing=2.0, tumor=True, t1_source="icbm")
    with pytest.raises(InputError, match="unknown T1 source"):
        simulate_case(0, 1, spacing=2.0, t1_source="mprage")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["simulate", "--out", str(tmp_path / "c"), "--tumor", "--t1-source", "icbm", "--quiet"])
    assert rc == 2 and "no tumour" in err.getvalue()
    assert not (tmp_path / "c").exists()


@needs_icbm
def test_no_global_random_state(maps2):
    # The legacy global generator is used on purpose: the simulator must neither read nor move it.
    np.random.seed(1234)  # noqa: NPY002
    before = np.random.get_state()[1].copy()  # noqa: NPY002
    simulate_case(3, 2, spacing=2.0, noise=False)
    assert np.array_equal(np.random.get_state()[1], before)  # noqa: NPY002


# --------------------------------------------------------------------------- CLI output
@needs_icbm
def test_cli_writes_brats_layout(cohort):
    out, stdout = cohort
    assert str(out) in stdout and "2 simulated cases" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["ScoreFusionSim-00001", "ScoreFusionSim-00002"]
    for k in (1, 2):
        case = _case_dir(out, k)
        expected = {f"{case.name}-{s}.nii.gz" for s in SUFFIXES} | {f"{case.name}.json"}
        assert {p.name for p in case.iterdir()} == expected


@needs_icbm
def test_cli_volumes_share_one_grid_and_say_simulated(cohort, maps2):
    out, _ = cohort
    for k in (1, 2):
        case = _case_dir(out, k)
        ref_affine = None
        for suffix in SUFFIXES:
            data, img = _read(case / f"{case.name}-{suffix}.nii.gz")
            assert data.shape == (99, 117, 95)
            assert img.header["descrip"].tobytes().rstrip(b"\0").decode() == DESCRIP
            if ref_affine is None:
                ref_affine = img.affine
            assert np.array_equal(img.affine, ref_affine)
            if suffix == "seg":
                assert data.dtype == np.uint8
            else:
                assert data.dtype == np.float32 and float(data.min()) >= 0.0 and np.isfinite(data).all()
        np.testing.assert_allclose(ref_affine, maps2.affine, atol=1e-6)


@needs_icbm
def test_cli_sidecar_records_every_parameter(cohort):
    out, _ = cohort
    meta = json.loads((_case_dir(out, 1) / "ScoreFusionSim-00001.json").read_text())
    assert meta["simulated"] is True and meta["seed"] == 0 and meta["case_index"] == 1
    assert meta["simulator_version"] == __version__ and meta["description"] == DESCRIP
    assert meta["label_convention"] == "brats2023" and meta["spacing_mm"] == [2.0, 2.0, 2.0]
    for name, (t1, t2, pd) in ph.NORMAL_TISSUE.items():
        got = meta["tissues"][name]
        for value, nominal in ((got["t1_ms"], t1), (got["t2_ms"], t2), (got["pd"], pd)):
            assert abs(value / nominal - 1) <= 0.1 + 1e-9
    contrasts = meta["contrasts"]
    assert set(contrasts) == set(CONTRASTS)
    for name, ranges in ph.TIMING_RANGES.items():
        assert ranges["TR"][0] <= contrasts[name]["TR_ms"] <= ranges["TR"][1]
        assert ranges["TE"][0] <= contrasts[name]["TE_ms"] <= ranges["TE"][1]
    null = ph.csf_null_ti(meta["tissues"]["csf"]["t1_ms"], contrasts["t2f"]["TR_ms"])
    assert abs(contrasts["t2f"]["TI_ms"] / null - 1) <= 0.1 + 1e-9
    for c in contrasts.values():
        assert 10 <= c["snr"] <= 40 and 0.1 <= c["bias_strength"] <= 0.3 and c["gain"] > 0
    for key in ("TR_ms", "TE_ms", "gain", "snr"):  # t1c is the T1w sequence after contrast
        assert contrasts["t1c"][key] == contrasts["t1n"][key]
    assert meta["deformation"]["enabled"] and 2.0 <= meta["deformation"]["amplitude_mm"] <= 4.0
    tumour = meta["tumour"]
    r_e = tumour["radii_mm"]["enhancing"]
    assert 8 <= r_e <= 20 and len(tumour["centre_ras_mm"]) == 3
    assert 0.3 * r_e <= tumour["radii_mm"]["necrotic_core"] <= 0.7 * r_e
    assert 1.5 * r_e <= tumour["radii_mm"]["edema"] <= 3.0 * r_e
    assert 0.3 <= tumour["t1c_enhancing_T1_factor"] <= 0.5
    assert meta["files"]["seg"] == "ScoreFusionSim-00001-seg.nii.gz"


@needs_icbm
def test_cli_labels_use_the_convention_and_all_compartments(cohort):
    out, _ = cohort
    for k in (1, 2):
        case = _case_dir(out, k)
        seg, _ = _read(case / f"{case.name}-seg.nii.gz")
        values = set(np.unique(seg).tolist())
        assert values == {0, 1, 2, 3}, values  # brats2023: 1 NETC, 2 SNFH, 3 ET


@needs_icbm
def test_api_case_equals_cli_files(cohort, tumour_case):
    out, _ = cohort
    case = _case_dir(out, 1)
    for contrast, volume in tumour_case.images.items():
        data, _ = _read(case / f"{case.name}-{contrast}.nii.gz")
        assert np.array_equal(np.transpose(data, (2, 1, 0)), volume.array)
    seg, _ = _read(case / f"{case.name}-seg.nii.gz")
    assert np.array_equal(np.transpose(seg, (2, 1, 0)), tumour_case.labels.array)


@needs_icbm
def test_tumour_appearance(tumour_case):
    img = {c: v.array for c, v in tumour_case.images.items()}
    labels = tumour_case.labels.array
    wm = (tumour_case.fractions["wm"] > 0.9) & (labels == 0)
    tumour = labels > 0
    edema, enhancing = labels == 2, labels == 3
    for contrast in ("t2w", "t2f"):
        assert img[contrast][tumour].mean() > 1.2 * img[contrast][wm].mean(), contrast
        assert img[contrast][edema].mean() > 1.2 * img[contrast][wm].mean(), contrast
    assert img["t1c"][enhancing].mean() > 1.3 * img["t1n"][enhancing].mean()
    ratio_c = img["t1c"][enhancing].mean() / img["t1c"][wm].mean()
    ratio_n = img["t1n"][enhancing].mean() / img["t1n"][wm].mean()
    assert ratio_c > 1.3 * ratio_n
    # oedema replaces WM/GM but never CSF; fractions still add up to the brain
    f = tumour_case.fractions
    assert float(f["edema"][f["csf"] > 0.9].max(initial=0.0)) < 0.1
    assert float(f["csf"][edema].mean()) < 0.2


@needs_icbm
def test_brats2021_convention(tumour_case):
    old = simulate_case(0, 1, spacing=2.0, tumor=True, convention="brats2021", noise=False)
    assert set(np.unique(old.labels.array).tolist()) == {0, 1, 2, 4}
    recoded = convert_labels(old.labels.array, "brats2021", "brats2023")
    assert np.array_equal(recoded, tumour_case.labels.array)
    assert old.params["label_convention"] == "brats2021"


@needs_icbm
def test_subprocess_same_seed_gives_identical_files(cohort, tmp_path):
    out, _ = cohort
    other = tmp_path / "again"
    cmd = [sys.executable, "-m", "ScoreFusionLib", "simulate", "--out", str(other), *CLI_ARGS]
    cmd[cmd.index("--cases") + 1] = "1"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "ScoreFusionSim-00001" in proc.stdout
    a, b = _case_dir(out, 1), _case_dir(other, 1)
    for suffix in SUFFIXES:
        x, _ = _read(a / f"{a.name}-{suffix}.nii.gz")
        y, _ = _read(b / f"{b.name}-{suffix}.nii.gz")
        assert np.array_equal(x, y), suffix
    assert (a / f"{a.name}.json").read_text() == (b / f"{b.name}.json").read_text()


@needs_icbm
def test_different_seed_or_case_differs(cohort, tumour_case):
    out, _ = cohort
    t1n_2, _ = _read(_case_dir(out, 2) / "ScoreFusionSim-00002-t1n.nii.gz")
    assert not np.array_equal(np.transpose(t1n_2, (2, 1, 0)), tumour_case.images["t1n"].array)
    other = simulate_case(1, 1, spacing=2.0, tumor=True)
    assert not np.array_equal(other.images["t1n"].array, tumour_case.images["t1n"].array)
    assert not np.array_equal(other.labels.array, tumour_case.labels.array)
    assert other.params["tumour"]["centre_ras_mm"] != tumour_case.params["tumour"]["centre_ras_mm"]


@needs_icbm
def test_contrasts_stay_coregistered_after_deformation(tumour_case):
    support = sum(tumour_case.fractions.values()) > 0
    clean = simulate_case(0, 1, spacing=2.0, tumor=True, noise=False)
    for contrast in CONTRASTS:
        assert np.array_equal(clean.images[contrast].array > 0, support), contrast
    assert np.array_equal(clean.labels.array, tumour_case.labels.array)


# --------------------------------------------------------------------------- CLI errors
@needs_icbm
def test_cli_refuses_to_overwrite_and_overwrites_on_request(tmp_path):
    out = tmp_path / "cohort"
    fast = ["--cases", "1", "--spacing", "4", "--no-deform", "--no-noise", "--quiet"]
    assert _run_main(["simulate", "--out", str(out), "--seed", "0", *fast])[0] == 0
    t1n = out / "ScoreFusionSim-00001" / "ScoreFusionSim-00001-t1n.nii.gz"
    before = t1n.read_bytes()
    rc, _, err = _run_main(["simulate", "--out", str(out), "--seed", "1", *fast])
    assert rc == 2 and "already exist" in err and "--overwrite" in err
    assert t1n.read_bytes() == before
    rc, _, err = _run_main(["simulate", "--out", str(out), "--seed", "1", "--overwrite", *fast])
    assert rc == 0, err
    assert t1n.read_bytes() != before
    meta = json.loads((out / "ScoreFusionSim-00001" / "ScoreFusionSim-00001.json").read_text())
    assert meta["seed"] == 1
    assert [p.name for p in out.iterdir()] == ["ScoreFusionSim-00001"]  # no temporary leftovers


@pytest.mark.parametrize("value", ["0", "-1", "9", "nan", "inf"])
def test_cli_bad_spacing_exits_2(tmp_path, value):
    out = tmp_path / "bad"
    rc, _, err = _run_main(["simulate", "--out", str(out), "--spacing", value, "--quiet"])
    assert rc == 2
    assert err.startswith("scorefusion simulate: error:") and "spacing" in err
    assert not out.exists()


def test_cli_non_numeric_spacing_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit) as exc, contextlib.redirect_stderr(io.StringIO()):
        main(["simulate", "--out", str(tmp_path / "x"), "--spacing", "two"])
    assert exc.value.code == 2
