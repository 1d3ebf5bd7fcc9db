"""Seeded generators: every source of randomness comes from ``rng_for(seed, rank, epoch, purpose)``."""

from __future__ import annotations

import numpy as np
import torch

#: purposes keep independent streams apart for the same (seed, rank, epoch)
ORDER = 0  # permutations: first epoch, rr, so, flipflop, with-replacement
BALANCE = 1  # probabilistic balancing draws
DATA = 2  # data splits and subsamples
MODEL = 3  # model initialisation
SKETCH = 4  # gradient sketch projections


def seed_for(seed: int, rank: int, epoch: int, purpose: int = ORDER) -> int:
    """A 63-bit seed derived from (seed, rank, epoch, purpose) with numpy's SeedSequence.

    Args:
        seed: the experiment seed (non-negative).
        rank: worker rank (0-based); orderings with one shared state use rank 0.
        epoch: epoch number (0-based).
        purpose: one of ORDER, BALANCE, DATA, MODEL.
    """
    state = np.random.SeedSequence([seed, rank, epoch, purpose]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def rng_for(seed: int, rank: int, epoch: int, purpose: int = ORDER) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from (seed, rank, epoch, purpose); see ``seed_for``."""
    return torch.Generator().manual_seed(seed_for(seed, rank, epoch, purpose))
