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
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import fields
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

import numpy as np
import torch

from orderlab.errors import OrderlabError
from orderlab.orderings._balance import Items, PairStream, widen
from orderlab.orderings.spec import OrderingSpec

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

    def __init__(self, spec: OrderingSpec) -> None: ...

    @property
    def epoch(self) -> int:
        """The current epoch: -1 before the first ``begin_epoch``."""
        ...

    def begin_epoch(self) -> torch.Tensor: ...

    def observe(self, grads: Items) -> None: ...

    def observe_items(self, items: Items) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


ORDERINGS: dict[str, type[Ordering]] = {}
_OrderingClass = TypeVar("_OrderingClass", bound=type[Ordering])


def register_ordering(name: str) -> Callable[[_OrderingClass], _OrderingClass]:
    """Class decorator adding an ordering to the registry under ``name``."""

    def add(cls: _OrderingClass) -> _OrderingClass:
        if name in ORDERINGS:
            raise ValueError(f"ordering {name!r} is registered twice")
        ORDERINGS[name] = cls
        return cls

    return add


def ordering_class(name: str) -> type[Ordering]:
    """The registered class for ``name``.

    Raises:
        OrderlabError: ``name`` is not a registered ordering.
    """
    if name not in ORDERINGS:
        raise OrderlabError(f"ordering.name={name!r} is unknown; known: {', '.join(sorted(ORDERINGS))}")
    return ORDERINGS[name]


def make_ordering(name: str, spec: OrderingSpec | None = None, **settings: Any) -> Ordering:
    """Build the ordering ``name`` from ``spec``, or from the ``OrderingSpec`` fields given by keyword.

    ``make_ordering("cd-grab", num_workers=4, shard_size=1000, dim=64, seed=0)`` is
    ``make_ordering("cd-grab", OrderingSpec(num_workers=4, shard_size=1000, dim=64, seed=0))``.

    Args:
        name: one of ``ORDERINGS`` (with-replacement, rr, so, flipflop, grab, pair-balance, cd-grab).
        spec: the settings (``OrderingSpec``); or none, and its fields as keywords.

    Raises:
        OrderlabError: unknown name, an unknown or invalid setting, both a spec and keywords, or a
            gradient ordering without dim.
    """
    cls = ordering_class(name)
    if spec is None:
        unknown = sorted(set(settings) - {f.name for f in fields(OrderingSpec)})
        if unknown:
            known = ", ".join(f.name for f in fields(OrderingSpec))
            raise OrderlabError(f"make_ordering: unknown setting(s) {', '.join(unknown)}; known: {known}")
        spec = OrderingSpec(**settings)
    elif settings:
        raise OrderlabError(
            f"make_ordering: give a spec or settings by keyword, not both ({', '.join(settings)})"
        )
    if cls.needs_gradients and spec.dim < 1:
        raise OrderlabError(f"ordering {name!r} needs gradients: dim={spec.dim} must be >= 1")
    return cls(spec)


def order_digest(orders: np.ndarray) -> str:
    """sha256 of an epoch's orders (int64 [num_workers, shard_size]): equal digests, equal orders."""
    return hashlib.sha256(np.ascontiguousarray(orders, dtype=np.int64).data).hexdigest()


# an ordering registers itself by being a module of this package (imported here, after the registry)
for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name != "spec":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "ORDERINGS",
    "MessageKind",
    "Ordering",
    "OrderingSpec",
    "PairStream",
    "make_ordering",
    "order_digest",
    "ordering_class",
    "register_ordering",
    "widen",
]
