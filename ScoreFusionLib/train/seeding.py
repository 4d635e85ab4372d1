"""Counter-based seeds: every random draw of training is a pure function of its coordinates.

A resumed run must draw exactly what an uninterrupted run would have drawn (method.md
pitfall 6), and a two-process run must draw what a one-process run draws. Both follow if no
random stream carries state from one step to the next: each draw gets a fresh generator
seeded from ``(seed, plane, purpose, counter)`` instead.
"""

from __future__ import annotations

import hashlib
from typing import Union

Key = Union[int, str]

#: Purposes that name the independent streams of a plane's training.
PURPOSES = ("init", "kaiming", "data", "noise", "dropout", "validation")


def derive_seed(seed: int, *keys: Key) -> int:
    """A 63-bit seed for the stream named by ``keys`` under the run seed ``seed``.

    Hash-based (blake2b of the canonical text of the keys), so it is identical in every
    process and Python session, unlike ``hash()``; distinct keys give unrelated streams.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    parts = [str(int(seed))]
    for k in keys:
        if isinstance(k, bool) or not isinstance(k, (int, str)):
            raise TypeError(f"seed keys must be ints or strings, got {k!r}")
        parts.append(f"{type(k).__name__}:{k}")
    digest = hashlib.blake2b("\x1f".join(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def torch_generator(seed: int, *keys: Key):  # -> torch.Generator
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed` (draws are device independent)."""
    import torch

    return torch.Generator(device="cpu").manual_seed(derive_seed(seed, *keys))


def numpy_generator(seed: int, *keys: Key):  # -> numpy.random.Generator
    """A numpy ``Generator`` seeded with :func:`derive_seed`."""
    import numpy as np

    return np.random.default_rng(derive_seed(seed, *keys))
