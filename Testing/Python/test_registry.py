"""Registry validation, the model cache, imports, model resolution and the ``scorefusion models`` command.

Every test works on its own temporary registry and ``SCOREFUSION_HOME``; the shipped registry's
entries (whose archives are packed later) are only checked to be well formed. No network access:
the only models installed here are embedded ones, copied from the temporary registry's folder.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from bundle_fixtures import make_random_bundle
from ScoreFusionLib.bundle import BundleError, sha256_file
from ScoreFusionLib.cli.main import main
from ScoreFusionLib.errors import ScoreFusionError
from ScoreFusionLib.registry.cache import cache_root, installed_models, installed_path, remove_model
from ScoreFusionLib.registry.catalog import (
    PLACEHOLDER_SHA256,
    RegistryError,
    load_registry,
    parse_registry,
    version_key,
)
from ScoreFusionLib.registry.install import import_bundle, install_model, resolve_model

# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    from ScoreFusionLib.data.task import TaskSpec
    from ScoreFusionLib.degradation import AveragePool

    spec = TaskSpec(kind="sr", inputs=[], target="t1n", degradation=AveragePool(2))
    return make_random_bundle(tmp_path_factory.mktemp("bundle") / "b", spec, planes=("axial",))


@pytest.fixture(scope="module")
def bundle_zip(bundle_dir, tmp_path_factory) -> Path:
    """The bundle as a release archive whose manifest says it is ``packed-sr`` 2.0.0."""
    from ScoreFusionLib.bundle_archive import pack_bundle

    out = tmp_path_factory.mktemp("zip") / "packed.zip"
    pack_bundle(bundle_dir, out, model={"id": "packed-sr", "version": "2.0.0", "title": "Packed"})
    return out


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    """A private cache for every test (autouse: set before any other fixture), never the real home."""
    monkeypatch.setenv("SCOREFUSION_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SCOREFUSION_REGISTRY", raising=False)
    return tmp_path / "home"


@pytest.fixture
def no_network(monkeypatch):
    """Any HTTP request fails the test: embedded models must install from local files only."""
    import requests

    def refuse(*args, **kwargs):
        raise AssertionError("a network request was made")

    monkeypatch.setattr(requests.Session, "request", refuse)


def entry(model_id: str = "demo-sr", **fields) -> dict:
    base = {"id": model_id, "title": "Demo", "task": "sr", "inputs": [], "target": "t1n", "version": "1.0.0",
            "url": f"models/{model_id}.zip", "sha256": "a" * 64, "size": 10, "license": "MIT",
            "description": "a test model", "embedded": True}
    return {**base, **fields}


def registry_data(*entries: dict) -> dict:
    return {"format": "scorefusion-registry", "format_version": 1, "models": list(entries)}


@pytest.fixture
def embedded_registry(tmp_path, bundle_zip, monkeypatch) -> Path:
    """A registry folder with one embedded model (the packed bundle), one remote and one placeholder."""
    folder = tmp_path / "res"
    (folder / "models").mkdir(parents=True)
    shutil.copyfile(bundle_zip, folder / "models" / "demo-sr.zip")
    data = registry_data(
        entry("demo-sr", sha256=sha256_file(bundle_zip), size=bundle_zip.stat().st_size),
        entry("remote-sr", url="https://models.invalid/remote-sr.zip", embedded=False, task="mt",
              inputs=["t1n", "t2w"], target="t2f"),
        entry("unpacked-sr", sha256=PLACEHOLDER_SHA256, size=0),
    )
    path = folder / "models.json"
    path.write_text(json.dumps(data, indent=2))
    monkeypatch.setenv("SCOREFUSION_REGISTRY", str(path))
    return path


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


# ---------------------------------------------------------------------------------------------
# catalog


def test_shipped_registry_is_valid(monkeypatch):
    monkeypatch.delenv("SCOREFUSION_REGISTRY", raising=False)
    registry = load_registry()  # schema-checked; the entries' archives themselves are packed separately
    assert len(set(registry.ids)) == len(registry.ids) > 0


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["models"][0].update(id="Bad_Id"), r"models\[0\]\.id: 'Bad_Id' does not match"),
        (lambda d: d["models"][0].pop("sha256"), r"models\[0\]: 'sha256' is a required property"),
        (lambda d: d["models"][0].update(sha256="ABC"), r"models\[0\]\.sha256"),
        (lambda d: d["models"][0].update(url="ftp://host/x.zip"), r"models\[0\]\.url"),
        (lambda d: d["models"][0].update(url="../outside.zip"), r"models\[0\]\.url"),
        (lambda d: d["models"][0].update(url="/abs/x.zip"), r"models\[0\]\.url"),
        (lambda d: d["models"][0].update(version="1.0"), r"models\[0\]\.version"),
        (lambda d: d["models"][0].update(task="seg"), r"models\[0\]\.task"),
        (lambda d: d["models"][0].update(inputs=["t9"]), r"models\[0\]\.inputs\[0\]"),
        (lambda d: d["models"][0].update(size=-1), r"models\[0\]\.size"),
        (lambda d: d["models"][0].update(sha265="typo"), r"Additional properties are not allowed \('sha265'"),
        (lambda d: d.update(format_version=2), r"format_version: 1 was expected"),
        (lambda d: d["models"].append(copy.deepcopy(d["models"][0])), r"models\[1\] \(demo-sr\): the id is used"),
        (lambda d: d["models"][0].update(task="mt", inputs=[]), r"an mt model needs inputs"),
        (lambda d: d["models"][0].update(url="https://host/x.zip"), r"embedded model's url must be a path"),
    ],
)
def test_registry_errors_name_the_field(mutate, message):
    data = registry_data(entry())
    parse_registry(data)  # the unmutated entry is valid
    mutate(data)
    with pytest.raises(RegistryError, match=message):
        parse_registry(data, source="test.json")


def test_unknown_id_lists_the_known_ones(embedded_registry):
    with pytest.raises(RegistryError, match="unknown model 'nope'.*known models: demo-sr, remote-sr, unpacked-sr"):
        load_registry().get("nope")


def test_unreadable_registry_files_are_clear_errors(tmp_path):
    with pytest.raises(RegistryError, match="does not exist"):
        load_registry(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(RegistryError, match="not valid JSON"):
        load_registry(tmp_path / "bad.json")


def test_registry_env_and_relative_urls(embedded_registry):
    registry = load_registry()
    assert registry.path == embedded_registry
    demo = registry.get("demo-sr")
    assert Path(demo.location()) == embedded_registry.parent / "models" / "demo-sr.zip"
    assert demo.source == "embedded" and registry.get("remote-sr").source == "remote"
    assert registry.get("remote-sr").io_summary() == "t1n+t2w -> t2f" and demo.io_summary() == "t1n -> t1n"


def test_versions_sort_by_semver_precedence():
    versions = ["local", "1.2.0-rc.1", "1.10.0", "1.2.0", "1.2.0-rc.2", "0.9.9"]
    assert sorted(versions, key=version_key, reverse=True) == [
        "1.10.0", "1.2.0", "1.2.0-rc.2", "1.2.0-rc.1", "0.9.9", "local"
    ]


# ---------------------------------------------------------------------------------------------
# cache, install, import, resolve


def test_cache_root_follows_scorefusion_home(home, monkeypatch):
    assert cache_root() == home
    monkeypatch.delenv("SCOREFUSION_HOME")
    monkeypatch.setenv("HOME", str(home.parent / "user"))
    assert cache_root() == home.parent / "user" / ".scorefusion"


def test_embedded_model_installs_on_first_use_without_network(embedded_registry, home, no_network):
    path = resolve_model("demo-sr")
    assert path == home / "models" / "demo-sr" / "1.0.0"
    assert (path / "manifest.json").is_file()
    assert resolve_model("demo-sr") == path == resolve_model("demo-sr@1.0.0")
    assert [(m.id, m.version) for m in installed_models()] == [("demo-sr", "1.0.0")]
    assert sorted(p.name for p in home.iterdir()) == ["models"]  # no downloads or staging left


def test_embedded_archive_with_wrong_checksum_installs_nothing(embedded_registry, home):
    data = json.loads(embedded_registry.read_text())
    data["models"][0]["sha256"] = "b" * 64
    embedded_registry.write_text(json.dumps(data))
    with pytest.raises(ScoreFusionError, match=f"expected sha256 {'b' * 64}"):
        install_model("demo-sr", progress=False)
    assert files_under(home) == []


def test_remote_and_unpacked_models_are_not_installed_implicitly(embedded_registry, home, no_network):
    with pytest.raises(RegistryError, match="scorefusion models download remote-sr"):
        resolve_model("remote-sr")
    with pytest.raises(RegistryError, match="'unpacked-sr' has no packed archive yet"):
        resolve_model("unpacked-sr")
    with pytest.raises(RegistryError, match="not a bundle folder, a bundle .zip or a known model id.*demo-sr"):
        resolve_model("nope")
    with pytest.raises(BundleError, match="does not exist"):
        resolve_model("no/such/bundle")
    assert files_under(home) == []


def test_resolve_folder_and_zip(bundle_dir, bundle_zip, home, tmp_path):
    assert resolve_model(bundle_dir) == bundle_dir
    unpacked = resolve_model(bundle_zip)
    assert unpacked == home / "archives" / sha256_file(bundle_zip)
    stamp = (unpacked / "manifest.json").stat().st_mtime_ns
    assert resolve_model(str(bundle_zip)) == unpacked
    assert (unpacked / "manifest.json").stat().st_mtime_ns == stamp  # reused, not unpacked again
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(BundleError, match="neither a bundle folder nor a bundle .zip"):
        resolve_model(tmp_path / "notes.txt")


def test_import_folder_and_zip(bundle_dir, bundle_zip, home):
    path = import_bundle(bundle_dir, model_id="my-sr")
    assert path == home / "models" / "my-sr" / "local"
    assert sorted(p.name for p in path.iterdir()) == sorted(p.name for p in bundle_dir.iterdir())
    assert import_bundle(bundle_zip) == home / "models" / "packed-sr" / "2.0.0"  # id from the model block
    with pytest.raises(BundleError, match="already installed.*--force"):
        import_bundle(bundle_dir, model_id="my-sr")
    assert import_bundle(bundle_dir, model_id="my-sr", force=True) == path
    with pytest.raises(BundleError, match="give one with --id"):
        import_bundle(bundle_dir)
    with pytest.raises(RegistryError, match="invalid model id"):
        import_bundle(bundle_dir, model_id="../escape")
    with pytest.raises(RegistryError, match="invalid model version"):
        import_bundle(bundle_dir, model_id="ok", version="../x")
    assert installed_path("my-sr") == path and resolve_model("my-sr@local") == path
    assert not any(p.name.startswith(".") for p in (home / "models").rglob("*"))


def test_import_refuses_invalid_bundles_and_links(bundle_dir, home, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(bundle_dir, broken)
    weights = broken / "plane-axial.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"tampered")
    with pytest.raises(BundleError):
        import_bundle(broken, model_id="broken")
    linked = tmp_path / "linked"
    shutil.copytree(bundle_dir, linked)
    os.symlink(tmp_path / "outside.txt", linked / "notes.txt")
    with pytest.raises(BundleError, match="symbolic link"):
        import_bundle(linked, model_id="linked")
    assert files_under(home) == [] and installed_models() == []


def test_remove_refuses_unknown_ids_and_versions(bundle_dir, home):
    import_bundle(bundle_dir, model_id="my-sr", version="1.0.0")
    import_bundle(bundle_dir, model_id="my-sr", version="1.1.0")
    assert installed_path("my-sr") == home / "models" / "my-sr" / "1.1.0"  # newest first
    with pytest.raises(RegistryError, match=r"'other' is not installed \(installed models: my-sr\)"):
        remove_model("other")
    with pytest.raises(RegistryError, match=r"version '9.9.9' of 'my-sr' is not installed .*1.1.0, 1.0.0"):
        remove_model("my-sr", "9.9.9")
    assert remove_model("my-sr", "1.1.0") == [home / "models" / "my-sr" / "1.1.0"]
    assert installed_path("my-sr") == home / "models" / "my-sr" / "1.0.0"
    remove_model("my-sr")
    assert installed_models() == [] and files_under(home) == []


# ---------------------------------------------------------------------------------------------
# the command line


def test_cli_list_download_path_remove(embedded_registry, home, capsys, no_network):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["ID", "TASK", "INPUTS", "->", "TARGET", "VERSION", "SIZE", "INSTALLED", "SOURCE"]
    rows = {line.split()[0]: line for line in out[1:]}
    assert set(rows) == {"demo-sr", "remote-sr", "unpacked-sr"}
    assert rows["remote-sr"].split()[-2:] == ["no", "remote"] and "t1n+t2w -> t2f" in rows["remote-sr"]

    assert main(["models", "download", "demo-sr", "--quiet"]) == 0
    assert "installed demo-sr 1.0.0 at" in capsys.readouterr().out
    assert main(["models", "download", "demo-sr", "--quiet"]) == 0
    assert "already installed" in capsys.readouterr().out

    assert main(["models", "list", "--installed", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(r["id"], r["installed"], r["source"]) for r in listed] == [("demo-sr", True, "embedded")]
    assert listed[0]["path"] == str(home / "models" / "demo-sr" / "1.0.0")

    assert main(["models", "path"]) == 0
    assert capsys.readouterr().out.strip() == str(home)
    assert main(["models", "path", "demo-sr"]) == 0
    assert capsys.readouterr().out.strip() == str(home / "models" / "demo-sr" / "1.0.0")
    assert main(["models", "path", "remote-sr"]) == 2
    assert "not installed; install it with: scorefusion models download remote-sr" in capsys.readouterr().err

    assert main(["models", "download", "nope"]) == 2
    assert "known models: demo-sr, remote-sr, unpacked-sr" in capsys.readouterr().err
    assert main(["models", "remove", "remote-sr"]) == 2
    assert "'remote-sr' is not installed (installed models: demo-sr)" in capsys.readouterr().err
    assert main(["models", "remove", "demo-sr"]) == 0
    assert "removed demo-sr 1.0.0" in capsys.readouterr().out
    assert installed_models() == []


def test_cli_import_lists_imported_models(bundle_dir, bundle_zip, embedded_registry, home, capsys):
    assert main(["models", "import", str(bundle_zip)]) == 0
    assert "as packed-sr 2.0.0" in capsys.readouterr().out
    assert main(["models", "import", str(bundle_dir)]) == 2
    assert "give one with --id" in capsys.readouterr().err
    assert main(["models", "import", str(bundle_dir), "--id", "mine", "--version", "0.1.0"]) == 0
    capsys.readouterr()
    assert main(["models", "list", "--installed"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert set(rows) == {"packed-sr", "mine"}
    assert rows["mine"][-2:] == ["yes", "imported"] and rows["mine"][1:5] == ["sr", "t1n", "->", "t1n"]


def test_cli_pack_creates_and_updates_registry_entries(bundle_dir, tmp_path, home, capsys, no_network):
    folder = tmp_path / "res"
    registry = folder / "models.json"
    other = entry("other-sr", sha256=PLACEHOLDER_SHA256, size=0)
    folder.mkdir()
    registry.write_text(json.dumps(registry_data(other), indent=2))
    card = folder / "models" / "new-sr.md"
    card.parent.mkdir()
    card.write_text("# New SR\n")
    out = folder / "models" / "new-sr.zip"
    argv = ["models", "pack", str(bundle_dir), "--out", str(out), "--id", "new-sr", "--version", "1.2.0",
            "--title", "New SR", "--card", str(card), "--registry", str(registry)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    sha = hashlib.sha256(out.read_bytes()).hexdigest()
    assert sha in printed
    data = json.loads(registry.read_text())
    assert data["models"][0] == other  # other entries are kept as they were
    new = data["models"][1]
    assert new["id"] == "new-sr" and new["url"] == "models/new-sr.zip" and new["embedded"] is True
    assert (new["sha256"], new["size"], new["version"]) == (sha, out.stat().st_size, "1.2.0")
    assert (new["task"], new["inputs"], new["target"], new["card"]) == ("sr", [], "t1n", "models/new-sr.md")

    # the packed entry installs, and knows what it is
    assert main(["models", "download", "new-sr", "--registry", str(registry), "--quiet"]) == 0
    installed = home / "models" / "new-sr" / "1.2.0"
    manifest = json.loads((installed / "manifest.json").read_text())
    assert manifest["model"]["id"] == "new-sr" and manifest["model"]["version"] == "1.2.0"
    capsys.readouterr()

    # packing again updates the same entry in place
    assert main(argv[:-4] + ["--registry", str(registry)] + ["--version", "1.3.0"]) == 0
    data = json.loads(registry.read_text())
    assert [m["id"] for m in data["models"]] == ["other-sr", "new-sr"]
    assert data["models"][1]["version"] == "1.3.0"
    assert data["models"][1]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()


def test_cli_pack_refuses_a_new_remote_entry_without_url(bundle_dir, tmp_path, home, capsys):
    registry = tmp_path / "res" / "models.json"
    out = tmp_path / "elsewhere" / "x.zip"
    argv = ["models", "pack", str(bundle_dir), "--out", str(out), "--id", "x-sr", "--registry", str(registry)]
    assert main(argv) == 2
    assert "give --url" in capsys.readouterr().err
    assert not out.exists() and not registry.exists()  # checked before any archive is written
    assert main([*argv, "--url", "https://example.invalid/x.zip", "--version", "1.0.0"]) == 0
    data = json.loads(registry.read_text())
    assert data["models"][0]["url"] == "https://example.invalid/x.zip"
    assert data["models"][0]["embedded"] is False


def test_cli_help_has_examples(capsys):
    with pytest.raises(SystemExit) as info:
        main(["models", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "scorefusion models download t1-to-flair" in text and "SCOREFUSION_HOME" in text
    for action in ("list", "download", "import", "remove", "path", "pack"):
        with pytest.raises(SystemExit):
            main(["models", action, "--help"])
        assert "example" in capsys.readouterr().out
