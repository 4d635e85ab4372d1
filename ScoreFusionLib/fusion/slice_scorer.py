"""Run one plane model over every slice of a volume and restack its noise estimates.

The plane model sees each slice through :func:`ScoreFusionLib.data.slices.plane_network_input`,
the same canonical layout its training batches used (method.md pitfall 9). Slices go through
the network in batches of ``batch_size`` under ``torch.no_grad`` and in eval mode; memory is
bounded by the batch, not the volume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..data.slices import plane_axis, plane_network_input
from ..errors import InputError


@dataclass(frozen=True)
class VolumeConditioning:
    """The per-volume network inputs that stay fixed during sampling (torch tensors).

    conditions : (M, D, H, W) normalised conditions, ``conditions[0]`` = ``c_ref``.
    coords : (3, D, H, W) coordinate channels of the full model grid.
    mask : (1, D, H, W) +1/-1 foreground channel of ``c_ref``.
    """

    conditions: Any
    coords: Any
    mask: Any

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.conditions.shape[-3:])

    def __post_init__(self) -> None:
        shape = tuple(self.conditions.shape[-3:])
        if self.conditions.ndim != 4:
            raise InputError(f"conditions must be (M, D, H, W), got {tuple(self.conditions.shape)}")
        for name, t, channels in (("coords", self.coords, 3), ("mask", self.mask, 1)):
            if tuple(t.shape) != (channels, *shape):
                raise InputError(f"{name} must have shape {(channels, *shape)}, got {tuple(t.shape)}")


class SliceScorer:
    """A plane model applied slice by slice along its axis: ``eps_k`` for a whole volume.

    Parameters
    ----------
    model : a plane network ``model(x, gamma) -> eps`` (e.g. :class:`ScoreFusionLib.nets.unet2d.UNet2D`).
    plane : ``axial`` (slices along D), ``coronal`` (H) or ``sagittal`` (W).
    neighbors : condition slices on each side (2 for 2.5D models).
    batch_size : slices per network call.
    """

    def __init__(self, model: Any, plane: str, neighbors: int = 0, batch_size: int = 8) -> None:
        if int(batch_size) < 1:
            raise InputError(f"slice batch size must be at least 1, got {batch_size}")
        self.model = model
        self.plane = plane
        self.axis = plane_axis(plane)
        self.neighbors = int(neighbors)
        self.batch_size = int(batch_size)

    def __call__(self, noisy: Any, gamma: float, cond: VolumeConditioning,
                 feature_sink: Callable[[int, int, dict[int, Any]], None] | None = None) -> Any:
        """Noise estimate (1, D, H, W) for the noisy residual ``noisy`` (1, D, H, W) at level ``gamma``.

        With ``feature_sink``, the model's decoder features of every batch of slices
        ``start .. stop - 1`` are handed to ``feature_sink(start, stop, {factor: (S, C, rows/f,
        cols/f)})`` (detached) as soon as they exist, and batches are widened to a multiple of
        the coarsest feature factor so each one covers whole stride-f windows (method.md 4.5).
        """
        import torch

        if tuple(noisy.shape) != (1, *cond.shape):
            raise InputError(f"noisy state must have shape {(1, *cond.shape)}, got {tuple(noisy.shape)}")
        self.model.eval()
        n = cond.shape[self.axis]
        batch = self.batch_size
        if feature_sink is not None:
            multiple = self.model.required_divisor
            batch = -(-batch // multiple) * multiple
        out = torch.empty_like(noisy)
        # float64 keeps gamma == abar_t exact (MPS has no float64)
        g_dtype = torch.float32 if noisy.device.type == "mps" else torch.float64
        for start in range(0, n, batch):
            idx = list(range(start, min(start + batch, n)))
            with torch.no_grad():
                x = plane_network_input(
                    cond.conditions, cond.coords, cond.mask, noisy, self.plane, idx, self.neighbors
                )
                g = torch.full((len(idx),), float(gamma), dtype=g_dtype, device=x.device)
                if feature_sink is not None:
                    eps, features = self.model(x, g, return_features=True)
                else:
                    eps, features = self.model(x, g), None
                placed = eps[:, 0].movedim(0, self.axis).to(out.dtype)
                out[0].index_copy_(self.axis, torch.as_tensor(idx, device=out.device), placed)
            if feature_sink is not None:
                feature_sink(start, idx[-1] + 1, features)
        return out
