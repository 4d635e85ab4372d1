"""torchrun / DistributedDataParallel plumbing: who am I, which device, how batches split.

A run is distributed when ``WORLD_SIZE > 1`` in the environment (``torchrun`` sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``). The process
group uses gloo on CPU and nccl on CUDA (one GPU per process, ``cuda:LOCAL_RANK``). A plain
``python`` process (no such variables) runs as rank 0 of 1 and never touches
``torch.distributed``. Only rank 0 writes files and shows progress.

The **global** batch of every step is split into equal, contiguous, disjoint shares, one per
rank (:func:`shard_range`), and DDP averages the gradients, so N processes with global batch
B follow the same trajectory as one process with batch B (up to float summation order).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..errors import InputError


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run.

    ``backend`` is ``None`` for a single process; ``owns_group`` says whether
    :func:`init_distributed` created the process group (and :func:`shutdown` destroys it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    backend: str | None = None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int | None = None) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise InputError(f"environment variable {name}={raw!r} is not an integer") from None


def world_from_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the torchrun environment; ``(0, 1, 0)`` without it."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise InputError(f"inconsistent distributed environment: RANK={rank}, WORLD_SIZE={world}, "
                         f"LOCAL_RANK={local}")
    return rank, world, local


def shard_range(global_batch: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[lo, hi)`` of the global batch that ``rank`` trains on (equal contiguous shares)."""
    if global_batch % world_size:
        raise InputError(
            f"the global batch {global_batch} cannot be split evenly over {world_size} processes; "
            f"use a --batch-size that is a multiple of {world_size}"
        )
    share = global_batch // world_size
    return rank * share, (rank + 1) * share


def resolve_device(request: str, local_rank: int = 0, distributed: bool = False) -> str:
    """``auto``/``cpu``/``cuda`` -> a concrete torch device string for this process."""
    import torch

    if request not in ("auto", "cpu", "cuda"):
        raise InputError(f"unknown device {request!r}; use auto, cpu or cuda")
    has_cuda = torch.cuda.is_available()
    if request == "cuda" and not has_cuda:
        raise InputError("--device cuda was requested but no CUDA device is available")
    if request == "cpu" or not has_cuda:
        return "cpu"
    if distributed:
        if local_rank >= torch.cuda.device_count():
            raise InputError(f"LOCAL_RANK {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                             "start at most one process per GPU")
        return f"cuda:{local_rank}"
    return "cuda"


def plan_context(device: str = "auto") -> DistContext:
    """The context this process will run in, without initialising anything (for validation)."""
    rank, world, local = world_from_env()
    dev = resolve_device(device, local, world > 1)
    backend = None if world == 1 else ("nccl" if dev.startswith("cuda") else "gloo")
    return DistContext(rank, world, local, dev, backend, False)


def init_distributed(device: str = "auto") -> DistContext:
    """Join the torchrun process group (if ``WORLD_SIZE > 1``) and pick this rank's device.

    Reuses a process group that the caller already initialised.
    """
    ctx = plan_context(device)
    if not ctx.distributed:
        return ctx
    import torch
    import torch.distributed as dist

    if ctx.device.startswith("cuda"):
        torch.cuda.set_device(ctx.local_rank)
    if dist.is_initialized():
        if dist.get_world_size() != ctx.world_size or dist.get_rank() != ctx.rank:
            raise InputError("an existing process group disagrees with RANK/WORLD_SIZE")
        return ctx
    dist.init_process_group(backend=ctx.backend, init_method="env://")
    return DistContext(ctx.rank, ctx.world_size, ctx.local_rank, ctx.device, ctx.backend, True)


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op for a single process)."""
    if not ctx.distributed:
        return
    import torch.distributed as dist

    if ctx.backend == "nccl":
        dist.barrier(device_ids=[ctx.local_rank])
    else:
        dist.barrier()


def all_reduce_mean(tensor: Any, ctx: DistContext) -> Any:
    """Mean of ``tensor`` over ranks (in place; the input for a single process)."""
    if not ctx.distributed:
        return tensor
    import torch.distributed as dist

    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    tensor /= ctx.world_size
    return tensor


def wrap_model(model: Any, ctx: DistContext) -> Any:
    """``DistributedDataParallel(model)`` when distributed, else ``model``."""
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if ctx.device.startswith("cuda"):
        return DistributedDataParallel(model, device_ids=[ctx.local_rank], output_device=ctx.local_rank)
    return DistributedDataParallel(model)


def unwrap_model(model: Any) -> Any:
    """The network inside a DDP wrapper (or the network itself)."""
    return getattr(model, "module", model)


def shutdown(ctx: DistContext) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if ctx.owns_group:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
