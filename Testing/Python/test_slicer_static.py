"""Static checks of the Slicer extension: what Slicer's build packages, the Extensions Index entry, imports.

These are the checks the Extensions Index CI and its reviewers apply (slicer.md sections 1.3 and 9, L5),
run here on every commit because the packaging itself can only be built with a Slicer build tree.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "ScoreFusionSlicer"
LIB = REPO / "ScoreFusionLib"

sys.path.insert(0, str(MODULE_DIR))

from ScoreFusionSlicerLib import deps  # noqa: E402

#: What Slicer's Python provides besides the standard library (bundled or the application itself).
SLICER_FILE_SCOPE = {"slicer", "vtk", "qt", "ctk", "numpy", "ScoreFusionSlicerLib"}
#: Keys the Index's catalog-entry schema (v1.0.x) allows, and those it requires.
INDEX_ALLOWED = {"$schema", "build_dependencies", "build_subdirectory", "category", "enabled", "scm_revision",
                 "scm_type", "scm_url", "tier", "dicom_support_rule"}
INDEX_REQUIRED = {"$schema", "category", "scm_url"}


def _python_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def _cmake_list(cmake: Path, variable: str) -> list[str]:
    block = re.search(rf"set\({variable}(.*?)\)", cmake.read_text(), re.S)
    assert block, f"{cmake} has no {variable} list"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def _file_scope_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    roots = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add((node.module or "").split(".")[0])
    return roots


def test_module_cmake_lists_every_module_file():
    """Unlisted files are not packaged: the module would work from source and break when installed."""
    listed = {name.replace("${MODULE_NAME}", "ScoreFusion") for name in
              _cmake_list(MODULE_DIR / "CMakeLists.txt", "MODULE_PYTHON_SCRIPTS")}
    on_disk = {p.relative_to(MODULE_DIR).as_posix() for p in _python_files(MODULE_DIR)}
    assert on_disk - listed == set(), "add these to ScoreFusionSlicer/CMakeLists.txt"
    assert listed - on_disk == set(), "listed but missing"


def test_only_the_module_file_sits_at_the_module_level():
    """Slicer loads every .py directly in a module folder as a module; helpers belong in the Lib package."""
    assert [p.name for p in MODULE_DIR.glob("*.py")] == ["ScoreFusion.py"]


def test_cmake_files_never_escape_their_folder():
    for cmake in (REPO / "CMakeLists.txt", MODULE_DIR / "CMakeLists.txt", LIB / "CMakeLists.txt"):
        assert "../" not in cmake.read_text(), f"{cmake}: a ../ path lands outside the install tree"


def test_top_level_cmake_adds_both_modules_and_installs_resources():
    text = (REPO / "CMakeLists.txt").read_text()
    assert "add_subdirectory(ScoreFusionLib)" in text
    assert "add_subdirectory(ScoreFusionSlicer)" in text
    assert re.search(r"install\(FILES Resources/", text)
    assert re.search(r"set\(EXTENSION_SCREENSHOTURLS \"[^\"]*\"\)", text), "the Index regex needs '\")'"


def _resource_globs() -> list[str]:
    text = (REPO / "CMakeLists.txt").read_text()
    block = re.search(r"file\(GLOB_RECURSE \S+ RELATIVE \S+(.*?)\)", text, re.S)
    assert block, "no Resources glob in the top-level CMakeLists.txt"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def _packaged(relative: str, globs: list[str]) -> bool:
    return any(fnmatch.fnmatch(f"Resources/{relative}", g) and g.count("/") == f"Resources/{relative}".count("/")
               for g in globs)


def test_every_resource_the_code_uses_is_packaged():
    """The .ui, registry, schemas, requirements and every embedded model and card are installed."""
    globs = _resource_globs()
    registry = json.loads((REPO / "Resources" / "models.json").read_text())
    needed = ["UI/ScoreFusion.ui", "Icons/ScoreFusion.png", "requirements.txt", "models.json",
              "schemas/models.schema.json", "schemas/bundle-manifest.schema.json"]
    for entry in registry["models"]:
        if entry.get("embedded"):
            needed.append(entry["url"])
        if entry.get("card"):
            needed.append(entry["card"])
    for relative in needed:
        assert (REPO / "Resources" / relative).is_file(), f"Resources/{relative} is missing"
        assert _packaged(relative, globs), f"Resources/{relative} is not matched by the install globs {globs}"


def test_extension_metadata_matches_the_index_entry():
    text = (REPO / "CMakeLists.txt").read_text()
    entry_path = REPO / "ScoreFusion.json"
    raw = entry_path.read_bytes()
    assert b"\r\n" not in raw, "the Index requires LF line endings"
    entry = json.loads(raw)
    assert INDEX_REQUIRED <= set(entry) <= INDEX_ALLOWED
    assert entry["category"] == "Image Synthesis"
    assert 1 <= entry.get("tier", 1) <= 5
    depends = re.search(r'set\(EXTENSION_DEPENDS "([^"]*)"\)', text).group(1).split()
    assert entry["build_dependencies"] == depends == ["PyTorch"]
    assert re.search(r"project\(([^)]*)\)", text).group(1).strip() == entry_path.stem
    assert not entry_path.stem.startswith("Slicer") and entry["scm_url"].rsplit("/", 1)[-1].startswith("Slicer")
    icon = re.search(r'set\(EXTENSION_ICONURL "([^"]+)"\)', text).group(1)
    assert icon.endswith(".png") and (REPO / icon.rsplit("/", 1)[-1]).is_file()
    for url in re.search(r'set\(EXTENSION_SCREENSHOTURLS "([^"]+)"\)', text).group(1).split():
        assert url.endswith((".png", ".jpg")), url
        assert (REPO / url.split("/main/", 1)[1]).is_file(), f"{url} has no file in the repository"


def test_catalog_icon_is_128_pixels_square():
    from PIL import Image

    with Image.open(REPO / "ScoreFusion.png") as icon:
        assert icon.size == (128, 128)


def test_module_files_import_only_what_slicer_provides_at_file_scope():
    """The Index's review asks this: torch & co. are imported inside functions, after the first Apply."""
    allowed = set(sys.stdlib_module_names) | SLICER_FILE_SCOPE | {"__future__"}
    for path in _python_files(MODULE_DIR):
        extra = _file_scope_imports(path) - allowed
        assert not extra, f"{path.relative_to(REPO)} imports {extra} at file scope"


