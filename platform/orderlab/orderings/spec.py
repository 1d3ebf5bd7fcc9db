"""The settings every ordering is built from: one frozen value passed through ``make_ordering``, the
order server and the sweep."""

from __future__ import annotations

from dataclasses import dataclass

from orderlab.errors import OrderlabError


@dataclass(frozen=True)
class OrderingSpec:
    """What an ordering needs besides its name (docs/orderings.md).

    Attributes:
        num_workers: W, the number of data-parallel workers (>= 1).
        shard_size: n, units per worker shard (>= 1).
        dim: d, length of a unit's flattened gradient (or of its sketch); > 0 for gradient orderings.
        seed: experiment seed; per-worker randomness comes from (seed, rank, epoch).
        first_epoch: ``"random"`` (a seeded permutation per worker) or ``"identity"``.
        balance: ``"deterministic"`` (ε=+1 iff <r,v> < 0) or ``"probabilistic"`` (self-balancing walk).
        balance_c: the probabilistic walk's constant c (> 0).
        threads: threads the deterministic rule balances on (>= 1; capped at numba's
            ``NUMBA_NUM_THREADS``): each pass over r is split by coordinates when d >=
            ``PARALLEL_MIN_DIM``. The orders do not depend on it.

    Raises:
        OrderlabError: a value out of range or unknown, naming the setting.
    """

    num_workers: int
    shard_size: int
    dim: int = 0
    seed: int = 0
    first_epoch: str = "random"
    balance: str = "deterministic"
    balance_c: float = 30.0
    threads: int = 1

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise OrderlabError(f"num_workers={self.num_workers} must be >= 1")
        if self.shard_size < 1:
            raise OrderlabError(f"shard_size={self.shard_size} must be >= 1 (units per worker)")
        if self.dim < 0:
            raise OrderlabError(f"dim={self.dim} must be >= 0")
        if self.first_epoch not in ("random", "identity"):
            raise OrderlabError(
                f"ordering.first_epoch={self.first_epoch!r} is unknown; known: identity, random"
            )
        if self.balance not in ("deterministic", "probabilistic"):
            raise OrderlabError(
                f"ordering.balance={self.balance!r} is unknown; known: deterministic, probabilistic"
            )
        if self.balance_c <= 0:
            raise OrderlabError(f"ordering.balance_c={self.balance_c} must be > 0")
        if self.threads < 1:
            raise OrderlabError(f"ordering.server_threads={self.threads} must be ≥ 1")
