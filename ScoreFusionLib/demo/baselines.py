"""Non-learned reference results the demo compares the models with.

Super-resolution has trilinear interpolation. Synthesis has no interpolation, so its floor is the
best linear intensity mapping of the input contrasts onto the target, fitted by least squares
against the ground truth itself (an oracle fit: no real method could do better with a linear map).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..volume import Volume


def best_linear_mapping(inputs: Sequence[Volume], truth: Volume) -> tuple[Volume, list[float]]:
    """``sum_c a_c x_c + b`` with the coefficients that minimise the squared error to ``truth``.

    Returns the mapped volume (on the truth's grid) and the coefficients ``[a_1, ..., b]``.
    """
    design = np.stack([v.array.ravel().astype(np.float64) for v in inputs] + [np.ones(truth.array.size)], axis=1)
    coefficients, *_ = np.linalg.lstsq(design, truth.array.ravel().astype(np.float64), rcond=None)
    mapped = (design @ coefficients).reshape(truth.array.shape).astype(np.float32)
    return Volume(mapped, truth.affine.copy()), [float(c) for c in coefficients]
