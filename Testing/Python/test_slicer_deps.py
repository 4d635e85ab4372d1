"""The module's dependency plan: minimums only, torch never from pip, Slicer's own packages never replaced."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "ScoreFusionSlicer"))

from ScoreFusionSlicerLib import deps  # noqa: E402


def versions(**installed):
    def version_of(name):
        key = name.lower().replace("-", "_")
        if key not in installed:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed[key]

    return version_of


def test_missing_requirements_compare_installed_versions():
    reqs = ["safetensors>=0.4", "jsonschema>=4.20", "tqdm>=4.66"]
    have = versions(safetensors="0.4.5", jsonschema="4.19.0")
    assert deps.missing_requirements(reqs, have) == ["jsonschema>=4.20", "tqdm>=4.66"]
    assert deps.missing_requirements(reqs, versions(safetensors="1.0", jsonschema="4.23", tqdm="4.67")) == []


@pytest.mark.parametrize("req", ["numpy>=2", "SimpleITK>=2.3", "requests", "torch>=2.8", "simpleitk>=1"])
def test_plans_touching_slicers_packages_or_torch_are_refused(req):
    with pytest.raises(deps.DependencyError, match="would replace"):
        deps.missing_requirements([req], versions())


def test_pins_are_refused():
    with pytest.raises(deps.DependencyError, match="pins a version"):
        deps.check_plan(["safetensors==0.4.5"])


def test_torch_minimum_is_read_from_metadata_without_importing_torch():
    assert deps.torch_satisfied(versions(torch="2.13.0+cpu"))
    assert not deps.torch_satisfied(versions(torch="2.1.2"))
    assert not deps.torch_satisfied(versions())


def test_read_requirements_skips_comments(tmp_path):
    path = tmp_path / "requirements.txt"
    path.write_text("# comment\n\nsafetensors>=0.4  # why\n  tqdm>=4.66\n")
    assert deps.read_requirements(str(path)) == ["safetensors>=0.4", "tqdm>=4.66"]