def _side_effect_statements(tree: ast.Module) -> list[ast.stmt]:
    """Top-level statements other than imports, definitions, docstrings, constants and sys.path guards."""
    harmless = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign,
                ast.AnnAssign)
    out = []
    for node in tree.body:
        if isinstance(node, harmless):
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # docstring
        if isinstance(node, ast.If):
            continue  # `if __name__ == "__main__":` and the worker's script-mode path guard
        out.append(node)
    return out


#: Modules that convert third-party checkpoints: the only place torch.load may run (weights_only=True).
CONVERTERS = {"zoo.py"}


@pytest.mark.parametrize("folder", [MODULE_DIR, LIB], ids=["ScoreFusionSlicer", "ScoreFusionLib"])
def test_no_work_at_import_time_and_no_forbidden_calls(folder):
    for path in _python_files(folder):
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source, filename=str(path))
        if path.name != "__main__.py":  # `python -m ScoreFusionLib` is meant to run
            assert _side_effect_statements(tree) == [], f"{path.relative_to(REPO)} runs code at import time"
        for node in ast.walk(tree):
            assert not isinstance(node, ast.Match), f"{path.name}: `match` needs Python 3.10 (Slicer 5.8 has 3.9)"
            if isinstance(node, ast.Import):
                assert "imp" not in {a.name for a in node.names}, f"{path.name}: `imp` is gone in Python 3.12"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                name = node.func.attr
                target = ast.unparse(node.func.value)
                if name == "load" and target == "torch":  # unpickles: explicit converters only, weights only
                    weights_only = [k for k in node.keywords if k.arg == "weights_only"]
                    assert path.name in CONVERTERS and weights_only and ast.unparse(weights_only[0].value) == "True", \
                        f"{path.name}: torch.load unpickles"
                if name == "pip_install":
                    assert "torch" not in ast.unparse(node), f"{path.name}: torch only via the PyTorch extension"


@pytest.mark.parametrize("folder", [MODULE_DIR, LIB], ids=["ScoreFusionSlicer", "ScoreFusionLib"])
def test_code_parses_as_python_3_9(folder):
    """Slicer 5.8 ships Python 3.9: no newer syntax anywhere the extension installs."""
    for path in _python_files(folder):
        ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=(3, 9))


def test_requirements_are_minimums_that_never_touch_slicers_packages():
    requirements = deps.read_requirements(str(REPO / "Resources" / "requirements.txt"))
    assert requirements, "Resources/requirements.txt lists nothing"
    deps.check_plan(requirements)
    for req in requirements:
        assert ">=" in req, f"{req}: state a minimum version"


def test_repository_stays_far_below_the_index_clone_limit():
    """The Index refuses clones over 100 MB; weights and images beyond the small embedded models stay out."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout: nothing is tracked")
    names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    total = sum((REPO / n.decode()).stat().st_size for n in names if n and (REPO / n.decode()).is_file())
    assert total < 40e6, f"tracked files take {total / 1e6:.1f} MB"
    assert not [n for n in names if n.lower().endswith(b".safetensors")], "weights ship only inside bundle zips"
