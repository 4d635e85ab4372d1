"""Draw the ScoreFusion icon: three perpendicular slice planes in Slicer's colours, a brain on the axial one.

The planes say what the method does (2D models along the three anatomical planes, fused in 3D); the
colours are Slicer's red (axial), yellow (sagittal) and green (coronal) slice views. Drawn at 4x and
downsampled, so edges stay smooth at 128 px. Run from anywhere; it writes
``Resources/Icons/ScoreFusion.png`` and the Extensions Index copy ``ScoreFusion.png`` at the repo root:

    python Resources/Icons/make_icon.py
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 128
SUPER = 4  # supersampling factor
REPO = Path(__file__).resolve().parents[2]
OUTPUTS = (REPO / "Resources" / "Icons" / "ScoreFusion.png", REPO / "ScoreFusion.png")

RED, YELLOW, GREEN = (243, 74, 51), (237, 213, 76), (110, 176, 75)
AZIMUTH, ELEVATION = math.radians(-35), math.radians(40)
HEIGHT = 0.8  # half-height of the vertical planes, relative to their half-width


def rotation() -> np.ndarray:
    """World (x right, y anterior, z up) -> camera (u right, v up, w towards the viewer)."""
    ca, sa = math.cos(AZIMUTH), math.sin(AZIMUTH)
    ce, se = math.cos(ELEVATION), math.sin(ELEVATION)
    spin = np.array([[ca, -sa, 0], [sa, ca, 0], [0, 0, 1]])  # about the vertical axis
    tilt = np.array([[1, 0, 0], [0, se, ce], [0, -ce, se]])  # look down on the axial plane
    return tilt @ spin


R = rotation()
SCALE = 40 * SUPER
CENTRE = np.array([SIZE / 2, SIZE / 2]) * SUPER


def project(points: np.ndarray) -> list[tuple[float, float]]:
    cam = np.asarray(points, dtype=float) @ R.T
    return [(CENTRE[0] + SCALE * u, CENTRE[1] - SCALE * v) for u, v, _ in cam]


def depth(points: np.ndarray) -> float:
    return float((np.asarray(points, dtype=float) @ R.T)[:, 2].mean())


def quadrant(axis: int, a: tuple[float, float], b: tuple[float, float]) -> np.ndarray:
    """The rectangle a..b (in the plane's two free coordinates) of the plane where ``axis`` is 0."""
    free = [i for i in range(3) if i != axis]
    corners = []
    for s, t in ((a[0], a[1]), (b[0], a[1]), (b[0], b[1]), (a[0], b[1])):
        p = [0.0, 0.0, 0.0]
        p[free[0]], p[free[1]] = s, t
        corners.append(p)
    return np.array(corners)


def plane_pieces(axis: int, colour: tuple[int, int, int]) -> list[tuple[np.ndarray, tuple[int, int, int]]]:
    """A vertical plane in four quadrants, so that the axial plane can be drawn between its halves."""
    return [(quadrant(axis, (s0, t0 * HEIGHT), (s0 + 1, (t0 + 1) * HEIGHT)), colour)
            for s0 in (-1, 0) for t0 in (-1, 0)]


def fill(draw: ImageDraw.ImageDraw, corners: np.ndarray, colour: tuple[int, int, int], alpha: int) -> None:
    """A translucent quad, outlined only along the plane's border (inner edges would hide the brain)."""
    points = project(corners)
    draw.polygon(points, fill=colour + (alpha,))
    outline = tuple(min(255, c + 60) for c in colour) + (255,)
    for i in range(4):
        a, b = corners[i], corners[(i + 1) % 4]
        if np.any(np.isclose(a, b) & ~np.isclose(a, 0)):  # a coordinate fixed at the border
            draw.line([points[i], points[(i + 1) % 4]], fill=outline, width=SUPER)


def on_axial(xy: np.ndarray) -> np.ndarray:
    return np.column_stack([xy[:, 0], xy[:, 1], np.zeros(len(xy))])


def brain(draw: ImageDraw.ImageDraw) -> None:
    """An axial brain slice: two hemispheres split by the midline fissure, folded cortex, ventricles."""
    t = np.linspace(0, 2 * math.pi, 240)
    rx = 0.6 + 0.05 * np.sin(-t)  # a little wider at the back; y is anterior
    outline = np.column_stack([rx * np.cos(t), 0.78 * np.sin(t)])
    draw.polygon(project(on_axial(outline)), fill=(238, 238, 244, 255), outline=(255, 255, 255, 255), width=SUPER)
    fold_colour = (132, 138, 168, 255)
    for side in (-1, 1):  # a wavy line inside each hemisphere's edge reads as gyri and sulci
        a = np.linspace(-math.pi / 2 + 0.25, math.pi / 2 - 0.25, 120)
        r = 0.78 + 0.06 * np.sin(13 * a)
        folds = np.column_stack([side * r * (0.6 - 0.05 * np.sin(-a)) * np.cos(a), r * 0.78 * np.sin(a)])
        draw.line(project(on_axial(folds)), fill=fold_colour, width=int(1.5 * SUPER), joint="curve")
    dark = (52, 58, 88, 255)
    draw.line(project(on_axial(np.array([[0, -0.78], [0, 0.78]]))), fill=dark, width=int(1.5 * SUPER))
    s = np.linspace(-1, 1, 30)
    for side in (-1, 1):  # lateral ventricles: crescents bowed outwards either side of the midline
        inner = np.column_stack([side * (0.04 + 0.06 * (1 - s**2)), 0.34 * s])
        outer = np.column_stack([side * (0.04 + 0.17 * (1 - s**2)), 0.34 * s])
        draw.polygon(project(on_axial(np.vstack([inner, outer[::-1]]))), fill=dark)


def draw_icon() -> Image.Image:
    big = SIZE * SUPER
    base = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    # Background: a rounded square with a vertical navy gradient.
    gradient = np.linspace(0, 1, big)[:, None]
    top, bottom = np.array([38, 56, 96]), np.array([14, 22, 44])
    rgb = (top * (1 - gradient) + bottom * gradient)[:, None, :].repeat(big, axis=1)
    background = Image.fromarray(np.dstack([rgb, np.full((big, big, 1), 255)]).astype(np.uint8), "RGBA")
    mask = Image.new("L", (big, big), 0)
    ImageDraw.Draw(mask).rounded_rectangle((0, 0, big - 1, big - 1), radius=24 * SUPER, fill=255)
    base.paste(background, (0, 0), mask)

    # Painter's order for a viewer above the axial plane: the vertical planes' lower halves, the
    # axial plane with the brain, then their upper halves, each group back to front.
    vertical = plane_pieces(0, YELLOW) + plane_pieces(1, GREEN)
    lower = [p for p in vertical if p[0][:, 2].mean() < 0]
    upper = [p for p in vertical if p[0][:, 2].mean() >= 0]
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for corners, colour in sorted(lower, key=lambda p: depth(p[0])):
        fill(draw, corners, colour, 150)
    base = Image.alpha_composite(base, layer)

    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    fill(draw, quadrant(2, (-1, -1), (1, 1)), RED, 200)
    brain(draw)
    base = Image.alpha_composite(base, layer)

    for corners, colour in sorted(upper, key=lambda p: depth(p[0])):
        layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
        fill(ImageDraw.Draw(layer), corners, colour, 90)
        base = Image.alpha_composite(base, layer)
    return base.resize((SIZE, SIZE), Image.LANCZOS)


if __name__ == "__main__":
    icon = draw_icon()
    for path in OUTPUTS:
        icon.save(path, optimize=True)
        print(f"wrote {path.relative_to(REPO)} ({path.stat().st_size} bytes)")
