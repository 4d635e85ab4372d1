"""Bundle archives: reproducible packing, validated unpacking, and refusal of malicious zips."""

from __future__ import annotations

import json
import shutil
import stat
import struct
import warnings
import zipfile

import pytest
import torch

from bundle_fixtures import add_fuser, make_random_bundle
from ScoreFusionLib.archive import ArchiveError, safe_extract_zip
from ScoreFusionLib.bundle import BundleError, load_fuser, load_plane_models, load_weights, save_weights, sha256_file
from ScoreFusionLib.bundle_archive import pack_bundle, unpack_bundle
from ScoreFusionLib.bundle_validation import inspect_bundle
from ScoreFusionLib.data.task import TaskSpec
from ScoreFusionLib.degradation import AveragePool
from ScoreFusionLib.errors import ScoreFusionError

PLANES = ("axial", "sagittal")
MODEL = {"id": "tiny-sr", "title": "Tiny SR", "version": "1.0.0", "description": "test", "card": "MODEL_CARD.md"}


def _edit(bundle, change):
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.fixture
def bundle(tmp_path):
    """Two tiny planes whose raw weights differ from their EMA weights, and a fuser trained for them."""
    spec = TaskSpec(kind="sr", inputs=[], target="t1n", degradation=AveragePool(2))
    folder = make_random_bundle(tmp_path / "src", spec, planes=PLANES)
    for plane in PLANES:
        ema = load_weights(folder / f"plane-{plane}.safetensors", "ema")
        sha = save_weights(folder / f"plane-{plane}.safetensors",
                           {"raw": {k: v + 1 if v.is_floating_point() else v for k, v in ema.items()}, "ema": ema})
        _edit(folder, lambda d, p=plane, s=sha: d["planes"][p].update(sha256=s))
    return add_fuser(folder, random_seed=3)


@pytest.fixture
def card(tmp_path):
    path = tmp_path / "MODEL_CARD.md"
    path.write_text("# Tiny SR\n\nRandom weights for tests.\n")
    return path


def _leftovers(folder, *expected):
    """Names in ``folder`` other than ``expected`` (temporary siblings would show up here)."""
    return sorted(p.name for p in folder.iterdir() if p.name not in expected)


# ---------------------------------------------------------------------------------------------------- pack/unpack


def test_pack_unpack_round_trip_keeps_ema_drops_raw(bundle, card, tmp_path):
    out = tmp_path / "dist" / "tiny.zip"
    sha = pack_bundle(bundle, out, model=MODEL, extra_files=[card])
    assert sha == sha256_file(out)
    assert _leftovers(out.parent, "tiny.zip") == []
    with zipfile.ZipFile(out) as zf:
        infos = zf.infolist()
    names = [i.filename for i in infos]
    assert names == sorted(names) == ["MODEL_CARD.md", "fuser-crops.safetensors", "manifest.json",
                                      "plane-axial.safetensors", "plane-sagittal.safetensors"]
    assert {i.date_time for i in infos} == {(1980, 1, 1, 0, 0, 0)}
    assert {i.compress_type for i in infos} == {zipfile.ZIP_DEFLATED}

    dest = tmp_path / "installed"
    manifest = unpack_bundle(out, dest)
    assert set(manifest.planes) == set(PLANES)
    for name in ("plane-axial.safetensors", "plane-sagittal.safetensors", "fuser-crops.safetensors"):
        source_ema, source_raw = load_weights(bundle / name, "ema"), load_weights(bundle / name, "raw")
        packed_ema = load_weights(dest / name, "ema")
        assert packed_ema.keys() == source_ema.keys()
        for key, value in source_ema.items():
            assert packed_ema[key].dtype == value.dtype
            assert packed_ema[key].numpy().tobytes() == value.numpy().tobytes()  # bitwise equal
        if name.startswith("plane-"):  # the fixture's plane raw weights differ from EMA: it kept EMA
            assert not any(torch.equal(packed_ema[k], source_raw[k]) for k in source_raw if k.endswith("weight"))
        with pytest.raises(BundleError, match=f"weight file {name} holds no 'raw' weights"):
            load_weights(dest / name, "raw")
        assert (dest / name).stat().st_size < 0.6 * (bundle / name).stat().st_size
    report = inspect_bundle(dest)
    assert report.common_weight_sets == ("ema",)
    assert report.model == MODEL
    assert (dest / "MODEL_CARD.md").read_text() == card.read_text()

    # the fuser is re-linked to the rewritten plane files and still loads
    data = json.loads((dest / "manifest.json").read_text())
    new_plane_sha = {p: sha256_file(dest / f"plane-{p}.safetensors") for p in PLANES}
    assert data["fuser"]["plane_sha256"] == new_plane_sha
    assert new_plane_sha != {p: sha256_file(bundle / f"plane-{p}.safetensors") for p in PLANES}
    assert data["fuser"]["sha256"] == data["fuser"]["phases"]["crops"]["sha256"] == sha256_file(
        dest / "fuser-crops.safetensors")
    _, fuser = load_fuser(dest)
    _, source_fuser = load_fuser(bundle)
    for key, value in source_fuser.state_dict().items():
        assert torch.equal(fuser.state_dict()[key], value)
    load_plane_models(dest)


