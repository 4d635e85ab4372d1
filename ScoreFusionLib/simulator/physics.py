"""MR signal physics: relaxation parameters, sequence timings and signal equations.

Each tissue (or tumour compartment) gets one signal per contrast from its own T1, T2 and
PD, and a voxel's signal is the fraction-weighted sum of those signals. Mixing signals
rather than parameters is what partial volume does in a real scanner (mixing T1 values
would not be linear in the signal). The values are typical 3 T literature values, used as
assumptions: every case jitters them so no model can learn one fixed intensity table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np

#: Written contrasts, in file order. ``t1c`` is the T1w sequence after contrast agent.
CONTRASTS = ("t1n", "t1c", "t2w", "t2f", "pdw")

#: Normal tissue (T1 ms, T2 ms, PD) at 3 T; see docs/data.md section 3.
NORMAL_TISSUE = {
    "wm": (830.0, 80.0, 0.69),
    "gm": (1330.0, 110.0, 0.80),
    "csf": (4160.0, 2000.0, 1.00),
}
#: Relative jitter applied to every normal-tissue parameter per case (uniform, +-).
TISSUE_JITTER = 0.10

#: Tumour compartments: (T1 range, T2 range, PD range); illustrative, randomised widely.
TUMOUR_TISSUE = {
    "edema": ((1300.0, 1600.0), (150.0, 300.0), (0.85, 0.95)),
    "necrotic": ((2000.0, 3500.0), (300.0, 800.0), (0.90, 1.00)),
    "enhancing": ((1200.0, 1500.0), (100.0, 150.0), (0.80, 0.90)),
}
#: Gadolinium shortens T1 of enhancing tissue by this factor in the ``t1c`` contrast.
T1C_FACTOR_RANGE = (0.3, 0.5)

#: TR and TE ranges (ms) per acquired sequence; t1c reuses the t1n timings.
TIMING_RANGES = {
    "t1n": {"TR": (400.0, 700.0), "TE": (8.0, 20.0)},
    "t2w": {"TR": (3000.0, 6000.0), "TE": (80.0, 120.0)},
    "pdw": {"TR": (2000.0, 4000.0), "TE": (10.0, 30.0)},
    "t2f": {"TR": (8000.0, 11000.0), "TE": (80.0, 140.0)},
}
#: FLAIR inversion time is the CSF null times a factor in 1 +- this.
TI_JITTER = 0.10


@dataclass(frozen=True)
class Relaxation:
    """Relaxation times (ms) and proton density (relative to water) of one tissue."""

    t1_ms: float
    t2_ms: float
    pd: float

    def with_t1_scaled(self, factor: float) -> Relaxation:
        return Relaxation(self.t1_ms * factor, self.t2_ms, self.pd)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class Sequence:
    """One acquisition: ``kind`` is ``spin_echo`` or ``inversion_recovery``; times in ms."""

    kind: str
    tr_ms: float
    te_ms: float
    ti_ms: float | None = None

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"sequence": self.kind, "TR_ms": self.tr_ms, "TE_ms": self.te_ms}
        if self.ti_ms is not None:
            out["TI_ms"] = self.ti_ms
        return out


def spin_echo(pd: float, t1: float, t2: float, tr: float, te: float) -> float:
    """Spin-echo signal ``PD (1 - exp(-TR/T1)) exp(-TE/T2)`` (arrays broadcast too)."""
    return pd * (1.0 - np.exp(-tr / t1)) * np.exp(-te / t2)


def inversion_recovery(pd: float, t1: float, t2: float, tr: float, te: float, ti: float) -> float:
    """Magnitude inversion-recovery signal ``PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2)``."""
    return pd * np.abs(1.0 - 2.0 * np.exp(-ti / t1) + np.exp(-tr / t1)) * np.exp(-te / t2)


def csf_null_ti(t1_csf_ms: float, tr_ms: float) -> float:
    """Inversion time (ms) that nulls a tissue of T1 ``t1_csf_ms``: ``T1 ln(2 / (1 + exp(-TR/T1)))``."""
    return float(t1_csf_ms * math.log(2.0 / (1.0 + math.exp(-tr_ms / t1_csf_ms))))


def signal(tissue: Relaxation, sequence: Sequence) -> float:
    """Noise-free signal of one pure tissue under one sequence."""
    if sequence.kind == "spin_echo":
        return float(spin_echo(tissue.pd, tissue.t1_ms, tissue.t2_ms, sequence.tr_ms, sequence.te_ms))
    if sequence.kind == "inversion_recovery":
        return float(
            inversion_recovery(
                tissue.pd, tissue.t1_ms, tissue.t2_ms, sequence.tr_ms, sequence.te_ms, sequence.ti_ms
            )
        )
    raise ValueError(f"unknown sequence kind {sequence.kind!r}")


def nominal_tissues() -> dict[str, Relaxation]:
    """The un-jittered normal-tissue table."""
    return {name: Relaxation(*values) for name, values in NORMAL_TISSUE.items()}


def jitter_tissues(rng: np.random.Generator, amount: float = TISSUE_JITTER) -> dict[str, Relaxation]:
    """Normal tissues with each parameter scaled by an independent factor in ``1 +- amount``."""
    out = {}
    for name, (t1, t2, pd) in NORMAL_TISSUE.items():
        f = rng.uniform(1.0 - amount, 1.0 + amount, size=3)
        out[name] = Relaxation(t1 * f[0], t2 * f[1], pd * f[2])
    return out


def sample_tumour_tissues(rng: np.random.Generator) -> tuple[dict[str, Relaxation], float]:
    """Relaxation of each tumour compartment drawn uniformly in its range, and the T1c factor."""
    out = {}
    for name, ranges in TUMOUR_TISSUE.items():
        t1, t2, pd = (float(rng.uniform(lo, hi)) for lo, hi in ranges)
        out[name] = Relaxation(t1, t2, pd)
    factor = float(rng.uniform(*T1C_FACTOR_RANGE))
    return out, factor


def sample_sequences(rng: np.random.Generator, t1_csf_ms: float) -> dict[str, Sequence]:
    """Timings per contrast, uniform in :data:`TIMING_RANGES`; FLAIR TI near the CSF null."""
    seqs = {}
    for name, ranges in TIMING_RANGES.items():
        tr = float(rng.uniform(*ranges["TR"]))
        te = float(rng.uniform(*ranges["TE"]))
        if name == "t2f":
            ti = csf_null_ti(t1_csf_ms, tr) * float(rng.uniform(1.0 - TI_JITTER, 1.0 + TI_JITTER))
            seqs[name] = Sequence("inversion_recovery", tr, te, ti)
        else:
            seqs[name] = Sequence("spin_echo", tr, te)
    seqs["t1c"] = seqs["t1n"]
    return {name: seqs[name] for name in CONTRASTS}


def tissue_signals(
    tissues: Mapping[str, Relaxation], sequence: Sequence, t1_factors: Mapping[str, float] | None = None
) -> dict[str, float]:
    """Signal of every tissue under ``sequence``; ``t1_factors`` shortens T1 (contrast agent)."""
    factors = t1_factors or {}
    return {
        name: signal(tissue.with_t1_scaled(factors.get(name, 1.0)), sequence)
        for name, tissue in tissues.items()
    }


def mix(
    fractions: Mapping[str, np.ndarray],
    signals: Mapping[str, float],
    boxes: Mapping[str, tuple[slice, slice, slice]] | None = None,
) -> np.ndarray:
    """Voxel signal ``sum_t f_t S_t`` (float32).

    ``boxes`` names tissues whose fraction is zero outside a (k, j, i) box (a tumour), so
    only that box is added.
    """
    boxes = boxes or {}
    names = list(fractions)
    if not names:
        raise ValueError("no tissue fractions to mix")
    full = [n for n in names if n not in boxes] or names[:1]
    out = np.multiply(fractions[full[0]], np.float32(signals[full[0]]), dtype=np.float32)
    for name in names:
        if name == full[0]:
            continue
        s = np.float32(signals[name])
        box = boxes.get(name)
        if box is None:
            out += fractions[name] * s
        else:
            out[box] += fractions[name][box] * s
    return out
