"""Noise schedules (float64 tables) and the integer time grids the samplers walk.

Two schedules exist and only the noise level links them (method.md sections 2.2, 2.4, 10.1):

* :class:`FusedSchedule` -- the 1000-step linear-beta process of the fused 3D model
  (``beta = linspace(1e-4, 0.09, 1000)``). Samplers walk integer steps of it; the fuser is
  given the integer step ``t`` and plane models are given ``gamma = abar_t`` from this table.
* :class:`PlaneTrainingSchedule` -- the 2000-step schedule the plane models were trained on,
  used only to draw a continuous ``gamma`` per training sample.

Tables are numpy float64 because ``abar`` reaches 6.6e-21 and ``1/sqrt(abar)`` 1.2e10: they must
never be formed in fp16 (pitfall 8). Helpers that touch tensors take scalar coefficients from
these tables and apply them in float32 (float64 tensors stay float64). This module imports
torch only inside the functions that take tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError

if TYPE_CHECKING:  # pragma: no cover - typing only, never executed
    import torch

#: The clean state ``abar = 1`` below the first step; samplers use it as their last target.
CLEAN = -1


def _check_linear_betas(num_steps: int, beta_start: float, beta_end: float) -> None:
    if isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps < 2:
        raise InputError(f"a schedule needs an integer number of steps >= 2, got {num_steps!r}")
    if not (0.0 < beta_start <= beta_end < 1.0):
        raise InputError(f"betas must satisfy 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")


def _work_dtype(x: Any) -> Any:
    """float64 stays float64; every other dtype (fp16, bf16, ints, fp32) is worked in float32."""
    import torch

    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _is_integral(t: Any) -> bool:
    return isinstance(t, (int, np.integer)) and not isinstance(t, (bool, np.bool_))


class FusedSchedule:
    """The fused model's discrete forward process ``r_t = sqrt(abar_t) r0 + sqrt(1 - abar_t) eps``.

    Parameters
    ----------
    num_steps, beta_start, beta_end
        ``beta_t = linspace(beta_start, beta_end, num_steps)[t]`` for ``t = 0 .. num_steps - 1``;
        the defaults are the official (and only supported) 3D schedule.

    Attributes ``betas``, ``alphas`` and ``alphas_cumprod`` are read-only float64 arrays.
    ``t = -1`` (:data:`CLEAN`) denotes the clean state, ``abar_{-1} = 1``.
    """

    def __init__(self, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.09) -> None:
        _check_linear_betas(num_steps, beta_start, beta_end)
        self.num_steps = int(num_steps)
        self.beta_start = float(beta_start)
        self.beta_end = float(beta_end)
        betas = np.linspace(self.beta_start, self.beta_end, self.num_steps, dtype=np.float64)
        alphas = 1.0 - betas
        abar = np.cumprod(alphas)
        # log-abar with the clean state prepended (index 0 <-> t = -1), for float-t interpolation
        log_abar = np.concatenate([[0.0], np.cumsum(np.log1p(-betas))])
        for arr in (betas, alphas, abar, log_abar):
            arr.setflags(write=False)
        self.betas, self.alphas, self.alphas_cumprod, self._log_abar = betas, alphas, abar, log_abar

    # -- scalar look-ups ---------------------------------------------------------------
    def _check_t(self, t: Any) -> None:
        if not -1 <= t <= self.num_steps - 1:
            raise InputError(f"step t={t} is outside [-1, {self.num_steps - 1}]")

    def abar(self, t: int | float) -> float:
        """``abar_t`` as a Python float, exactly the table entry for an integer ``t``.

        An integer ``t`` (or a float with an integral value) returns ``alphas_cumprod[t]``
        bit for bit, and ``t = -1`` returns 1.0 (the clean state). A non-integral float ``t``
        interpolates ``log abar`` linearly between the neighbouring integer steps, i.e.
        ``abar`` is geometric between them -- the natural choice for a product of alphas.
        """
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, float, np.number)):
            raise InputError(f"step t must be a real number, got {t!r}")
        if _is_integral(t):
            self._check_t(int(t))
            return 1.0 if int(t) == -1 else float(self.alphas_cumprod[int(t)])
        t = float(t)
        if not math.isfinite(t):
            raise InputError(f"step t must be finite, got {t}")
        self._check_t(t)
        lo = math.floor(t)
        frac = t - lo
        if frac == 0.0:
            return self.abar(int(lo))
        log_a = (1.0 - frac) * self._log_abar[lo + 1] + frac * self._log_abar[lo + 2]
        return float(math.exp(log_a))

    def posterior(self, t: int, t_prev: int) -> tuple[float, float, float]:
        """Coefficients of ``q(r_{t_prev} | r_t, r0)`` between two grid points ``t > t_prev``.

        Returns ``(coef_r0, coef_rt, variance)`` in float64 with the respaced
        ``beta' = 1 - abar_t / abar_{t_prev}`` (method.md 6.1), so that
        ``mean = coef_r0 * r0 + coef_rt * r_t`` and the variance is the "fixed small" one.
        ``t_prev = -1`` is the clean state: ``(1, 0, 0)``. For ``t_prev = t - 1`` this is the
        ordinary DDPM posterior of method.md 2.3.
        """
        t, t_prev = self._pair(t, t_prev)
        abar_t, abar_p = self.abar(t), self.abar(t_prev)
        if t_prev == CLEAN:
            return 1.0, 0.0, 0.0
        alpha_step = abar_t / abar_p
        beta_step = 1.0 - alpha_step
        one_m = 1.0 - abar_t
        coef_r0 = math.sqrt(abar_p) * beta_step / one_m
        coef_rt = math.sqrt(alpha_step) * (1.0 - abar_p) / one_m
        variance = beta_step * (1.0 - abar_p) / one_m
        return coef_r0, coef_rt, variance

    def posterior_variance(self, t: int, t_prev: int) -> float:
        """The "fixed small" posterior variance ``beta' (1 - abar_{t_prev}) / (1 - abar_t)``."""
        return self.posterior(t, t_prev)[2]

    def _pair(self, t: Any, t_prev: Any) -> tuple[int, int]:
        if not (_is_integral(t) and _is_integral(t_prev)):
            raise InputError(f"posterior steps must be integers, got {t!r} and {t_prev!r}")
        t, t_prev = int(t), int(t_prev)
        self._check_t(t)
        self._check_t(t_prev)
        if not t > t_prev:
            raise InputError(f"the posterior needs t > t_prev, got t={t}, t_prev={t_prev}")
        return t, t_prev

    # -- tensor helpers (torch imported lazily) ----------------------------------------
    def _coefs(self, t: Any, like: Any, fn: Any) -> Any:
        """``fn(abar)`` (float64) for a scalar step, or per batch element for a 1-D step tensor,
        returned as a Python float or as a float32/float64 tensor broadcastable against ``like``."""
        import torch

        if isinstance(t, (torch.Tensor, np.ndarray)) and t.ndim == 0:
            t = t.item()  # a 0-d step is a scalar step
        if isinstance(t, (torch.Tensor, np.ndarray, list, tuple)):
            idx = np.asarray(t.detach().cpu() if isinstance(t, torch.Tensor) else t)
            if idx.ndim != 1 or idx.shape[0] != like.shape[0] or not np.issubdtype(idx.dtype, np.integer):
                raise InputError("a per-sample step must be a 1-D integer array, one entry per batch item")
            if idx.min() < 0 or idx.max() > self.num_steps - 1:
                raise InputError(f"steps must lie in [0, {self.num_steps - 1}]")
            values = np.array(fn(self.alphas_cumprod[idx]), dtype=np.float64)
            out = torch.from_numpy(values).to(device=like.device, dtype=_work_dtype(like))
            return out.reshape((-1,) + (1,) * (like.ndim - 1))
        return float(fn(np.float64(self.abar(t))))

    def q_sample(self, r0: torch.Tensor, t: Any, eps: torch.Tensor) -> torch.Tensor:
        """Diffuse ``r0`` to step ``t``: ``sqrt(abar_t) r0 + sqrt(1 - abar_t) eps``.

        ``t`` is a scalar step or a 1-D integer tensor with one step per batch item (fuser
        training). Coefficients come from the float64 table; the result is float32 (float64
        inputs stay float64), so half-precision inputs are never combined in half precision.
        """
        if r0.shape != eps.shape:
            raise InputError(f"r0 and eps shapes differ: {tuple(r0.shape)} vs {tuple(eps.shape)}")
        dt = _work_dtype(r0)
        a = self._coefs(t, r0, np.sqrt)
        b = self._coefs(t, r0, lambda ab: np.sqrt(1.0 - ab))
        return a * r0.to(dt) + b * eps.to(dt)

    def eps_to_x0(self, r_t: torch.Tensor, t: Any, eps: torch.Tensor) -> torch.Tensor:
        """Clean estimate ``(r_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`` (float32 or float64)."""
        dt = _work_dtype(r_t)
        inv = self._coefs(t, r_t, lambda ab: 1.0 / np.sqrt(ab))
        s = self._coefs(t, r_t, lambda ab: np.sqrt(1.0 - ab))
        return (r_t.to(dt) - s * eps.to(dt)) * inv

    def x0_to_eps(self, r_t: torch.Tensor, t: Any, x0: torch.Tensor) -> torch.Tensor:
        """The noise ``(r_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)`` that explains ``r_t`` given ``x0``.

        Used after the x0 hook so that a clipped/projected ``r0_hat`` acts consistently in
        every sampler (method.md 6.4).
        """
        dt = _work_dtype(r_t)
        a = self._coefs(t, r_t, np.sqrt)
        inv = self._coefs(t, r_t, lambda ab: 1.0 / np.sqrt(1.0 - ab))
        return (r_t.to(dt) - a * x0.to(dt)) * inv

    def posterior_mean(self, r0: torch.Tensor, r_t: torch.Tensor, t: int, t_prev: int) -> torch.Tensor:
        """``coef_r0 * r0 + coef_rt * r_t`` between grid points ``t > t_prev`` (see :meth:`posterior`)."""
        c0, ct, _ = self.posterior(t, t_prev)
        dt = _work_dtype(r_t)
        return c0 * r0.to(dt) + ct * r_t.to(dt)

    # -- bookkeeping -------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain description for checkpoints and provenance."""
        return {
            "type": "linear_beta",
            "num_steps": self.num_steps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
        }

    @classmethod
    def from_dict(cls, d: dict) -> FusedSchedule:
        if d.get("type", "linear_beta") != "linear_beta":
            raise InputError(f"unknown schedule type {d.get('type')!r}")
        return cls(int(d["num_steps"]), float(d["beta_start"]), float(d["beta_end"]))

    def __repr__(self) -> str:
        return (
            f"FusedSchedule(num_steps={self.num_steps}, beta_start={self.beta_start}, "
            f"beta_end={self.beta_end})"
        )


