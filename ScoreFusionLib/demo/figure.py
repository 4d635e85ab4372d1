"""``comparison.png``: input, every method and the ground truth in three planes, with error maps.

Slices go through the centre of the volume and are shown in radiological convention (patient
right on the left of the picture, anterior / superior up). Every image of a task shares the
ground truth's intensity window, and every error map ``|result - truth|`` shares one window of a
quarter of that range, so brightness can be compared across columns.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PLANES = ("axial", "coronal", "sagittal")
ZOOM = 2
GAP = 4
LABEL_HEIGHT = 16
TITLE_HEIGHT = 24
ERROR_WINDOW = 0.25


@dataclass
class Panel:
    """One column: a label, a (k, j, i) array on the truth's grid, and whether to show its error map."""

    label: str
    array: np.ndarray
    show_error: bool = True


@dataclass
class FigureTask:
    """One block of rows: a title, the columns and the ground truth (k, j, i) they are compared with."""

    title: str
    panels: Sequence[Panel]
    truth: np.ndarray


def _central_slice(array: np.ndarray, plane: str) -> np.ndarray:
    """A display-ready 2D slice (rows top to bottom) of a RAS-ordered (k, j, i) array."""
    k, j, i = (n // 2 for n in array.shape)
    if plane == "axial":
        view = array[k]  # (j, i): anterior up
    elif plane == "coronal":
        view = array[:, j, :]  # (k, i): superior up
    else:
        view = array[:, :, i]  # (k, j): superior up, anterior right
        return np.flipud(view)
    return np.fliplr(np.flipud(view))  # radiological: patient right on the left


def _grey(view: np.ndarray, low: float, high: float) -> np.ndarray:
    scaled = np.clip((view - low) / max(high - low, 1e-12), 0.0, 1.0)
    return np.repeat((scaled * 255).astype(np.uint8)[..., None], 3, axis=2)


def _heat(view: np.ndarray, high: float) -> np.ndarray:
    """Black -> red -> yellow -> white, so small errors stay dark."""
    x = np.clip(view / max(high, 1e-12), 0.0, 1.0)
    rgb = np.stack([np.clip(3 * x, 0, 1), np.clip(3 * x - 1, 0, 1), np.clip(3 * x - 2, 0, 1)], axis=-1)
    return (rgb * 255).astype(np.uint8)


def _tile(rgb: np.ndarray) -> np.ndarray:
    return np.repeat(np.repeat(rgb, ZOOM, axis=0), ZOOM, axis=1)


def _task_block(task: FigureTask) -> tuple[list[list[np.ndarray | None]], list[str]]:
    """Rows of RGB tiles (None = empty cell): per plane an image row, then an error row."""
    low, high = float(np.percentile(task.truth, 0.5)), float(np.percentile(task.truth, 99.5))
    err_high = ERROR_WINDOW * (high - low)
    rows, row_labels = [], []
    for plane in PLANES:
        images = [_tile(_grey(_central_slice(p.array, plane), low, high)) for p in task.panels]
        images.append(_tile(_grey(_central_slice(task.truth, plane), low, high)))
        rows.append(images)
        row_labels.append(plane)
        errors: list[np.ndarray | None] = [
            _tile(_heat(np.abs(_central_slice(p.array, plane) - _central_slice(task.truth, plane)), err_high))
            if p.show_error else None
            for p in task.panels
        ]
        rows.append([*errors, None])
        row_labels.append(f"{plane} |error|")
    return rows, row_labels


def save_comparison(tasks: Sequence[FigureTask], path: str | os.PathLike) -> tuple[int, int]:
    """Draw every task as a block of rows into one PNG (written atomically); returns (width, height)."""
    from PIL import Image, ImageDraw

    from ..atomic import atomic_path

    blocks = [(task, *_task_block(task)) for task in tasks]
    side_label = 110
    width = side_label + max(
        sum(max(r[c].shape[1] for r in rows if r[c] is not None) + GAP for c in range(len(rows[0])))
        for _, rows, _ in blocks
    )
    height = sum(TITLE_HEIGHT + LABEL_HEIGHT + sum(max(t.shape[0] for t in r if t is not None) + GAP for r in rows)
                 for _, rows, _ in blocks)
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    y = 0
    for task, rows, row_labels in blocks:
        draw.text((4, y + 5), task.title, fill=(255, 255, 255))
        y += TITLE_HEIGHT
        widths = [max(r[c].shape[1] for r in rows if r[c] is not None) for c in range(len(rows[0]))]
        x = side_label
        for label, w in zip([p.label for p in task.panels] + ["ground truth"], widths):
            draw.text((x + 2, y + 2), label, fill=(255, 255, 0))
            x += w + GAP
        y += LABEL_HEIGHT
        for row, row_label in zip(rows, row_labels):
            h = max(t.shape[0] for t in row if t is not None)
            draw.text((4, y + h // 2 - 6), row_label, fill=(200, 200, 200))
            x = side_label
            for tile, w in zip(row, widths):
                if tile is not None:
                    canvas.paste(Image.fromarray(tile), (x, y))
                x += w + GAP
            y += h + GAP
    with atomic_path(path, suffix=".png") as tmp:
        canvas.save(tmp, format="PNG")
    return width, height
