"""Reverse-process samplers sharing one epsilon-model interface and one x0 hook (method.md 6.1-6.4).

**Epsilon model.** ``eps_model(r_t, t, abar_t) -> eps_hat`` with ``t`` the *original* integer
step of the 1000-step schedule (also after respacing; the fuser is conditioned on it) and
``abar_t = schedule.abar(t)``, the exact float64 table value (plane models take it as their
``gamma``; pitfall 1). The model may compute in any precision; its output is cast to the state
dtype.

**Every step, every sampler.** ``eps_hat = eps_model(r, t, abar_t)``;
``r0_hat = (r - sqrt(1-abar) eps_hat)/sqrt(abar)``; ``r0_hat = x0_hook(r0_hat, t)`` (clip, then
project); the hooked estimate drives the update -- directly (DDPM posterior, DPM-Solver++) or
through the equivalent noise ``eps_tilde = (r - sqrt(abar) r0_hat)/sqrt(1-abar)`` (DDIM) -- so a
projection acts the same way in every sampler. The last update lands on the clean state
(``abar = 1``), so the returned residual *is* the last hooked ``r0_hat``.

**Precision and determinism.** The state and all updates are float32 (float64 if asked for;
fp16/bf16 requests are promoted to float32), with coefficients computed in float64 from the
schedule tables: ``1/sqrt(abar)`` reaches 1.2e10 (pitfall 8). All noise is drawn for the whole
tensor from the seeded generator on the CPU in float32, then moved to the device, so a seed
gives the same noise on any device and with any tiling (pitfall 6).

torch is imported inside the functions, so importing this module does not import torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import InputError, ScoreFusionError
from .schedule import CLEAN, FusedSchedule, ddpm_respaced_steps, normalize_steps, uniform_steps

if TYPE_CHECKING:  # pragma: no cover - typing only, never executed
    import torch

EpsModel = Callable[["torch.Tensor", int, float], "torch.Tensor"]
X0Hook = Callable[["torch.Tensor", int], "torch.Tensor"]
StepCallback = Callable[[int, int, int], Any]

#: Canonical method names accepted by :func:`sample`, with aliases.
METHODS = {
    "ddpm": "ddpm",
    "ddim": "ddim",
    "dpmpp_2m": "dpmpp_2m",
    "dpmpp-2m": "dpmpp_2m",
    "dpm++2m": "dpmpp_2m",
    "dpm-solver++": "dpmpp_2m",
    "dpmsolver++": "dpmpp_2m",
}


# -- shared plumbing ----------------------------------------------------------------------
def _state_dtype(dtype: Any) -> Any:
    """float64 if requested, float32 for everything else (never a half-precision state)."""
    import torch

    if dtype is None:
        return torch.float32
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(f"the sampler state dtype must be a floating torch dtype, got {dtype!r}")
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_generator(generator: Any) -> None:
    import torch

    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise InputError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise InputError("the sampling generator must live on the CPU (noise is drawn there for determinism)")


def _randn(shape: tuple[int, ...], generator: Any, device: Any, dtype: Any) -> torch.Tensor:
    """Standard normal noise for the whole tensor: CPU, float32, seeded; then moved."""
    import torch

    z = torch.randn(shape, generator=generator, dtype=torch.float32, device="cpu")
    return z.to(device=device, dtype=dtype)


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    try:
        out = tuple(int(s) for s in shape)
    except TypeError as exc:
        raise InputError(f"shape must be a sequence of positive integers, got {shape!r}") from exc
    if not out or min(out) < 1 or any(int(s) != s for s in shape):
        raise InputError(f"shape must be a sequence of positive integers, got {tuple(shape)!r}")
    return out


def _grid(
    steps: int | Sequence[int], schedule: FusedSchedule, default: Callable[..., list[int]]
) -> list[int]:
    """Descending, validated sampling grid; an int means ``default(n)``."""
    if isinstance(steps, int) and not isinstance(steps, bool):
        steps = default(steps, schedule.num_steps)
    elif isinstance(steps, bool):
        raise InputError("steps must be an integer count or a sequence of integer steps")
    return normalize_steps(steps, schedule.num_steps)


def _run(
    update: Callable[..., Any],
    eps_model: EpsModel,
    shape: Sequence[int],
    schedule: FusedSchedule | None,
    steps: int | Sequence[int],
    default_grid: Callable[..., list[int]],
    x0_hook: X0Hook | None,
    generator: Any,
    device: Any,
    dtype: Any,
    init_noise: Any,
    callback: StepCallback | None,
) -> torch.Tensor:
    """The loop common to all samplers; ``update`` performs one method-specific transition.

    ``update(i, t, t_next, r, r0_hat, noise)`` returns the new state for ``t_next >= 0``;
    ``noise()`` draws one whole-tensor standard normal. The final transition (to the clean
    state) is not delegated: it returns ``r0_hat`` itself.
    """
    import torch

    schedule = schedule if schedule is not None else FusedSchedule()
    if not isinstance(schedule, FusedSchedule):
        raise InputError(f"schedule must be a FusedSchedule, got {type(schedule).__name__}")
    if not callable(eps_model):
        raise InputError("eps_model must be callable as eps_model(r_t, t, abar_t)")
    shape = _check_shape(shape)
    grid = _grid(steps, schedule, default_grid)
    state_dtype = _state_dtype(dtype)
    device = torch.device(device if device is not None else "cpu")
    _check_generator(generator)

    if init_noise is None:
        r = _randn(shape, generator, device, state_dtype)
    else:
        if tuple(init_noise.shape) != shape:
            raise InputError(f"init_noise has shape {tuple(init_noise.shape)}, expected {shape}")
        r = init_noise.detach().to(device=device, dtype=state_dtype).clone()

    def noise() -> torch.Tensor:
        return _randn(shape, generator, device, state_dtype)

    total = len(grid)
    with torch.no_grad():  # sampling never builds a graph, whatever the model does
        for i, t in enumerate(grid):
            t_next = grid[i + 1] if i + 1 < total else CLEAN
            abar_t = schedule.abar(t)
            eps_hat = eps_model(r, t, abar_t)
            if not isinstance(eps_hat, torch.Tensor) or tuple(eps_hat.shape) != shape:
                got = tuple(eps_hat.shape) if isinstance(eps_hat, torch.Tensor) else type(eps_hat).__name__
                raise InputError(f"eps_model returned {got} at t={t}, expected a tensor of shape {shape}")
            eps_hat = eps_hat.detach().to(device=device, dtype=state_dtype)
            if not bool(torch.isfinite(eps_hat).all()):
                raise ScoreFusionError(
                    f"eps_model returned non-finite values at step t={t} (abar={abar_t:.3g}); "
                    "half-precision overflow in the network is the usual cause"
                )
            r0_hat = schedule.eps_to_x0(r, t, eps_hat)
            if x0_hook is not None:
                r0_hat = x0_hook(r0_hat, t)
                if tuple(r0_hat.shape) != shape:
                    raise InputError(f"x0_hook changed the shape to {tuple(r0_hat.shape)} at t={t}")
                r0_hat = r0_hat.to(device=device, dtype=state_dtype)
            if t_next == CLEAN:
                r = r0_hat  # the clean state is the last hooked estimate, exactly
            else:
                r = update(i, t, t_next, r, r0_hat, noise)
            if callback is not None:
                callback(i, total, t)
    return r


# -- the samplers -------------------------------------------------------------------------
def sample_ddpm(
    eps_model: EpsModel,
    shape: Sequence[int],
    schedule: FusedSchedule | None,
    steps: int | Sequence[int],
    *,
    x0_hook: X0Hook | None = None,
    generator: torch.Generator | None = None,
    device: Any = None,
    dtype: torch.dtype | None = None,
    init_noise: torch.Tensor | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Respaced ancestral DDPM, the paper's sampler (method.md 6.1).

    From grid point ``t`` to the next ``t' < t`` it samples the posterior with
    ``beta' = 1 - abar_t/abar_t'`` and the "fixed small" variance; the last step returns the
    hooked ``r0_hat`` without noise. ``steps`` is a count (grid :func:`ddpm_respaced_steps`,
    50 in the paper) or explicit integer steps of ``schedule``. ``callback(step_index, total,
    t)`` runs after every step (0-based index); an exception it raises stops sampling and
    propagates. Returns the final residual in float32 (float64 if ``dtype`` is float64) on
    ``device``.
    """
    schedule = schedule if schedule is not None else FusedSchedule()

    def update(i: int, t: int, t_next: int, r: Any, r0_hat: Any, noise: Callable[[], Any]) -> Any:
        c0, ct, var = schedule.posterior(t, t_next)
        return c0 * r0_hat + ct * r + math.sqrt(var) * noise()

    return _run(update, eps_model, shape, schedule, steps, ddpm_respaced_steps, x0_hook, generator,
                device, dtype, init_noise, callback)


