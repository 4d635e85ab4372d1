"""What the Slicer module offers the user: tasks, contrasts, models per task, quality presets, model cards.

Kept free of Qt and Slicer so that every choice the GUI shows is unit-tested outside Slicer. Models are
the dictionaries of :func:`ScoreFusionLib.registry.listing.list_models`.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: Human names of the canonical contrasts (``ScoreFusionLib.data.records``).
CONTRAST_TITLES = {"t1n": "T1w", "t1c": "T1ce", "t2w": "T2w", "t2f": "FLAIR", "pdw": "PDw"}

SUPER_RESOLVE = "super_resolve"
SYNTHESIZE = "synthesize"
#: Job task -> the label of the module's task combo box, in display order.
TASK_TITLES = {SUPER_RESOLVE: "Super-resolve", SYNTHESIZE: "Synthesize contrast"}

OUT_OF_DISTRIBUTION_WARNING = (
    "Outside the data a model was trained on (other scanners, resolutions, anatomy or pathology) a "
    "generative model can produce plausible-looking but wrong structures. Outputs are AI-generated "
    "images for research, not for diagnosis."
)


def contrast_title(name: str) -> str:
    """``t2f`` -> ``FLAIR``; unknown names are shown as they are."""
    return CONTRAST_TITLES.get(name, name)


#: Registry task -> job task. ``both`` (super-resolution helped by other contrasts) has no job type yet.
JOB_TASK_OF_REGISTRY_TASK = {"sr": SUPER_RESOLVE, "mt": SYNTHESIZE}


def job_task(model: Mapping[str, Any]) -> str:
    """The worker's task for a model: registry task ``sr`` super-resolves, ``mt`` synthesises."""
    try:
        return JOB_TASK_OF_REGISTRY_TASK[model["task"]]
    except KeyError:
        raise ValueError(f"model {model['id']!r} has task {model['task']!r}, which the module cannot run") from None


def required_inputs(model: Mapping[str, Any]) -> list[str]:
    """The contrasts the user must provide, in the model's order (SR reads the low-resolution target)."""
    if job_task(model) == SUPER_RESOLVE:
        return [model["target"]]
    return list(model["inputs"])


def models_for_task(models: Sequence[Mapping[str, Any]], task: str, target: str | None = None) -> list[Mapping]:
    """The models that perform ``task`` (and produce ``target`` when given), in registry order."""
    if task not in TASK_TITLES:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASK_TITLES)}")
    return [m for m in models if JOB_TASK_OF_REGISTRY_TASK.get(m["task"]) == task
            and (target is None or m["target"] == target)]


def targets_for_task(models: Sequence[Mapping[str, Any]], task: str) -> list[str]:
    """The distinct target contrasts that some model of ``task`` produces, in first-seen order."""
    return list(dict.fromkeys(m["target"] for m in models_for_task(models, task)))


def model_label(model: Mapping[str, Any]) -> str:
    """The model combo box text: title, version and whether it still has to be downloaded."""
    state = "" if model.get("installed") or not model.get("remote") else " (download needed)"
    source = " [imported]" if model.get("source") == "imported" else ""
    return f"{model.get('title') or model['id']} v{model['version']}{source}{state}"


@dataclass(frozen=True)
class QualityPreset:
    """A sampler + step count the user picks by name; ``None`` fields take the model's registry default."""

    key: str
    label: str
    sampler: str | None
    steps: int | None
    time_grid: str | None


#: The presets offered, fastest first. DDPM throughout: DDIM is unusable with the small default models.
QUALITY_PRESETS = (
    QualityPreset("preview", "Fast preview", "ddpm", 10, "logsnr"),
    QualityPreset("default", "Default", None, None, None),
    QualityPreset("high", "High quality", "ddpm", 50, "logsnr"),
    QualityPreset("paper", "Paper protocol (GPU)", "ddpm", 1000, "default"),
)
DEFAULT_SAMPLING = {"sampler": "ddpm", "steps": 50, "time_grid": "default"}