def test_packing_is_reproducible(bundle, card, tmp_path):
    first = pack_bundle(bundle, tmp_path / "a.zip", model=MODEL, extra_files=[card])
    second = pack_bundle(bundle, tmp_path / "b.zip", model=MODEL, extra_files=[card])
    assert first == second
    assert (tmp_path / "a.zip").read_bytes() == (tmp_path / "b.zip").read_bytes()
    # packing the unpacked result again changes nothing either
    unpack_bundle(tmp_path / "a.zip", tmp_path / "u")
    assert pack_bundle(tmp_path / "u", tmp_path / "c.zip") == first


def test_keeping_raw_copies_the_weight_files_verbatim(bundle, tmp_path):
    pack_bundle(bundle, tmp_path / "full.zip", weight_sets=("ema", "raw"))
    dest = tmp_path / "u"
    unpack_bundle(tmp_path / "full.zip", dest)
    for name in ("plane-axial.safetensors", "fuser-crops.safetensors"):
        assert (dest / name).read_bytes() == (bundle / name).read_bytes()
    assert inspect_bundle(dest).common_weight_sets == ("raw", "ema")
    assert "model" not in json.loads((dest / "manifest.json").read_text())


def test_fuser_for_other_planes_is_refused_at_pack_time(bundle, tmp_path):
    state = load_weights(bundle / "plane-axial.safetensors", "ema")
    sha = save_weights(bundle / "plane-axial.safetensors", {"ema": {k: v * 0.5 for k, v in state.items()}})
    _edit(bundle, lambda d: d["planes"]["axial"].update(sha256=sha))  # plane updated, fuser record stale
    out = tmp_path / "dist" / "x.zip"
    with pytest.raises(BundleError, match="the axial plane model changed after the fuser was trained"):
        pack_bundle(bundle, out)
    assert not out.exists()
    assert not out.parent.exists() or _leftovers(out.parent) == []


def test_only_the_current_fuser_phase_is_packed(bundle, tmp_path):
    shutil.copyfile(bundle / "fuser-crops.safetensors", bundle / "fuser-full.safetensors")

    def promote(d):
        crops = d["fuser"]["phases"]["crops"]
        d["fuser"].update(file="fuser-full.safetensors", phase="full")
        d["fuser"]["phases"]["full"] = {**crops, "file": "fuser-full.safetensors"}

    _edit(bundle, promote)
    pack_bundle(bundle, tmp_path / "x.zip")
    with zipfile.ZipFile(tmp_path / "x.zip") as zf:
        assert "fuser-crops.safetensors" not in zf.namelist()
        assert "fuser-full.safetensors" in zf.namelist()
    unpack_bundle(tmp_path / "x.zip", tmp_path / "u")
    fuser = json.loads((tmp_path / "u" / "manifest.json").read_text())["fuser"]
    assert list(fuser["phases"]) == ["full"]
    assert fuser["phases"]["full"]["sha256"] == fuser["sha256"]
    load_fuser(tmp_path / "u")


def test_pack_refusals(bundle, card, tmp_path):
    out = tmp_path / "x.zip"
    with pytest.raises(BundleError, match="must keep the 'ema' weights"):
        pack_bundle(bundle, out, weight_sets=("raw",))
    with pytest.raises(BundleError, match="unknown weight set"):
        pack_bundle(bundle, out, weight_sets=("ema", "best"))
    bad = tmp_path / "manifest.json"
    bad.write_text("{}")
    with pytest.raises(BundleError, match="would replace the bundle's manifest.json"):
        pack_bundle(bundle, out, extra_files=[bad])
    with pytest.raises(BundleError, match="does not exist"):
        pack_bundle(bundle, out, extra_files=[tmp_path / "nope.md"])
    with pytest.raises(BundleError, match="model card MODEL_CARD.md is neither among the extra files"):
        pack_bundle(bundle, out, model=MODEL)
    with pytest.raises(BundleError, match=r"schema at \$\.model\.id"):
        pack_bundle(bundle, out, model={"id": "Not Valid"})
    _edit(bundle, lambda d: d["fuser"].update(plane_weights="raw"))
    with pytest.raises(BundleError, match="the fuser runs with the 'raw' plane weights"):
        pack_bundle(bundle, out)
    _edit(bundle, lambda d: d["fuser"].update(plane_weights="ema"))
    _edit(bundle, lambda d: d["training"].update(status="running", planes_pending=["sagittal"]))
    with pytest.raises(BundleError, match="plane training of .* is not complete"):
        pack_bundle(bundle, out)
    assert _leftovers(tmp_path, "src", "MODEL_CARD.md", "manifest.json") == []