def sample_ddim(
    eps_model: EpsModel,
    shape: Sequence[int],
    schedule: FusedSchedule | None,
    steps: int | Sequence[int],
    *,
    eta: float = 0.0,
    x0_hook: X0Hook | None = None,
    generator: torch.Generator | None = None,
    device: Any = None,
    dtype: torch.dtype | None = None,
    init_noise: torch.Tensor | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """DDIM(eta) with the hooked estimate (method.md 6.4); eta = 0 is deterministic.

    ``r_t' = sqrt(abar_t') r0_hat + sqrt(1 - abar_t' - sigma^2) eps_tilde + sigma z`` with
    ``sigma = eta sqrt((1-abar_t')/(1-abar_t)) sqrt(1 - abar_t/abar_t')``; eta = 1 has the
    DDPM posterior's variance. A count ``steps`` uses :func:`uniform_steps`. Other arguments
    as in :func:`sample_ddpm`; no noise is drawn when eta = 0.
    """
    schedule = schedule if schedule is not None else FusedSchedule()
    eta = float(eta)
    if not 0.0 <= eta <= 1.0:
        raise InputError(f"DDIM eta must lie in [0, 1], got {eta}")

    def update(i: int, t: int, t_next: int, r: Any, r0_hat: Any, noise: Callable[[], Any]) -> Any:
        abar_t, abar_n = schedule.abar(t), schedule.abar(t_next)
        sigma = eta * math.sqrt((1.0 - abar_n) / (1.0 - abar_t) * (1.0 - abar_t / abar_n))
        eps_tilde = schedule.x0_to_eps(r, t, r0_hat)
        dir_coef = math.sqrt(max(1.0 - abar_n - sigma * sigma, 0.0))
        out = math.sqrt(abar_n) * r0_hat + dir_coef * eps_tilde
        return out + sigma * noise() if sigma > 0.0 else out

    return _run(update, eps_model, shape, schedule, steps, uniform_steps, x0_hook, generator,
                device, dtype, init_noise, callback)


def sample_dpmpp_2m(
    eps_model: EpsModel,
    shape: Sequence[int],
    schedule: FusedSchedule | None,
    steps: int | Sequence[int],
    *,
    x0_hook: X0Hook | None = None,
    generator: torch.Generator | None = None,
    device: Any = None,
    dtype: torch.dtype | None = None,
    init_noise: torch.Tensor | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M), data-prediction form, on the hooked ``r0_hat`` (method.md 6.4).

    With ``alpha = sqrt(abar)``, ``sigma = sqrt(1-abar)``, ``lambda = log(alpha/sigma)`` and
    ``h = lambda_t' - lambda_t``: ``r_t' = (sigma_t'/sigma_t) r + alpha_t' (1 - e^{-h}) D``,
    where ``D`` is the current estimate on the first step (first order) and the multistep
    ``(1 + 1/(2q)) x0_i - 1/(2q) x0_{i-1}``, ``q = h_{i-1}/h_i``, afterwards; the final step to
    the clean state is first order (it returns the hooked estimate). Linear combinations of
    projected estimates stay in the null space, so consistency is preserved. Deterministic; a
    count ``steps`` uses :func:`uniform_steps`. Other arguments as in :func:`sample_ddpm`.
    """
    schedule = schedule if schedule is not None else FusedSchedule()

    def lam(t: int) -> float:
        abar = schedule.abar(t)
        return 0.5 * (math.log(abar) - math.log1p(-abar))

    history: dict[str, Any] = {}

    def update(i: int, t: int, t_next: int, r: Any, r0_hat: Any, noise: Callable[[], Any]) -> Any:
        abar_t, abar_n = schedule.abar(t), schedule.abar(t_next)
        h = lam(t_next) - lam(t)
        ratio = math.sqrt((1.0 - abar_n) / (1.0 - abar_t))
        coef = math.sqrt(abar_n) * -math.expm1(-h)
        if i == 0 or "x0" not in history:
            d = r0_hat
        else:
            q = history["h"] / h
            d = (1.0 + 0.5 / q) * r0_hat - (0.5 / q) * history["x0"]
        history["x0"], history["h"] = r0_hat, h
        return ratio * r + coef * d

    return _run(update, eps_model, shape, schedule, steps, uniform_steps, x0_hook, generator,
                device, dtype, init_noise, callback)


def sample(
    method: str,
    eps_model: EpsModel,
    shape: Sequence[int],
    schedule: FusedSchedule | None,
    steps: int | Sequence[int],
    *,
    eta: float = 0.0,
    **kwargs: Any,
) -> torch.Tensor:
    """Dispatch to a sampler by name: ``"ddpm"``, ``"ddim"`` or ``"dpmpp_2m"`` (aliases in :data:`METHODS`).

    ``eta`` is DDIM's; a non-zero eta with another method is an error rather than silently
    ignored. Keyword arguments are those of :func:`sample_ddpm`.
    """
    key = METHODS.get(str(method).strip().lower())
    if key is None:
        raise InputError(f"unknown sampler {method!r}; expected one of 'ddpm', 'ddim', 'dpmpp_2m'")
    if key == "ddim":
        return sample_ddim(eps_model, shape, schedule, steps, eta=eta, **kwargs)
    if eta != 0.0:
        raise InputError(f"eta applies to DDIM only, not to {key!r}")
    fn = sample_ddpm if key == "ddpm" else sample_dpmpp_2m
    return fn(eps_model, shape, schedule, steps, **kwargs)