class PlaneTrainingSchedule:
    """The plane models' training schedule: continuous ``gamma`` drawn per sample (method.md 2.4).

    ``beta = linspace(beta_start, beta_end, num_steps)``, ``gbar_n = prod_{m<=n} (1 - beta_m)``;
    a draw takes ``n ~ U{1, ..., num_steps - 1}`` and ``gamma ~ U[gbar_n, gbar_{n-1}]``. With the
    defaults the covered range is ``[gbar_1999, gbar_0] = [4.39e-5, 0.999999]``.
    """

    def __init__(self, num_steps: int = 2000, beta_start: float = 1e-6, beta_end: float = 0.01) -> None:
        _check_linear_betas(num_steps, beta_start, beta_end)
        self.num_steps = int(num_steps)
        self.beta_start = float(beta_start)
        self.beta_end = float(beta_end)
        betas = np.linspace(self.beta_start, self.beta_end, self.num_steps, dtype=np.float64)
        gbar = np.cumprod(1.0 - betas)
        betas.setflags(write=False)
        gbar.setflags(write=False)
        self.betas, self.gammas_cumprod = betas, gbar

    @property
    def gamma_range(self) -> tuple[float, float]:
        """``(min, max)`` of the gammas a plane model was trained on."""
        return float(self.gammas_cumprod[-1]), float(self.gammas_cumprod[0])

    def sample_gamma(
        self,
        batch: int,
        generator: torch.Generator | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: Any = None,
    ) -> torch.Tensor:
        """Draw ``batch`` noise levels (float64 by default) from the construction above.

        Both draws use ``generator`` on the CPU (a fixed seed gives the same gammas on any
        device); the interpolation is done in float64 before any cast to ``dtype``.
        """
        import torch

        if isinstance(batch, bool) or int(batch) != batch or batch < 1:
            raise InputError(f"batch must be a positive integer, got {batch!r}")
        n = torch.randint(1, self.num_steps, (int(batch),), generator=generator)
        u = torch.rand(int(batch), generator=generator, dtype=torch.float64)
        table = torch.from_numpy(np.array(self.gammas_cumprod))
        lo, hi = table[n], table[n - 1]
        gamma = lo + u * (hi - lo)
        return gamma.to(device=device, dtype=dtype or torch.float64)

    def q_sample(self, r0: torch.Tensor, gamma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """``sqrt(gamma) r0 + sqrt(1 - gamma) eps`` with one gamma per batch item (float32 math)."""
        import torch

        if r0.shape != eps.shape:
            raise InputError(f"r0 and eps shapes differ: {tuple(r0.shape)} vs {tuple(eps.shape)}")
        g = torch.as_tensor(gamma, dtype=torch.float64, device=r0.device).reshape(-1)
        if g.shape[0] != r0.shape[0]:
            raise InputError("need one gamma per batch item")
        dt = _work_dtype(r0)
        shape = (-1,) + (1,) * (r0.ndim - 1)
        a = g.sqrt().to(dt).reshape(shape)
        b = (1.0 - g).sqrt().to(dt).reshape(shape)
        return a * r0.to(dt) + b * eps.to(dt)

    def to_dict(self) -> dict:
        return {
            "type": "linear_beta_continuous",
            "num_steps": self.num_steps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
        }

    def __repr__(self) -> str:
        return (
            f"PlaneTrainingSchedule(num_steps={self.num_steps}, beta_start={self.beta_start}, "
            f"beta_end={self.beta_end})"
        )


# -- time grids --------------------------------------------------------------------------
def _check_count(n: Any, num_steps: int) -> int:
    if isinstance(n, (bool, np.bool_)) or not _is_integral(n):
        raise InputError(f"the number of sampling steps must be an integer, got {n!r}")
    if not 1 <= int(n) <= num_steps:
        raise InputError(f"the number of sampling steps must lie in [1, {num_steps}], got {n}")
    return int(n)


def _round_half_up(num: int, den: int) -> int:
    """``floor(num/den + 1/2)`` in exact integer arithmetic (den > 0)."""
    return (2 * num + den) // (2 * den)


def ddpm_respaced_steps(n: int, num_steps: int = 1000) -> list[int]:
    """The paper's respaced DDPM grid, ascending: ``tau_i = round(i * (T-1) / (n-1))``, i = 0..n-1.

    ``n = 50`` gives 0, 20, 41, 61, 82, ..., 979, 999 (method.md 6.1). Rounding is half-up in
    exact integer arithmetic (no float ties); ``n = 1`` gives ``[T-1]``. The result is
    deduplicated (never needed for n <= T) and every entry is a step the network is run at.
    """
    n = _check_count(n, num_steps)
    last = num_steps - 1
    if n == 1:
        return [last]
    return sorted({_round_half_up(i * last, n - 1) for i in range(n)})


def uniform_steps(n: int, num_steps: int = 1000) -> list[int]:
    """A uniform-in-t grid for DDIM / DPM-Solver++, ascending: ``round(linspace(T-1, 0, n + 1))``.

    Exactly: point ``i = 0..n`` is ``(T-1) * (n - i) / n`` rounded half-up in integer
    arithmetic, then deduplicated (duplicates only occur for ``n = T``, which gives every step
    once). So ``n`` counts the *intervals* from ``T-1`` down to step 0; the network runs at
    each of the ``n + 1`` points (fewer after deduplication), the last time at ``t = 0``,
    from which the sampler's final update lands on the clean state (method.md 6.4). Ending at
    ``t = 0`` matters: a final jump to the clean state from a noisier step returns a
    posterior-mean (over-smoothed) estimate. ``n = 50`` gives 0, 20, 40, 60, 80, 100, ..., 979, 999.
    """
    n = _check_count(n, num_steps)
    last = num_steps - 1
    return sorted({_round_half_up(last * (n - i), n) for i in range(n + 1)})


def logsnr_steps(n: int, schedule: FusedSchedule | None = None, abar_min: float = 1e-4) -> list[int]:
    """[L] option, not the paper's grid: steps uniform in log-SNR where the signal is visible.

    Returns the last step ``T-1`` (so sampling still starts from the exact prior) plus ``n - 1``
    points uniform in ``lambda = log(sqrt(abar/(1-abar)))`` between step 0 and the first step
    with ``abar < abar_min`` (t = 448 for the default schedule), each mapped to the integer step
    of nearest ``lambda``; ascending and deduplicated, so it may hold fewer than ``n`` steps.

    Why: this schedule's uniform-in-t grids spend about half their points at ``abar < 4e-5``
    and take steps of several units of log-SNR near ``t = 0``, where small-amplitude detail is
    resolved; on Gaussian data that makes first-order samplers over-smooth strongly
    (method.md 6.4, "step-count lever"; see the tests).
    """
    schedule = schedule if schedule is not None else FusedSchedule()
    n = _check_count(n, schedule.num_steps)
    last = schedule.num_steps - 1
    if n == 1:
        return [last]
    if not 0.0 < abar_min < 1.0:
        raise InputError(f"abar_min must lie in (0, 1), got {abar_min}")
    abar = np.asarray(schedule.alphas_cumprod)
    lam = 0.5 * (np.log(abar) - np.log1p(-abar))
    below = np.nonzero(abar < abar_min)[0]
    t_hi = int(below[0]) if below.size else last
    targets = np.linspace(lam[0], lam[t_hi], n - 1) if n > 2 else np.array([lam[0]])
    # lambda is strictly decreasing in t: search on the reversed (increasing) array
    rev = lam[::-1]
    pos = np.clip(np.searchsorted(rev, targets), 1, len(rev) - 1)
    nearer_left = np.abs(rev[pos - 1] - targets) <= np.abs(rev[pos] - targets)
    idx_rev = np.where(nearer_left, pos - 1, pos)
    steps = {last - int(i) for i in idx_rev}
    steps.add(last)
    return sorted(steps)


def normalize_steps(steps: Sequence[int], num_steps: int = 1000) -> list[int]:
    """Validate a caller's grid and return it deduplicated in *descending* (sampling) order."""
    if isinstance(steps, (str, bytes)):
        raise InputError("steps must be a sequence of integers")
    out = set()
    for t in steps:
        if not _is_integral(t):
            raise InputError(f"sampling steps must be integers of the schedule, got {t!r}")
        if not 0 <= int(t) <= num_steps - 1:
            raise InputError(f"sampling step {t} is outside [0, {num_steps - 1}]")
        out.add(int(t))
    if not out:
        raise InputError("the sampling grid is empty")
    return sorted(out, reverse=True)