def test_unpack_accepts_a_single_top_level_folder(bundle, tmp_path):
    pack_bundle(bundle, tmp_path / "flat.zip")
    nested = tmp_path / "nested.zip"
    with zipfile.ZipFile(tmp_path / "flat.zip") as src, zipfile.ZipFile(nested, "w") as dst:
        dst.writestr("tiny-sr/", b"")
        for name in src.namelist():
            dst.writestr(f"tiny-sr/{name}", src.read(name))
    unpack_bundle(nested, tmp_path / "u")
    assert (tmp_path / "u" / "manifest.json").is_file()
    inspect_bundle(tmp_path / "u")

    two = tmp_path / "two.zip"
    with zipfile.ZipFile(nested) as src, zipfile.ZipFile(two, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, src.read(name))
        dst.writestr("other/readme.txt", b"hi")
    with pytest.raises(BundleError, match="holds no manifest.json at its root or in a single top-level folder"):
        unpack_bundle(two, tmp_path / "v")
    assert not (tmp_path / "v").exists()


def test_unpack_of_an_invalid_bundle_leaves_nothing(bundle, tmp_path):
    pack_bundle(bundle, tmp_path / "ok.zip")
    broken = tmp_path / "broken.zip"
    with zipfile.ZipFile(tmp_path / "ok.zip") as src, zipfile.ZipFile(broken, "w") as dst:
        for name in src.namelist():
            data = bytearray(src.read(name))
            if name == "plane-axial.safetensors":
                data[-3] ^= 0xFF
            dst.writestr(name, bytes(data))
    target = tmp_path / "dest" / "model"
    with pytest.raises(BundleError, match=r"the bundle in broken.zip is invalid: weight file plane-axial.safetensors "
                                          r"\(axial\) is corrupted"):
        unpack_bundle(broken, target)
    assert _leftovers(target.parent) == []
    (tmp_path / "exists").mkdir()
    with pytest.raises(BundleError, match="already exists"):
        unpack_bundle(tmp_path / "ok.zip", tmp_path / "exists")


# ---------------------------------------------------------------------------------------------------- malicious zips


