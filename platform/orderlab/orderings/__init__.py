"""Example orderings of docs/orderings.md: pure torch/numpy, no Ray, no I/O.

Every ordering follows one small protocol::

    o = make_ordering("cd-grab", num_workers=4, shard_size=1000, dim=64, seed=0)
    orders = o.begin_epoch()   # LongTensor [num_workers, shard_size]: the epoch's visiting orders
    o.observe(grads)           # grads [num_workers, k, dim] float32: the next k units of every worker
    o.state_dict(); o.load_state_dict(state)

Orderings that need gradients also accept worker-side reductions through ``observe_items``
(pair differences for ``pair-balance``/``cd-grab``, raw unit gradients for ``grab``); the
``message_kind`` attribute says which. Both take a tensor [num_workers, k, dim] or one array
[k, dim] per worker, float32 or a half-precision wire format (``_balance.rank_arrays``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch

from orderlab.errors import OrderlabError
from orderlab.orderings._balance import Items, PairStream, set_balance_threads, widen

MessageKind = Literal["none", "unit_gradients", "pair_differences"]


@runtime_checkable
class Ordering(Protocol):
    """What every ordering offers (docs/architecture.md, public contract)."""

    name: str
    num_workers: int
    shard_size: int
    needs_gradients: bool
    message_kind: MessageKind
    #: items one worker sends per epoch: shard_size units, or shard_size // 2 pairs, or 0
    items_per_epoch: int
    epoch: int

    def begin_epoch(self) -> torch.Tensor: ...

    def observe(self, grads: Items) -> None: ...

    def observe_items(self, items: Items) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


ORDERINGS: dict[str, type] = {}


def register_ordering(name: str) -> Callable[[type], type]:
    """Class decorator adding an ordering to the registry under ``name``."""

    def add(cls: type) -> type:
        if name in ORDERINGS:
            raise ValueError(f"ordering {name!r} is registered twice")
        ORDERINGS[name] = cls
        return cls

    return add


def ordering_class(name: str) -> type:
    """The registered class for ``name``.

    Raises:
        OrderlabError: ``name`` is not a registered ordering.
    """
    if name not in ORDERINGS:
        raise OrderlabError(f"ordering.name={name!r} is unknown; known: {', '.join(sorted(ORDERINGS))}")
    return ORDERINGS[name]


def make_ordering(
    name: str,
    *,
    num_workers: int,
    shard_size: int,
    dim: int = 0,
    seed: int = 0,
    first_epoch: str = "random",
    balance: str = "deterministic",
    balance_c: float = 30.0,
) -> Ordering:
    """Build the ordering ``name`` for ``num_workers`` shards of ``shard_size`` units each.

    Args:
        name: one of ``ORDERINGS`` (with-replacement, rr, so, flipflop, grab, pair-balance, cd-grab).
        num_workers: W, the number of data-parallel workers (>= 1).
        shard_size: n, units per worker shard (>= 1).
        dim: d, length of a unit's flattened gradient; required (> 0) for gradient orderings.
        seed: experiment seed; per-worker randomness comes from (seed, rank, epoch).
        first_epoch: ``"random"`` (a seeded permutation per worker) or ``"identity"``.
        balance: ``"deterministic"`` (ε=+1 iff <r,v> < 0) or ``"probabilistic"`` (self-balancing walk).
        balance_c: the probabilistic walk's constant c (> 0).

    Raises:
        OrderlabError: unknown name or an invalid argument value.
    """
    cls = ordering_class(name)
    if num_workers < 1:
        raise OrderlabError(f"num_workers={num_workers} must be >= 1")
    if shard_size < 1:
        raise OrderlabError(f"shard_size={shard_size} must be >= 1 (units per worker)")
    if first_epoch not in ("random", "identity"):
        raise OrderlabError(f"ordering.first_epoch={first_epoch!r} is unknown; known: identity, random")
    if balance not in ("deterministic", "probabilistic"):
        raise OrderlabError(f"ordering.balance={balance!r} is unknown; known: deterministic, probabilistic")
    if balance_c <= 0:
        raise OrderlabError(f"ordering.balance_c={balance_c} must be > 0")
    if cls.needs_gradients and dim < 1:
        raise OrderlabError(f"ordering {name!r} needs gradients: dim={dim} must be >= 1")
    return cls(
        num_workers=num_workers,
        shard_size=shard_size,
        dim=dim,
        seed=seed,
        first_epoch=first_epoch,
        balance=balance,
        balance_c=balance_c,
    )


def order_digest(orders: np.ndarray) -> str:
    """sha256 of an epoch's orders (int64 [num_workers, shard_size]): equal digests, equal orders."""
    return hashlib.sha256(np.ascontiguousarray(orders, dtype=np.int64)).hexdigest()


# registration happens on import; keep these after the registry
from orderlab.orderings import grab, pair_balance, permutations  # noqa: E402,F401

__all__ = [
    "ORDERINGS",
    "MessageKind",
    "Ordering",
    "PairStream",
    "make_ordering",
    "order_digest",
    "ordering_class",
    "register_ordering",
    "set_balance_threads",
    "widen",
]
