"""Static packaging checks: what Slicer's build would install, and what the wheel declares."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[2]
LIB = REPO / "ScoreFusionLib"


def _listed_scripts(cmake: Path) -> set[str]:
    text = cmake.read_text()
    block = re.search(r"set\(MODULE_PYTHON_SCRIPTS(.*?)\)", text, re.S)
    assert block, f"{cmake} has no MODULE_PYTHON_SCRIPTS list"
    return {line.strip() for line in block.group(1).splitlines() if line.strip()}


def test_cmake_lists_every_library_file():
    """Slicer's macro installs only listed files: an unlisted module works from source only."""
    on_disk = {p.relative_to(LIB).as_posix() for p in LIB.rglob("*.py") if "__pycache__" not in p.parts}
    listed = _listed_scripts(LIB / "CMakeLists.txt")
    assert on_disk - listed == set(), "add these to ScoreFusionLib/CMakeLists.txt"
    assert listed - on_disk == set(), "these are listed but do not exist"
    assert not any(".." in name for name in listed)


def test_top_level_cmake_metadata():
    text = (REPO / "CMakeLists.txt").read_text()
    first_project = re.search(r"project\(([^)]*)\)", text)
    assert first_project and first_project.group(1).strip() == "ScoreFusion"
    keys = ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS")
    for key in keys:
        assert re.search(rf"set\(EXTENSION_{key} ", text), f"EXTENSION_{key} missing"
    assert re.search(r'set\(EXTENSION_SCREENSHOTURLS "[^"]+\.png"\)', text)


# Network definitions subclass torch.nn.Module and so import torch at file scope; they are only
# imported by code that already needs torch. Everything else imports torch inside functions.
TORCH_MODULE_DIRS = {"nets"}
TORCH_FREE_NAMES = {"__init__.py", "configs.py"}


def _torch_allowed(path: Path) -> bool:
    rel = path.relative_to(LIB)
    return rel.parts[0] in TORCH_MODULE_DIRS and path.name not in TORCH_FREE_NAMES


def test_library_has_no_file_scope_heavy_or_gui_imports():
    """torch is imported lazily; slicer/qt/vtk never appear in the library."""
    forbidden = {"slicer", "qt", "ctk", "vtk", "PythonQt"}
    for path in LIB.rglob("*.py"):
        heavy = {"monai", "safetensors"} | (set() if _torch_allowed(path) else {"torch"})
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                roots = {n.split(".")[0] for n in names}
                assert not roots & forbidden, f"{path.name} imports {roots & forbidden}"
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                roots = {n.split(".")[0] for n in names}
                assert not roots & heavy, f"{path.name} imports {roots & heavy} at file scope"


def test_pyproject_declares_the_console_script_and_package():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["project"]["name"] == "scorefusion"
    assert meta["project"]["scripts"]["scorefusion"] == "ScoreFusionLib.cli.main:main"


def test_repository_tracks_no_pickles_or_patient_images():
    """Pickled weights are never shipped, and no image data is committed (data licences)."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout (e.g. an installed copy): nothing is tracked")
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    forbidden = (".pt", ".pth", ".ckpt", ".pkl", ".nii", ".nii.gz", ".nrrd", ".mha", ".dcm")
    assert [name for name in tracked if name.lower().endswith(forbidden)] == []