def _zip(path, members):
    """Write ``(name_or_zipinfo, data)`` members, allowing duplicates."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, data in members:
                zf.writestr(name, data)
    return path


def _symlink_member(name, target):
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target


@pytest.mark.parametrize(("members", "message"), [
    ([("ok.txt", b"x"), ("../evil", b"pwned")], r"member '\.\./evil' has an empty, '\.' or '\.\.' path component"),
    ([("a/../../evil", b"pwned")], r"member 'a/\.\./\.\./evil' has an empty, '\.' or '\.\.'"),
    ([("/tmp/x", b"pwned")], r"member '/tmp/x' has an absolute path"),
    ([("C:/evil", b"pwned")], r"member 'C:/evil' has an absolute path"),
    ([("..\\evil", b"pwned")], r"contains a backslash or ':'"),
    ([("dir\\..\\..\\evil", b"pwned")], r"contains a backslash or ':'"),
    ([("file.txt:stream", b"x")], r"contains a backslash or ':'"),
    ([("a//b", b"x")], r"empty, '\.' or '\.\.' path component"),
    ([_symlink_member("link", b"/etc/passwd")], r"member 'link' is a symbolic link"),
    ([("same.txt", b"1"), ("same.txt", b"2")], r"duplicate member name 'same.txt'"),
    ([("Card.md", b"1"), ("card.md", b"2")], r"duplicate member name 'card.md' \(also given as 'Card.md'\)"),
    ([("a", b"1"), ("a/b", b"2")], r"member 'a' is used both as a file and as a folder"),
])
def test_malicious_members_are_refused_before_anything_is_written(tmp_path, members, message):
    archive = _zip(tmp_path / "evil.zip", members)
    dest = tmp_path / "out" / "dest"
    with pytest.raises(ArchiveError, match=message):
        safe_extract_zip(archive, dest)
    assert not dest.exists()
    assert not (tmp_path / "evil").exists() and not (tmp_path / "out" / "evil").exists()
    assert _leftovers(tmp_path, "evil.zip") == []
    with pytest.raises(ArchiveError, match=message):  # unpack_bundle goes through the same checks
        unpack_bundle(archive, dest)
    assert not dest.exists()
    assert not (tmp_path / "out").exists() or _leftovers(tmp_path / "out") == []


def test_member_count_and_total_size_limits(tmp_path):
    archive = _zip(tmp_path / "many.zip", [(f"f{i}", b"x") for i in range(5)])
    with pytest.raises(ArchiveError, match="has 5 members, more than the limit of 4"):
        safe_extract_zip(archive, tmp_path / "d", max_members=4)
    bomb = _zip(tmp_path / "bomb.zip", [("zeros.bin", bytes(1 << 20)), ("more.bin", bytes(1 << 20))])
    assert bomb.stat().st_size < 20_000  # highly compressible: a (small) zip bomb
    with pytest.raises(ArchiveError, match=r"member 'more.bin' brings the uncompressed size to 2097152 bytes, above "
                                           r"the limit of 1500000"):
        safe_extract_zip(bomb, tmp_path / "d", max_total_bytes=1_500_000)
    assert _leftovers(tmp_path, "many.zip", "bomb.zip") == []
    assert len(safe_extract_zip(bomb, tmp_path / "d", max_total_bytes=1 << 21)) == 2


def _patch_sizes(path, name, size):
    """Make the local header and central directory of member ``name`` claim ``size`` uncompressed bytes."""
    data = bytearray(path.read_bytes())
    encoded = name.encode()
    for signature, size_offset, name_offset in ((b"PK\x03\x04", 22, 30), (b"PK\x01\x02", 24, 46)):
        start = 0
        while (start := data.find(signature, start)) >= 0:
            if data[start + name_offset:start + name_offset + len(encoded)] == encoded:
                struct.pack_into("<I", data, start + size_offset, size)
            start += 4
    path.write_bytes(bytes(data))


def test_members_lying_about_their_size_are_refused(tmp_path):
    payload = bytes(range(256)) * 400
    small = _zip(tmp_path / "small.zip", [("good.txt", b"fine"), ("big.bin", payload)])
    _patch_sizes(small, "big.bin", 100)  # claims far less than it holds
    assert zipfile.ZipFile(small).getinfo("big.bin").file_size == 100
    with pytest.raises(ArchiveError, match="member 'big.bin'"):
        safe_extract_zip(small, tmp_path / "d", max_total_bytes=1000)
    large = _zip(tmp_path / "large.zip", [("good.txt", b"fine"), ("big.bin", payload)])
    _patch_sizes(large, "big.bin", len(payload) + 10)  # claims more than it holds
    with pytest.raises(ArchiveError, match=rf"member 'big.bin' holds {len(payload)} bytes, not the "
                                           rf"{len(payload) + 10} it declares"):
        safe_extract_zip(large, tmp_path / "d")
    # good.txt had been extracted into the temporary folder: nothing of it survives
    assert _leftovers(tmp_path, "small.zip", "large.zip") == []


def test_not_a_zip_truncated_zip_and_missing_archive(tmp_path):
    text = tmp_path / "model.zip"
    text.write_text("this is not an archive")
    with pytest.raises(ArchiveError, match="model.zip is not a zip archive"):
        safe_extract_zip(text, tmp_path / "d")
    good = _zip(tmp_path / "good.zip", [("a.bin", bytes(range(256)) * 100), ("b.txt", b"hello")])
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ArchiveError, match="truncated.zip is a truncated or damaged zip archive"):
        safe_extract_zip(truncated, tmp_path / "d")
    with pytest.raises(ArchiveError, match="does not exist"):
        safe_extract_zip(tmp_path / "nope.zip", tmp_path / "d")
    with pytest.raises(ArchiveError, match="not a zip archive"):
        unpack_bundle(text, tmp_path / "d")
    assert not (tmp_path / "d").exists()
    assert _leftovers(tmp_path, "model.zip", "good.zip", "truncated.zip") == []
    assert issubclass(ArchiveError, ScoreFusionError)


def test_safe_extract_writes_nested_files_atomically(tmp_path):
    archive = _zip(tmp_path / "ok.zip", [("top/", b""), ("top/a.txt", b"A"), ("top/sub/b.bin", bytes(10))])
    dest = tmp_path / "d"
    files = safe_extract_zip(archive, dest)
    assert files == [dest / "top" / "a.txt", dest / "top" / "sub" / "b.bin"]
    assert (dest / "top" / "a.txt").read_bytes() == b"A"
    assert (dest / "top" / "sub" / "b.bin").read_bytes() == bytes(10)
    with pytest.raises(ArchiveError, match="already exists"):
        safe_extract_zip(archive, dest)
    assert _leftovers(tmp_path, "ok.zip", "d") == []
