"""The demo's input volumes: the real ICBM152 T1 and a simulated multi-contrast case.

Both are put on the model grid (2 mm, centred crop) the default bundles were trained on. The
simulated case comes from a cohort seed no default model was trained with.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import ScoreFusionError
from ..grid import crop_or_pad
from ..volume import Volume

#: cohort seed of the demo's simulated case (the default models' training cohorts use 11 and 12)
DEMO_SIMULATION_SEED = 2026
#: Colin27, brain-extracted, from Debian's ``mricron-data`` (a real anatomy no default model saw)
COLIN27_BRAIN = "/usr/share/mricron/templates/ch2bet.nii.gz"


def real_icbm_t1(shape_ijk: Sequence[int], spacing: float = 2.0) -> Volume:
    """The real ICBM152 2009a T1 (0-255) block-averaged to ``spacing`` mm and centred on ``shape_ijk``."""
    from ..simulator import load_tissue_maps

    maps = load_tissue_maps(spacing)
    volume = Volume((maps.reference_t1 * np.float32(255.0)).astype(np.float32), maps.affine.copy())
    return crop_or_pad(volume, shape_ijk)


def colin27_t1(shape_ijk: Sequence[int], spacing: float = 2.0, path: str = COLIN27_BRAIN) -> Volume:
    """The real Colin27 T1 (brain-extracted, 1 mm) block-averaged to ``spacing`` mm and cropped to
    ``shape_ijk`` around the centre of its brain."""
    from ..errors import DatasetError
    from ..geometry import low_resolution_affine
    from ..simulator.tissue import block_average
    from ..volume_io import load_volume

    try:
        source = load_volume(path)
    except ScoreFusionError as exc:
        raise DatasetError(f"Colin27 is not installed ({exc}); on Debian: apt-get install mricron-data") from exc
    array = block_average(source.array.astype(np.float32), spacing)
    volume = Volume(array, low_resolution_affine(source.affine, (spacing,) * 3))
    brain = np.argwhere(array > 0)
    centre_kji = (brain.min(axis=0) + brain.max(axis=0)) // 2
    start = [int(c) - int(n) // 2 for c, n in zip(centre_kji[::-1], shape_ijk)]
    return crop_or_pad(volume, shape_ijk, start_ijk=start, fill=0.0)


def simulated_case_on_grid(shape_ijk: Sequence[int], spacing: float = 2.0, seed: int = DEMO_SIMULATION_SEED,
                           t1_source: str = "simulated") -> tuple[dict[str, Volume], Volume | None, dict]:
    """Contrasts, tumour labels (or ``None``) and parameters of case 1 of cohort ``seed``, centred on ``shape_ijk``.

    With the simulated T1 the case has a tumour (labels in ``params["label_convention"]``); with
    ``t1_source="icbm"`` the t1n image is the real ICBM152 T1 under the case's deformation, bias
    field and noise (and there is no tumour).
    """
    from ..simulator import simulate_case

    case = simulate_case(seed, 1, spacing=spacing, tumor=t1_source == "simulated", t1_source=t1_source)
    images = {name: crop_or_pad(vol, shape_ijk) for name, vol in case.images.items()}
    labels = crop_or_pad(case.labels, shape_ijk, fill=0) if case.labels is not None else None
    return images, labels, case.params


def simulated_contrasts(shape_ijk: Sequence[int], spacing: float = 2.0, seed: int = DEMO_SIMULATION_SEED,
                        t1_source: str = "simulated") -> tuple[dict[str, Volume], dict]:
    """Co-registered simulated contrasts (contrast -> Volume) of case 1 of cohort ``seed`` and its parameters."""
    images, _, params = simulated_case_on_grid(shape_ijk, spacing, seed, t1_source)
    return images, params
