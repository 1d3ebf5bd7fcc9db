"""Drop-in samplers for a user's own training loop: plain PyTorch, DDP under ``torchrun``, Ray Train.

``OrderedSampler`` (one process) and ``DistributedOrderedSampler`` (one per rank) yield the indices of
each epoch in the order a registered ordering gives (docs/orderings.md), and learn the next epoch's
order from the gradients the loop hands to ``observe``. They run ``orderlab.orderings`` as they are,
fed what a worker of an orderlab trial sends its order server (pair differences, or unit gradients
for ``grab``, optionally CountSketched). No Ray is imported; docs/samplers.md is the guide.

Passes and epochs (the same for both classes):

- ``iter(sampler)`` starts a pass and fixes its order there. A pass begins the next epoch when the
  current one has been used: some unit of it observed, or, for an ordering that needs no gradients,
  a pass over it ran to its end. Otherwise it repeats the current epoch's order, so a dry pass over
  the loader before training changes nothing. ``set_epoch(e)`` asks for epoch ``e`` instead.
- ``observe(grads)`` counts units against the current epoch, in the order the pass yielded them,
  in any chunking (pairs and exchange blocks straddle calls; gradient accumulation works).
- An epoch left before all its units were observed (a loop cut short, a DataLoader's
  ``drop_last``) is completed with zero gradients for the rest, with a warning. A gradient ordering
  whose epoch has nothing observed keeps its order (a warning from the third pass, or at once when
  ``set_epoch`` asks to move on).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from orderlab.errors import OrderlabError
from orderlab.grads import CountSketch, assign_flat_gradient, microbatch_gradient, per_example_gradients
from orderlab.orderings import ORDERINGS, PairStream, make_ordering, ordering_class
from orderlab.wire import PAYLOAD_DTYPES

#: orderings whose state is per worker: with the deterministic sign rule a rank runs its own shard's
#: ordering alone, with no communication (docs/orderings.md: "independently per worker")
RANK_LOCAL = ("pair-balance", "grab")
#: units zero-filled per call when an epoch is completed without its gradients (bounds the memory)
FILL_UNITS = 256


@dataclass(frozen=True)
class ShardPlan:
    """Which examples a rank orders: equal contiguous shards of whole units, as orderlab's trials.

    Unit u is examples ``[u * unit_size, (u + 1) * unit_size)``; rank r owns units
    ``[r * shard_size, (r + 1) * shard_size)``. The examples past ``num_replicas * shard_size`` units
    are dropped every epoch (``num_dropped``).
    """

    num_replicas: int
    rank: int
    unit_size: int
    shard_size: int
    num_dropped: int

    def examples(self, units: np.ndarray) -> list[int] | list[list[int]]:
        """The dataset indices of local ``units`` (int64 [m]): one int per unit, or a list per unit."""
        first = (self.rank * self.shard_size + units) * self.unit_size
        if self.unit_size == 1:
            return first.tolist()
        return (first[:, None] + np.arange(self.unit_size)).tolist()


def plan_shards(
    num_examples: int,
    *,
    num_replicas: int,
    rank: int,
    unit: str,
    microbatch_size: int | None,
    batch_size: int | None,
) -> ShardPlan:
    """Cut ``num_examples`` into ``num_replicas`` equal shards of whole units (and whole steps when
    ``batch_size`` is given): the arithmetic of orderlab's ``plan_trial``.

    Raises:
        OrderlabError: an argument out of range, naming it and the fix.
    """
    if unit not in ("example", "microbatch"):
        raise OrderlabError(f"unit={unit!r} is unknown; known: example, microbatch")
    if unit == "microbatch" and (microbatch_size is None or microbatch_size < 1):
        raise OrderlabError(
            f"unit='microbatch' needs microbatch_size >= 1 (examples per unit), got {microbatch_size}"
        )
    if unit == "example" and microbatch_size is not None:
        raise OrderlabError(
            "microbatch_size applies to unit='microbatch' only; for unit='example' remove it "
            "(the DataLoader's batch_size sets the step, and batch_size= here cuts the tail to whole steps)"
        )
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise OrderlabError(f"rank={rank} must be in 0..num_replicas-1 with num_replicas={num_replicas} >= 1")
    unit_size = microbatch_size if unit == "microbatch" and microbatch_size is not None else 1
    units_per_step = 1
    if batch_size is not None:
        if batch_size < 1 or batch_size % unit_size:
            raise OrderlabError(
                f"batch_size={batch_size} (examples per step on each rank) must be a positive multiple "
                f"of the unit's {unit_size} examples"
            )
        units_per_step = batch_size // unit_size
    shard_size = num_examples // unit_size // num_replicas // units_per_step * units_per_step
    if shard_size < 1:
        raise OrderlabError(
            f"num_examples={num_examples} is fewer than num_replicas × examples per step = "
            f"{num_replicas} × {unit_size * units_per_step}; lower batch_size, microbatch_size or the ranks"
        )
    dropped = num_examples - num_replicas * shard_size * unit_size
    return ShardPlan(num_replicas, rank, unit_size, shard_size, dropped)


class _Exchange:
    """Every rank's items, all-gathered in fixed blocks of ``block_items`` with one exchange in flight.

    Blocks hold the same item indices on every rank whatever the chunking of ``observe`` (the last
    block of an epoch holds the rest), so every rank issues the same collectives in the same order.
    """

    def __init__(self, group: Any, num_replicas: int, block_items: int, payload_dtype: torch.dtype) -> None:
        self.group, self.num_replicas, self.block_items = group, num_replicas, block_items
        self.payload_dtype = payload_dtype
        self.pending = torch.empty(0, 0, dtype=payload_dtype)  # items not yet sent: [m, d]
        self.in_flight: tuple[Any, torch.Tensor] | None = None
        self.bytes_sent, self.wait_seconds = 0, 0.0

    def push(self, items: torch.Tensor, apply: Any) -> None:
        """Queue ``items`` [p, d] (payload dtype, copied) and send every full block."""
        self.pending = items.clone() if self.pending.numel() == 0 else torch.cat([self.pending, items])
        while len(self.pending) >= self.block_items:
            self.send(self.block_items, apply)

    def flush(self, apply: Any) -> None:
        """Send what is queued and wait for it: every item pushed so far is then applied."""
        if len(self.pending):
            self.send(len(self.pending), apply)
        self.complete(apply)

    def send(self, count: int, apply: Any) -> None:
        rows, self.pending = self.pending[:count].contiguous(), self.pending[count:]
        self.complete(apply)  # one exchange in flight: the previous block, launched a block ago
        if rows.dtype in (torch.float16, torch.bfloat16):
            rows = rows.view(torch.uint8)  # all_gather moves bits; gloo has no int16, some builds no bfloat16
        gathered = torch.empty(self.num_replicas, *rows.shape, dtype=rows.dtype)
        work = dist.all_gather(list(gathered.unbind(0)), rows, group=self.group, async_op=True)
        self.in_flight = (work, gathered)
        self.bytes_sent += rows.numel() * rows.element_size()

    def complete(self, apply: Any) -> None:
        if self.in_flight is None:
            return
        (work, gathered), self.in_flight = self.in_flight, None
        started = time.perf_counter()
        work.wait()
        self.wait_seconds += time.perf_counter() - started
        apply(gathered.view(self.payload_dtype))


class OrderedSampler(Sampler):
    """A ``torch.utils.data.Sampler`` whose epochs follow a registered ordering; one process.

    ``DataLoader(ds, batch_size=B, sampler=s)`` with ``unit="example"`` (yields indices); with
    ``unit="microbatch"`` it yields one list of ``microbatch_size`` consecutive indices per unit, for
    ``DataLoader(ds, batch_sampler=s)``. After each backward, ``s.observe(grads)`` with the gradients
    of the units just visited. See the module docstring for passes and epochs, docs/samplers.md for
    the guide.

    Args:
        num_examples: the dataset's length.
        ordering: a registered ordering (``orderlab.orderings.ORDERINGS``); ``cd-grab`` with one
            process equals ``pair-balance``.
        seed: the ordering's seed (first epoch, ``rr``'s permutations, probabilistic draws).
        unit: ``"example"`` (needs per-example gradients) or ``"microbatch"`` (one gradient per unit).
        microbatch_size: examples per unit for ``unit="microbatch"``; the tail of fewer is dropped.
        batch_size: examples per optimizer step; when given, the units are cut to whole steps as
            orderlab's trials do, so no step is partial (and ``drop_last`` has nothing to drop).
            Otherwise every unit is ordered and the last batch may be partial, which is fine: pairs
            straddle steps, and with an odd count the last unit takes the middle slot.
        dim: the gradients' length; taken from the first ``observe`` when None.
        sketch_dim: balance CountSketches of this length instead of the gradients (less work).
        first_epoch, balance, balance_c: the ordering's rules (``orderlab.orderings.OrderingSpec``).

    Attributes:
        epoch: the current epoch (-1 before the first pass). units_observed: its units observed.
        shard_size: units ordered per epoch. num_dropped: examples left out every epoch.

    Raises:
        OrderlabError: an argument out of range or unknown, naming it and the fix.
    """

    def __init__(
        self,
        num_examples: int,
        ordering: str = "pair-balance",
        seed: int = 0,
        *,
        unit: str = "example",
        microbatch_size: int | None = None,
        batch_size: int | None = None,
        dim: int | None = None,
        sketch_dim: int | None = None,
        first_epoch: str = "random",
        balance: str = "deterministic",
        balance_c: float = 30.0,
    ) -> None:
        plan = plan_shards(
            num_examples,
            num_replicas=1,
            rank=0,
            unit=unit,
            microbatch_size=microbatch_size,
            batch_size=batch_size,
        )
        self._setup(plan, ordering, seed, dim, sketch_dim, (first_epoch, balance, balance_c), None)

    def _setup(
        self,
        plan: ShardPlan,
        ordering: str,
        seed: int,
        dim: int | None,
        sketch_dim: int | None,
        rules: tuple[str, str, float],
        exchange: _Exchange | None,
    ) -> None:
        cls = ordering_class(ordering)
        if sketch_dim is not None and sketch_dim < 1:
            raise OrderlabError(f"sketch_dim={sketch_dim} must be >= 1, or None to balance the gradients")
        if dim is not None and dim < 1:
            raise OrderlabError(f"dim={dim} must be >= 1, or None to take it from the first observe")
        self.plan, self.ordering_name, self.seed = plan, ordering, seed
        self.needs_gradients: bool = cls.needs_gradients
        self.message_kind: str = cls.message_kind
        self.dim, self.sketch_dim, self.rules, self.exchange = dim, sketch_dim, rules, exchange
        # A rank-local ordering runs one worker, its first epoch the identity relabelled by this
        # rank's first order in the W-worker ordering: the same orders as orderlab's rank r.
        self.rank_local = exchange is None and self.needs_gradients and plan.num_replicas > 1
        self.ordering: Any = None if self.needs_gradients and dim is None else self._make(dim or 0)
        self.epoch, self.units_observed, self.order = -1, 0, np.empty(0, dtype=np.int64)
        self.relabel: np.ndarray | None = None
        if self.rank_local:
            first = make_ordering(ordering, **self._spec(plan.num_replicas, 1, rules[0])).begin_epoch()
            self.relabel = first[plan.rank].numpy()
        self.pairs, self.pair_buffer = PairStream(), torch.empty(0, 0)
        self.sketch: CountSketch | None = None  # made at the first rows, on their device
        self.passes, self.pass_id, self.pass_ended, self.resume = 0, 0, False, False
        self.requested_epoch: int | None = None

    @property
    def shard_size(self) -> int:
        return self.plan.shard_size

    @property
    def num_dropped(self) -> int:
        return self.plan.num_dropped

    def _spec(self, num_workers: int, dim: int, first_epoch: str) -> dict[str, Any]:
        _, balance, balance_c = self.rules
        return dict(
            num_workers=num_workers,
            shard_size=self.plan.shard_size,
            dim=dim,
            seed=self.seed,
            first_epoch=first_epoch,
            balance=balance,
            balance_c=balance_c,
        )

    def _make(self, dim: int) -> Any:
        """The ordering this rank runs, balancing vectors of length ``sketch_dim`` or ``dim``."""
        workers = 1 if self.rank_local or self.plan.num_replicas == 1 else self.plan.num_replicas
        first_epoch = "identity" if self.rank_local else self.rules[0]
        length = (self.sketch_dim or dim) if self.needs_gradients else 0
        return make_ordering(self.ordering_name, **self._spec(workers, length, first_epoch))

    def _local_order(self, orders: torch.Tensor) -> np.ndarray:
        if self.rank_local:
            assert self.relabel is not None
            return self.relabel[orders[0].numpy()]
        return orders[0 if orders.shape[0] == 1 else self.plan.rank].numpy().copy()

    # ----- passes and epochs -----------------------------------------------------------------

    def __len__(self) -> int:
        return self.plan.shard_size - (self.units_observed if self.resume else 0)

    def set_epoch(self, epoch: int) -> None:
        """Ask the next pass for ``epoch`` (DDP's habit). Orderings that need no gradients take any
        epoch ≥ 0; a gradient ordering takes the current epoch (a repeat, while nothing of it is
        observed) or the next one (its order is built from the current epoch's gradients)."""
        self.requested_epoch = epoch

    def __iter__(self) -> Iterator[Any]:
        """Start a pass: fix its order (the current epoch's, or the next one's; module docstring)."""
        start = 0
        if self.resume:  # after load_state_dict mid-epoch: the rest of the epoch
            self.resume, start = False, self.units_observed
            self._check_requested(self.epoch)
        else:
            self._begin_pass()
        self.pass_id += 1
        self.pass_ended = False
        return self._yield(self.order[start:], self.pass_id)

    def _yield(self, units: np.ndarray, pass_id: int) -> Iterator[Any]:
        yield from self.plan.examples(units)
        if pass_id == self.pass_id:
            self.pass_ended = True

    def _check_requested(self, epoch: int) -> None:
        requested, self.requested_epoch = self.requested_epoch, None
        if requested is not None and requested != epoch:
            raise OrderlabError(
                f"set_epoch({requested}) after load_state_dict: the state resumes epoch {epoch} mid-way; "
                f"call set_epoch({epoch})"
            )

    def _units_used(self) -> int:
        """Units observed this epoch; with an exchange, the most of any rank (they agree on moving on)."""
        if self.exchange is None:
            return self.units_observed
        count = torch.tensor([self.units_observed], dtype=torch.int64)
        dist.all_reduce(count, op=dist.ReduceOp.MAX, group=self.exchange.group)
        return int(count)

    def _begin_pass(self) -> None:
        requested, self.requested_epoch = self.requested_epoch, None
        if requested is not None and requested < 0:
            raise OrderlabError(f"set_epoch({requested}): epochs start at 0")
        used = self._units_used() > 0 or (not self.needs_gradients and self.pass_ended)
        warned = False
        if self.epoch < 0:
            self._advance()
            used = False
        target = requested if requested is not None else self.epoch + int(used)
        if not self.needs_gradients:
            if target < self.epoch:  # the permutations depend on the epochs before: replay them
                self.ordering, self.epoch = self._make(0), -1
            while self.epoch < target:
                self._advance()
        elif target == self.epoch + 1 and used:
            self._advance()
        elif target == self.epoch + 1:
            warned = True
            warnings.warn(
                f"set_epoch({target}): ordering {self.ordering_name!r} observed nothing of epoch "
                f"{self.epoch}, so it keeps that order (sampler.epoch stays {self.epoch}); call "
                "sampler.observe(grads) after each backward, or use an ordering that needs no gradients",
                RuntimeWarning,
                stacklevel=3,
            )
        elif target != self.epoch or used:
            raise OrderlabError(
                f"set_epoch({target}): ordering {self.ordering_name!r} is at epoch {self.epoch} with "
                f"{self.units_observed} of its {self.plan.shard_size} units observed; a gradient ordering "
                f"builds each epoch from the last one's gradients, so call set_epoch({self.epoch + 1}), "
                "or load_state_dict to resume"
            )
        self.passes += 1
        if self.needs_gradients and self.passes >= 3 and self.units_observed == 0 and not warned:
            warnings.warn(
                f"ordering {self.ordering_name!r} observed nothing in {self.passes - 1} passes over epoch "
                f"{self.epoch}, so its order does not change (one dry pass is fine); call "
                "sampler.observe(grads) after each backward",
                RuntimeWarning,
                stacklevel=3,
            )

    def _advance(self) -> None:
        """Begin the next epoch, completing the current one first."""
        if self.ordering is None:  # no gradient seen yet: epoch 0, whose order does not depend on dim
            assert self.epoch < 0
            orders = self._make(1).begin_epoch()
        else:
            if self.epoch >= 0 and self.needs_gradients:
                self._complete_epoch()
            orders = self.ordering.begin_epoch()
        self.epoch += 1
        self.units_observed, self.passes, self.pass_ended = 0, 0, False
        self.pairs.reset()  # odd shard size: the last unit pairs with nothing
        self.order = self._local_order(orders)

    def _complete_epoch(self) -> None:
        missing = self.plan.shard_size - self.units_observed
        if missing:
            warnings.warn(
                f"epoch {self.epoch}: {self.units_observed} of {self.plan.shard_size} units observed; the "
                f"other {missing} are balanced as zero gradients. Observe every batch (a DataLoader's "
                "drop_last drops the last partial one: pass batch_size= to the sampler instead)",
                RuntimeWarning,
                stacklevel=4,
            )
            assert self.dim is not None
            while self.units_observed < self.plan.shard_size:
                count = min(FILL_UNITS, self.plan.shard_size - self.units_observed)
                self.units_observed += count
                self._feed(torch.zeros(count, self.dim))
        if self.exchange is not None:
            self.exchange.flush(self._apply)

    # ----- gradients -------------------------------------------------------------------------

    def observe(self, grads: torch.Tensor) -> None:
        """Hand over the gradients of the units just visited, in the order the pass yielded them.

        Args:
            grads: [k, dim] (float32 or any float dtype, any device; read now, never kept): one row
                per unit, k ≥ 0 in any chunking; for ``unit="microbatch"`` also [dim], one unit.
                Orderings that need no gradients only count the k units (observing is optional).

        Raises:
            OrderlabError: no pass started yet, a wrong shape (naming expected and got), or more
                units than remain in the epoch.
        """
        if self.epoch < 0:
            raise OrderlabError("observe before the first pass: iterate the sampler (the DataLoader) first")
        units = torch.as_tensor(grads).detach()
        if units.ndim == 1 and self.plan.unit_size > 1:
            units = units.unsqueeze(0)
        expected = f"[k, dim={self.dim if self.dim is not None else 'd'}]"
        if units.ndim != 2 or self.dim is not None and units.shape[1] != self.dim:
            hint = " per-example gradients (per_example_gradients)" if units.ndim == 1 else ""
            raise OrderlabError(
                f"observe(grads): expected {expected}{hint}, one row per unit just visited; "
                f"got shape {list(units.shape)}"
            )
        remaining = self.plan.shard_size - self.units_observed
        if len(units) > remaining:
            raise OrderlabError(
                f"observe(grads): {len(units)} units, but only {remaining} of epoch {self.epoch}'s "
                f"{self.plan.shard_size} remain; observe each batch of the pass once, in order"
            )
        if not self.needs_gradients:
            self.units_observed += len(units)
            return
        if self.ordering is None:
            self._start_ordering(units.shape[1])
        self.units_observed += len(units)
        self._feed(units)
        if self.exchange is not None and self.units_observed == self.plan.shard_size:
            self.exchange.flush(self._apply)  # the epoch's last block, waited for at the next pass

    def _start_ordering(self, dim: int) -> None:
        self.dim, self.ordering = dim, self._make(dim)
        orders = self.ordering.begin_epoch()
        assert np.array_equal(self._local_order(orders), self.order), "epoch 0 does not depend on dim"

    def _feed(self, units: torch.Tensor) -> None:
        """Form this rank's items from unit gradients [k, d] and balance them (or queue them)."""
        units = units.to(torch.float32)
        rows = self._differences(units) if self.message_kind == "pair_differences" else units
        if not len(rows):
            return
        if self.sketch_dim is not None:
            if self.sketch is None:
                assert self.dim is not None
                self.sketch = CountSketch(self.dim, self.sketch_dim, self.seed, device=rows.device)
            rows = self.sketch(rows)
        if self.exchange is None:
            self.ordering.observe_items(rows.unsqueeze(0))  # on a GPU, balanced there
        else:
            self.exchange.push(rows.to("cpu", self.exchange.payload_dtype), self._apply)

    def _differences(self, units: torch.Tensor) -> torch.Tensor:
        """The pairs completed by ``units`` [k, d]: g_first - g_second [p, d], written into a buffer
        reused across calls (fresh memory each step costs page faults), as ``PairBalance.observe``."""
        blocks = self.pairs.pairs(units)  # views: the pair straddling the last call, then this call's
        if self.pairs.pending is not None:  # keep the open pair's unit: the caller may reuse grads
            self.pairs.pending = self.pairs.pending.clone()
        num_pairs = sum(len(firsts) for firsts, _ in blocks)
        if len(self.pair_buffer) < num_pairs or self.pair_buffer.device != units.device:
            self.pair_buffer = torch.empty(num_pairs, units.shape[1], device=units.device)
        out, start = self.pair_buffer[:num_pairs], 0
        for firsts, seconds in blocks:
            torch.sub(firsts, seconds, out=out[start : start + len(firsts)])
            start += len(firsts)
        return out

    def _apply(self, items: torch.Tensor) -> None:
        self.ordering.observe_items(items)

    # ----- checkpoints -----------------------------------------------------------------------

    def _identity(self) -> dict[str, Any]:
        plan = self.plan
        return {
            "ordering": self.ordering_name,
            "seed": self.seed,
            "num_replicas": plan.num_replicas,
            "rank": plan.rank,
            "unit_size": plan.unit_size,
            "shard_size": plan.shard_size,
            "sketch_dim": self.sketch_dim,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything to resume exactly, mid-epoch too (save each rank's own). With an exchange this
        waits for the one in flight, so every rank calls it at the same point (as DDP checkpoints)."""
        if self.exchange is not None and self.ordering is not None:
            self.exchange.complete(self._apply)
        return {
            **self._identity(),
            "dim": self.dim,
            "epoch": self.epoch,
            "units_observed": self.units_observed,
            "order": torch.from_numpy(self.order.copy()),
            "ordering_state": None if self.ordering is None else self.ordering.state_dict(),
            "open_unit": None if self.pairs.pending is None else self.pairs.pending.clone(),
            "unsent": None if self.exchange is None else self.exchange.pending.clone(),
            "passes": self.passes,
            "pass_ended": self.pass_ended,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``; mid-epoch, the next pass yields the rest of that epoch.

        Raises:
            OrderlabError: the state was saved by a sampler of another ordering, seed, rank or size.
        """
        saved = {key: state.get(key) for key in self._identity()}
        if saved != self._identity():
            differ = ", ".join(
                f"{k}={saved[k]!r} (here {v!r})" for k, v in self._identity().items() if saved[k] != v
            )
            raise OrderlabError(f"load_state_dict: the state is of another sampler: {differ}; build it alike")
        self.dim = state["dim"]
        self.ordering = None if state["ordering_state"] is None else self._make(self.dim or 0)
        if self.ordering is not None:
            self.ordering.load_state_dict(state["ordering_state"])
        self.epoch, self.units_observed = int(state["epoch"]), int(state["units_observed"])
        self.order = state["order"].numpy().copy()
        self.pairs.pending = None if state["open_unit"] is None else state["open_unit"].clone()
        if self.exchange is not None and state["unsent"] is not None:
            self.exchange.pending = state["unsent"].clone()
        self.passes, self.pass_ended = int(state["passes"]), bool(state["pass_ended"])
        self.resume = 0 < self.units_observed < self.plan.shard_size


class DistributedOrderedSampler(OrderedSampler):
    """``OrderedSampler`` for one rank of a data-parallel job (DDP under ``torchrun``, a Ray Train
    worker): the rank's equal contiguous shard of whole units, ordered as orderlab's worker ``rank``.

    Communication, per ordering:

    - orderings that need no gradients (``rr``, ``so``, ...): none; each rank draws from
      (seed, rank, epoch) as orderlab does.
    - ``pair-balance`` and ``grab`` (ID-GraB) with the deterministic sign: none; each rank
      balances its own shard (the same orders as orderlab's W-worker ordering gives that rank).
    - ``cd-grab``, and any other gradient ordering (or the probabilistic sign): every rank's items
      (pair differences g_first − g_second; unit gradients for ``grab``), optionally CountSketched
      to ``sketch_dim`` and cast to ``payload_dtype``, are all-gathered in blocks of
      ``exchange_items`` on a gloo group of their own, so every rank holds the same coordinated
      state and gets exactly orderlab's CD-GraB orders for the same gradients.

    Cost of the exchange, per step of k units per rank: k/2 items of d' = ``sketch_dim`` or d
    values sent (k/2 · d' · 4 bytes in float32, half in float16/bfloat16) and (W − 1) times that
    received; balancing W · k/2 vectors of length d' on every rank. Where it blocks: the observe
    that fills a block waits for the previous block's all_gather (launched a block earlier, so
    normally done) and balances it; the first pass of an epoch waits for the epoch's last block and
    all-reduces one int (do the ranks move on?). Nothing else waits. ``bytes_sent`` and
    ``wait_seconds`` count it.

    Every rank must build the sampler, iterate it and call ``state_dict`` at the same points (as a
    DDP loop does); ``observe`` may be chunked differently per rank. Ray Train:
    ``ray.train.torch.prepare_data_loader`` replaces a loader's sampler with a
    ``DistributedSampler`` unless called with ``add_dist_sampler=False``; keep this sampler with
    ``prepare_data_loader(loader, add_dist_sampler=False)``.

    Args:
        num_examples, ordering, seed, unit, microbatch_size, batch_size, dim, sketch_dim,
        first_epoch, balance, balance_c: as ``OrderedSampler`` (``batch_size``: per rank).
        num_replicas, rank: W and this rank; from the default process group when None.
        group: the process group to exchange on; None: a new gloo group of all ranks (built here,
            a collective call), so the exchange never interleaves with DDP's own collectives.
        exchange_items: items per all_gather block (the same on every rank).
        payload_dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``: the exchanged items' type.

    Attributes:
        rank, num_replicas; shard_size, num_dropped (examples no rank visits); bytes_sent,
        wait_seconds (of the exchange, 0 without one).

    Raises:
        OrderlabError: an argument out of range, or an exchange without a process group.
    """

    def __init__(
        self,
        num_examples: int,
        ordering: str = "cd-grab",
        seed: int = 0,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
        group: Any = None,
        exchange_items: int = 32,
        payload_dtype: str = "float32",
        unit: str = "example",
        microbatch_size: int | None = None,
        batch_size: int | None = None,
        dim: int | None = None,
        sketch_dim: int | None = None,
        first_epoch: str = "random",
        balance: str = "deterministic",
        balance_c: float = 30.0,
    ) -> None:
        initialized = dist.is_available() and dist.is_initialized()
        if (num_replicas is None or rank is None) and not initialized:
            raise OrderlabError(
                "DistributedOrderedSampler: no torch.distributed process group; call "
                "torch.distributed.init_process_group first (torchrun, DDP and Ray Train do), or give "
                "num_replicas= and rank="
            )
        num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
        rank = dist.get_rank() if rank is None else rank
        plan = plan_shards(
            num_examples,
            num_replicas=num_replicas,
            rank=rank,
            unit=unit,
            microbatch_size=microbatch_size,
            batch_size=batch_size,
        )
        if payload_dtype not in PAYLOAD_DTYPES:
            raise OrderlabError(
                f"payload_dtype={payload_dtype!r} is unknown; known: {', '.join(PAYLOAD_DTYPES)}"
            )
        if exchange_items < 1:
            raise OrderlabError(f"exchange_items={exchange_items} must be >= 1 (items per all_gather)")
        cls = ordering_class(ordering)
        needs_exchange = cls.needs_gradients and num_replicas > 1
        needs_exchange &= not (ordering in RANK_LOCAL and balance == "deterministic")
        exchange = None
        if needs_exchange:
            if not initialized:
                raise OrderlabError(
                    f"ordering={ordering!r} exchanges items between ranks with torch.distributed: call "
                    "torch.distributed.init_process_group before building the sampler"
                )
            group = dist.new_group(backend="gloo") if group is None else group
            exchange = _Exchange(group, num_replicas, exchange_items, PAYLOAD_DTYPES[payload_dtype])
        self.rank, self.num_replicas = rank, num_replicas
        self._setup(plan, ordering, seed, dim, sketch_dim, (first_epoch, balance, balance_c), exchange)

    @property
    def bytes_sent(self) -> int:
        return 0 if self.exchange is None else self.exchange.bytes_sent

    @property
    def wait_seconds(self) -> float:
        return 0.0 if self.exchange is None else self.exchange.wait_seconds


__all__ = [
    "ORDERINGS",
    "DistributedOrderedSampler",
    "OrderedSampler",
    "ShardPlan",
    "assign_flat_gradient",
    "microbatch_gradient",
    "per_example_gradients",
    "plan_shards",
]
