"""The choices the Slicer module offers, computed outside Qt: tasks, models per task, presets, cards."""

from __future__ import annotations

import sys

import pytest

from ScoreFusionLib import module_choices as mc
from ScoreFusionLib.registry.catalog import RegistryError, load_registry, validate_registry_data

SR = {"id": "sr", "version": "1.0.0", "title": "SR", "task": "sr", "inputs": [], "target": "t1n",
      "sampling": {"sampler": "ddpm", "steps": 20, "time_grid": "logsnr"}, "installed": True, "remote": False}
FLAIR = {"id": "fl", "version": "2.0.0", "title": "T1->FLAIR", "task": "mt", "inputs": ["t1n"], "target": "t2f",
         "installed": False, "remote": True, "size": 5_000_000, "license": "MIT",
         "card": "# Card\n\n- **Data**: simulated\n- see [paper](https://arxiv.org/abs/2501.07430)\n\n<script>x</script>"}
DUAL = {"id": "dual", "version": "1.0.0", "title": "T1+T2->FLAIR", "task": "mt", "inputs": ["t1n", "t2w"],
        "target": "t2f", "installed": True, "remote": False, "source": "imported"}
T2 = {"id": "t2", "version": "1.0.0", "title": "T1->T2", "task": "mt", "inputs": ["t1n"], "target": "t2w"}
BOTH = {"id": "both", "version": "1.0.0", "title": "SR with T2", "task": "both", "inputs": ["t2w"], "target": "t1n"}
MODELS = [SR, FLAIR, DUAL, T2, BOTH]


def test_models_are_grouped_by_task_and_target():
    assert mc.models_for_task(MODELS, mc.SUPER_RESOLVE) == [SR]  # `both` has no job type: never offered
    assert mc.targets_for_task(MODELS, mc.SYNTHESIZE) == ["t2f", "t2w"]
    assert [m["id"] for m in mc.models_for_task(MODELS, mc.SYNTHESIZE, "t2f")] == ["fl", "dual"]
    with pytest.raises(ValueError, match="unknown task"):
        mc.models_for_task(MODELS, "segment")
    with pytest.raises(ValueError, match="cannot run"):
        mc.job_task(BOTH)


def test_required_inputs_follow_the_model():
    assert mc.required_inputs(SR) == ["t1n"]  # SR reads the low-resolution target itself
    assert mc.required_inputs(DUAL) == ["t1n", "t2w"]
    assert [mc.contrast_title(c) for c in mc.required_inputs(DUAL)] == ["T1w", "T2w"]


def test_presets_take_the_models_defaults_unless_they_fix_them():
    assert mc.preset_sampling("default", SR["sampling"]) == {"sampler": "ddpm", "steps": 20, "time_grid": "logsnr"}
    assert mc.preset_sampling("default", None) == mc.DEFAULT_SAMPLING
    assert mc.preset_sampling("preview", SR["sampling"])["steps"] == 10
    assert mc.preset_sampling("paper", SR["sampling"]) == {"sampler": "ddpm", "steps": 1000, "time_grid": "default"}
    assert mc.preset_label("default", SR["sampling"]) == "Default (DDPM, 20 steps)"
    with pytest.raises(ValueError, match="unknown quality preset"):
        mc.preset_sampling("ultra", None)


def test_labels_and_output_names():
    assert mc.model_label(FLAIR) == "T1->FLAIR v2.0.0 (download needed)"
    assert mc.model_label(DUAL) == "T1+T2->FLAIR v1.0.0 [imported]"
    assert mc.output_name("case1", SR) == "case1 SR"
    assert mc.output_name("case1", FLAIR) == "case1 synth FLAIR"


def test_model_card_is_escaped_html_with_summary_and_warning():
    card = mc.model_card_html(FLAIR)
    assert "<h3>T1-&gt;FLAIR</h3>" in card
    assert "not downloaded (5.0 MB)" in card
    assert "<li><b>Data</b>: simulated</li>" in card
    assert '<a href="https://arxiv.org/abs/2501.07430">paper</a>' in card
    assert "<script>" not in card and "&lt;script&gt;" in card
    assert "not for diagnosis" in card
    assert "not verified" in mc.model_card_html(DUAL)


def test_registry_lists_without_jsonschema(monkeypatch):
    """Slicer's own Python has no jsonschema before the first Apply: models are still listed, bad files refused."""
    monkeypatch.setitem(sys.modules, "jsonschema", None)  # `import jsonschema` now raises ImportError
    registry = load_registry()
    assert "t1-sr4-iso" in registry.ids
    with pytest.raises(RegistryError, match=r"missing models\[0\]\.sha256"):
        validate_registry_data({"format": "scorefusion-registry", "format_version": 1,
                                "models": [{k: v for k, v in registry.entries[0].to_dict().items() if k != "sha256"}]})
    with pytest.raises(RegistryError, match="needs a 'models' list"):
        validate_registry_data({"format": "scorefusion-registry"})