def preset(key: str) -> QualityPreset:
    for p in QUALITY_PRESETS:
        if p.key == key:
            return p
    raise ValueError(f"unknown quality preset {key!r}; use one of {', '.join(p.key for p in QUALITY_PRESETS)}")


def preset_sampling(key: str, model_sampling: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``sampler``, ``steps`` and ``time_grid`` of preset ``key`` for a model with ``model_sampling`` defaults."""
    p = preset(key)
    base = {**DEFAULT_SAMPLING, **dict(model_sampling or {})}
    return {name: (getattr(p, name) if getattr(p, name) is not None else base[name])
            for name in ("sampler", "steps", "time_grid")}


def preset_label(key: str, model_sampling: Mapping[str, Any] | None = None) -> str:
    """``Default (DDPM, 20 steps)``: the preset's name with what it will actually run."""
    s = preset_sampling(key, model_sampling)
    return f"{preset(key).label} ({s['sampler'].upper()}, {s['steps']} steps)"


def output_name(input_name: str, model: Mapping[str, Any]) -> str:
    """The name of a new output node: ``<input> SR`` or ``<input> synth FLAIR``."""
    if job_task(model) == SUPER_RESOLVE:
        return f"{input_name} SR"
    return f"{input_name} synth {contrast_title(model['target'])}"


def _inline_markdown(text: str) -> str:
    out = html.escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", out)
    out = re.sub(r"`(.+?)`", r"<code>\1</code>", out)
    return re.sub(r"\[(.+?)\]\((https?://[^\s)]+)\)", r'<a href="\2">\1</a>', out)


def markdown_to_html(markdown: str) -> str:
    """Enough Markdown for model cards (headings, bullets, tables as text, bold, code, links), escaped."""
    parts: list[str] = []
    in_list = False
    for raw in markdown.splitlines():
        line = raw.rstrip()
        bullet = re.match(r"^\s*[-*]\s+(.*)$", line)
        if in_list and not bullet:
            parts.append("</ul>")
            in_list = False
        heading = re.match(r"^(#{1,6})\s+(.*)$", line)
        if heading:
            level = min(len(heading.group(1)) + 2, 6)  # the card sits inside the module panel
            parts.append(f"<h{level}>{_inline_markdown(heading.group(2))}</h{level}>")
        elif bullet:
            if not in_list:
                parts.append("<ul>")
                in_list = True
            parts.append(f"<li>{_inline_markdown(bullet.group(1))}</li>")
        elif line.strip():
            parts.append(f"<p>{_inline_markdown(line)}</p>")
    if in_list:
        parts.append("</ul>")
    return "\n".join(parts)


def model_card_html(model: Mapping[str, Any]) -> str:
    """The model card panel: a summary (task, contrasts, licence, state), the scope warning, then the card."""
    inputs = ", ".join(contrast_title(c) for c in required_inputs(model))
    if model.get("installed"):
        state = "installed"
    elif model.get("remote"):
        state = f"not downloaded ({model.get('size', 0) / 1e6:.1f} MB)"
    else:
        state = "embedded (installed on first use)"
    if model.get("source") == "imported":
        state += "; user-imported, not verified against the registry"
    rows = [
        ("Task", TASK_TITLES[job_task(model)]),
        ("Inputs", inputs),
        ("Output", contrast_title(model["target"])),
        ("Version", str(model["version"])),
        ("Licence", str(model.get("license") or "not stated")),
        ("Status", state),
    ]
    summary = "".join(f"<tr><td><b>{html.escape(k)}</b></td><td>{html.escape(v)}</td></tr>" for k, v in rows)
    parts = [f"<h3>{html.escape(str(model.get('title') or model['id']))}</h3>", f"<table>{summary}</table>"]
    if model.get("description"):
        parts.append(f"<p>{html.escape(str(model['description']))}</p>")
    parts.append(f"<p><i>{html.escape(OUT_OF_DISTRIBUTION_WARNING)}</i></p>")
    if model.get("card"):
        parts.append(markdown_to_html(str(model["card"])))
    return "\n".join(parts)
