"""Orderings against brute-force references written from docs/orderings.md (not from the implementation).

The references below loop unit by unit in float64 numpy; the implementation keeps float32 running
sums, so inputs are random Gaussian vectors (no near-ties). Probabilistic balancing uses the
documented draw protocol: one ``rng_for(seed, sum_index, epoch, BALANCE)`` generator per running sum
for the balancing done while observing ``epoch``, one ``torch.rand`` draw per decision.
"""

from __future__ import annotations

import io
import pkgutil
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch

from orderlab.errors import OrderlabError
from orderlab.herding import herding_bound, parallel_herding_bound
from orderlab.orderings import ORDERINGS, OrderingSpec, make_ordering
from orderlab.seeding import BALANCE, ORDER, rng_for

GRADIENT_ORDERINGS = ("grab", "pair-balance", "cd-grab")
ALL_ORDERINGS = ("with-replacement", "rr", "so", "flipflop", "grab", "pair-balance", "cd-grab")
# (W, n, d): W = 1, odd n, n = 1 and n = 2 edge cases
SHAPES = [(1, 6, 3), (1, 7, 2), (3, 8, 5), (4, 9, 3), (2, 2, 4), (3, 1, 2)]
NUM_EPOCHS = 3  # epochs observed; orders of epochs 0..3 are compared


# --------------------------------------------------------------------------------------------------
# Brute-force reference (docs/orderings.md)
# --------------------------------------------------------------------------------------------------


class ReferenceSign:
    """ε for one epoch: deterministic (+1 iff <r,v> < 0) or the self-balancing walk."""

    def __init__(self, balance: str, balance_c: float, seed: int, epoch: int, num_sums: int) -> None:
        self.balance = balance
        self.balance_c = balance_c
        self.generators = [rng_for(seed, s, epoch, BALANCE) for s in range(num_sums)]

    def __call__(self, sum_index: int, running_sum: np.ndarray, v: np.ndarray) -> int:
        inner = float(np.dot(running_sum, v))
        if self.balance == "deterministic":
            return 1 if inner < 0 else -1
        p = min(max(0.5 - inner / (2.0 * self.balance_c), 0.0), 1.0)
        u = float(torch.rand((), generator=self.generators[sum_index]))
        return 1 if u < p else -1


def reference_first_orders(num_workers: int, n: int, seed: int, first_epoch: str) -> np.ndarray:
    if first_epoch == "identity":
        return np.tile(np.arange(n), (num_workers, 1))
    return np.stack(
        [torch.randperm(n, generator=rng_for(seed, w, 0, ORDER)).numpy() for w in range(num_workers)]
    )


def reference_grab_epoch(order, vectors, mean, sign):
    """MeanBalance per worker. Returns (next order, this epoch's mean, signs in visiting order)."""
    num_workers, n = order.shape
    nxt = np.full((num_workers, n), -1)
    signs = np.zeros((num_workers, n), dtype=int)
    for w in range(num_workers):  # worker-major on purpose: the sums are independent
        left, right, r = 0, n - 1, np.zeros(vectors.shape[2])
        for t in range(n):
            a = order[w, t]
            c = vectors[w, a] - mean[w]
            eps = sign(w, r, c)
            signs[w, t] = eps
            if eps > 0:
                nxt[w, left] = a
                left += 1
            else:
                nxt[w, right] = a
                right -= 1
            r = r + eps * c
    return nxt, vectors.mean(axis=1), signs


def reference_pair_balance_epoch(order, vectors, sign):
    """PairBalance with one running sum per worker (worker-major loop: the sums are independent)."""
    num_workers, n = order.shape
    nxt = np.full((num_workers, n), -1)
    for w in range(num_workers):
        r = np.zeros(vectors.shape[2])
        for p in range(n // 2):
            a, b = order[w, 2 * p], order[w, 2 * p + 1]
            v = vectors[w, a] - vectors[w, b]
            eps = sign(w, r, v)
            nxt[w, p], nxt[w, n - 1 - p] = (a, b) if eps > 0 else (b, a)
            r = r + eps * v
        if n % 2:
            nxt[w, n // 2] = order[w, n - 1]
    return nxt


def reference_cd_grab_epoch(order, vectors, sign):
    """CD-GraB: one running sum, pair-major rank-minor, shared L = p and R = n-1-p."""
    num_workers, n = order.shape
    nxt = np.full((num_workers, n), -1)
    r = np.zeros(vectors.shape[2])
    for p in range(n // 2):
        for w in range(num_workers):
            a, b = order[w, 2 * p], order[w, 2 * p + 1]
            v = vectors[w, a] - vectors[w, b]
            eps = sign(0, r, v)
            nxt[w, p], nxt[w, n - 1 - p] = (a, b) if eps > 0 else (b, a)
            r = r + eps * v
    if n % 2:
        nxt[:, n // 2] = order[:, n - 1]
    return nxt


def reference_orders(name, vectors_per_epoch, *, seed, first_epoch, balance="deterministic", balance_c=30.0):
    """Orders of epochs 0..E for gradient orderings; vectors_per_epoch: E arrays [W, n, d] (float64)."""
    num_workers, n, d = vectors_per_epoch[0].shape
    order = reference_first_orders(num_workers, n, seed, first_epoch)
    mean = np.zeros((num_workers, d))
    out = [order]
    for epoch, vectors in enumerate(vectors_per_epoch):
        num_sums = 1 if name == "cd-grab" else num_workers
        sign = ReferenceSign(balance, balance_c, seed, epoch, num_sums)
        if name == "grab":
            order, mean, _ = reference_grab_epoch(order, vectors, mean, sign)
        elif name == "pair-balance":
            order = reference_pair_balance_epoch(order, vectors, sign)
        else:
            order = reference_cd_grab_epoch(order, vectors, sign)
        out.append(order)
    return out


# --------------------------------------------------------------------------------------------------
# Driving the implementation
# --------------------------------------------------------------------------------------------------


def random_vectors(num_epochs, num_workers, n, d, seed):
    """Fresh Gaussian vectors per epoch: float32 torch [E, W, n, d]."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.standard_normal((num_epochs, num_workers, n, d)).astype(np.float32))


def gather(vectors: torch.Tensor, orders: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """[W, stop-start, d]: grads[w, j] = vectors[w, orders[w, start + j]]."""
    rows = torch.arange(vectors.shape[0]).unsqueeze(1)
    return vectors[rows, orders[:, start:stop]]


def chunk_sizes(kind, total: int, seed: int = 0) -> list[int]:
    if kind == "random":
        rng = np.random.default_rng(seed)
        sizes, done = [], 0
        while done < total:
            k = int(rng.integers(1, 5))
            k = min(k, total - done)
            sizes.append(k)
            done += k
        return sizes
    k = total if kind == "all" else int(kind)
    return [min(k, total - s) for s in range(0, total, k)] if total else []


def feed_units(o, vectors, orders, chunks="all", seed=0) -> None:
    """observe() the whole epoch in chunks of units."""
    pos = 0
    for k in chunk_sizes(chunks, orders.shape[1], seed):
        o.observe(gather(vectors, orders, pos, pos + k))
        pos += k


def feed_items(o, vectors, orders, chunks="all", seed=0) -> None:
    """observe_items() with worker-side reductions computed here: pair differences or unit grads."""
    n = orders.shape[1]
    if o.message_kind == "unit_gradients":
        feed_units(o, vectors, orders, chunks, seed)
        return
    assert o.message_kind == "pair_differences"
    m = n // 2
    firsts = gather(vectors, orders, 0, 2 * m)[:, 0::2]
    seconds = gather(vectors, orders, 0, 2 * m)[:, 1::2]
    diffs = firsts - seconds  # v = g(position 2q) - g(position 2q+1)
    q = 0
    for k in chunk_sizes(chunks, m, seed):
        o.observe_items(diffs[:, q : q + k])
        q += k


def run(o, vectors_per_epoch, feed=feed_units, chunks="all") -> list[torch.Tensor]:
    """Orders of epochs 0..E from the implementation."""
    out = []
    for epoch, vectors in enumerate(vectors_per_epoch):
        orders = o.begin_epoch()
        out.append(orders)
        feed(o, vectors, orders, chunks, seed=epoch)
    out.append(o.begin_epoch())
    return out


def assert_same_orders(got, expected) -> None:
    assert len(got) == len(expected)
    for epoch, (g, e) in enumerate(zip(got, expected, strict=True)):
        np.testing.assert_array_equal(g.numpy(), np.asarray(e), err_msg=f"epoch {epoch}")


def make(name, num_workers, n, d, **kwargs):
    return make_ordering(name, num_workers=num_workers, shard_size=n, dim=d, **kwargs)


# --------------------------------------------------------------------------------------------------
# Gradient orderings == brute force
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", GRADIENT_ORDERINGS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "W{}-n{}-d{}".format(*s))
@pytest.mark.parametrize("first_epoch", ["identity", "random"])
def test_deterministic_matches_reference(name, shape, first_epoch):
    num_workers, n, d = shape
    vectors = random_vectors(NUM_EPOCHS, num_workers, n, d, seed=11)
    got = run(make(name, num_workers, n, d, seed=3, first_epoch=first_epoch), vectors)
    expected = reference_orders(name, vectors.double().numpy(), seed=3, first_epoch=first_epoch)
    assert_same_orders(got, expected)


@pytest.mark.parametrize("name", GRADIENT_ORDERINGS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "W{}-n{}-d{}".format(*s))
@pytest.mark.parametrize("balance_c", [30.0, 0.7])  # 0.7: p is often clipped to 0 or 1
def test_probabilistic_matches_reference(name, shape, balance_c):
    num_workers, n, d = shape
    vectors = random_vectors(NUM_EPOCHS, num_workers, n, d, seed=12)
    o = make(
        name, num_workers, n, d, seed=5, first_epoch="random", balance="probabilistic", balance_c=balance_c
    )
    got = run(o, vectors)
    expected = reference_orders(
        name,
        vectors.double().numpy(),
        seed=5,
        first_epoch="random",
        balance="probabilistic",
        balance_c=balance_c,
    )
    assert_same_orders(got, expected)


def test_probabilistic_differs_from_deterministic_and_between_seeds():
    vectors = random_vectors(NUM_EPOCHS, 2, 16, 3, seed=13)
    det = run(make("cd-grab", 2, 16, 3, seed=1), vectors)
    prob1 = run(make("cd-grab", 2, 16, 3, seed=1, balance="probabilistic"), vectors)
    prob2 = run(make("cd-grab", 2, 16, 3, seed=2, balance="probabilistic"), vectors)
    assert not torch.equal(det[-1], prob1[-1])
    assert not torch.equal(prob1[-1], prob2[-1])


@pytest.mark.parametrize("balance", ["deterministic", "probabilistic"])
@pytest.mark.parametrize("n", [8, 9])
def test_cd_grab_with_one_worker_equals_pair_balance(balance, n):
    vectors = random_vectors(NUM_EPOCHS, 1, n, 4, seed=14)
    a = run(make("cd-grab", 1, n, 4, seed=7, balance=balance), vectors)
    b = run(make("pair-balance", 1, n, 4, seed=7, balance=balance), vectors)
    assert_same_orders(a, [x.numpy() for x in b])


def test_cd_grab_differs_from_pair_balance_with_several_workers():
    vectors = random_vectors(NUM_EPOCHS, 4, 16, 3, seed=15)
    a = run(make("cd-grab", 4, 16, 3, seed=7), vectors)
    b = run(make("pair-balance", 4, 16, 3, seed=7), vectors)
    assert not torch.equal(a[-1], b[-1])


# --------------------------------------------------------------------------------------------------
# Chunking and message kinds do not change the result
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", GRADIENT_ORDERINGS)
@pytest.mark.parametrize("balance", ["deterministic", "probabilistic"])
@pytest.mark.parametrize("shape", [(1, 7, 3), (3, 10, 4), (2, 9, 2)], ids=lambda s: "W{}-n{}-d{}".format(*s))
def test_result_independent_of_chunking_and_message_kind(name, balance, shape):
    num_workers, n, d = shape
    vectors = random_vectors(NUM_EPOCHS, num_workers, n, d, seed=16)
    expected = reference_orders(name, vectors.double().numpy(), seed=9, first_epoch="random", balance=balance)
    for feed in (feed_units, feed_items):
        for chunks in ("1", "3", "all", "random"):
            o = make(name, num_workers, n, d, seed=9, balance=balance)
            assert_same_orders(run(o, vectors, feed=feed, chunks=chunks), expected)


@pytest.mark.parametrize("name", ["pair-balance", "cd-grab"])
def test_pairs_straddle_observe_calls_with_mixed_chunks(name):
    """Odd chunks so that every pair but the first straddles two calls."""
    vectors = random_vectors(NUM_EPOCHS, 3, 12, 3, seed=17)
    expected = reference_orders(name, vectors.double().numpy(), seed=1, first_epoch="random")
    o = make(name, 3, 12, 3, seed=1)
    got = []
    for epoch_vectors in vectors:
        orders = o.begin_epoch()
        got.append(orders)
        for start, stop in [(0, 1), (1, 4), (4, 5), (5, 8), (8, 11), (11, 12)]:
            o.observe(gather(epoch_vectors, orders, start, stop))
    got.append(o.begin_epoch())
    assert_same_orders(got, expected)


def _as_input(grads: torch.Tensor, kind: str):
    """``grads`` [W, k, d] float32 in one of the forms ``observe`` accepts."""
    if kind == "list":
        return [g.numpy().copy() for g in grads]
    if kind == "float64":
        return grads.double()
    if kind == "strided":  # float32, not contiguous
        return grads.transpose(1, 2).contiguous().transpose(1, 2)
    return grads


def _observe_epochs(o, vectors, chunk_pattern, kinds=("tensor",)):
    """Orders of epochs 0..E and each epoch's final running sums, observing chunks of
    ``chunk_pattern`` units (cycled, cut at n) in input forms cycled from ``kinds``; checks on the
    way that observe does not write to its input and keeps a straddling unit as a view of it."""
    n = vectors.shape[2]
    got, sums = [], []
    for epoch_vectors in vectors:
        orders = o.begin_epoch()
        got.append(orders)
        start, call = 0, 0
        while start < n:
            stop = min(start + chunk_pattern[call % len(chunk_pattern)], n)
            grads = _as_input(gather(epoch_vectors, orders, start, stop), kinds[call % len(kinds)])
            before = [torch.as_tensor(g).clone() for g in grads]
            o.observe(grads)
            assert all(torch.equal(torch.as_tensor(g), b) for g, b in zip(grads, before, strict=True))
            if isinstance(grads, torch.Tensor) and grads.dtype == torch.float32 and stop % 2:
                assert o.stream.pending.data_ptr() == grads[:, -1].data_ptr()  # a view, no copy
            start, call = stop, call + 1
        sums.append(o.state.running_sum.clone())
    got.append(o.begin_epoch())
    return got, sums


@pytest.mark.parametrize("name", ["pair-balance", "cd-grab"])
@pytest.mark.parametrize("n", [16, 17])
def test_observe_chunks_that_split_pairs_match_one_call(name, n):
    """Odd chunks (3, 5, 1, ...) put pairs across observe calls, in every input form; the orders
    and running sums equal those of one call per epoch, and the inputs are left as they were."""
    num_workers, d = 3, 40  # odd W: the fused kernel's passes fall differently in every chunking
    vectors = random_vectors(NUM_EPOCHS, num_workers, n, d, seed=27)
    whole, whole_sums = _observe_epochs(make(name, num_workers, n, d, seed=4), vectors, [n])
    assert_same_orders(whole, reference_orders(name, vectors.double().numpy(), seed=4, first_epoch="random"))
    for pattern in ([3, 5], [1], [3, 5, 1, 3, 2, 7]):
        o = make(name, num_workers, n, d, seed=4)
        got, sums = _observe_epochs(o, vectors, pattern, kinds=("tensor", "list", "strided", "float64"))
        assert_same_orders(got, [x.numpy() for x in whole])
        for epoch, (a, b) in enumerate(zip(sums, whole_sums, strict=True)):
            assert torch.equal(a, b), f"epoch {epoch}"


def test_message_kinds_and_items_per_epoch():
    for name in ("with-replacement", "rr", "so", "flipflop"):
        o = make(name, 2, 7, 0)
        assert (o.needs_gradients, o.message_kind, o.items_per_epoch) == (False, "none", 0)
    o = make("grab", 2, 7, 3)
    assert (o.needs_gradients, o.message_kind, o.items_per_epoch) == (True, "unit_gradients", 7)
    for name in ("pair-balance", "cd-grab"):
        o = make(name, 2, 7, 3)
        assert (o.needs_gradients, o.message_kind, o.items_per_epoch) == (True, "pair_differences", 3)


def test_registry_names():
    assert set(ORDERINGS) == set(ALL_ORDERINGS)


# --------------------------------------------------------------------------------------------------
# Invariants: permutations, identity first epoch, ties, epoch counter
# --------------------------------------------------------------------------------------------------


def _orders_over_epochs(name, num_workers, n, d, first_epoch, num_epochs=NUM_EPOCHS, seed=0):
    o = make(name, num_workers, n, d if name in GRADIENT_ORDERINGS else 0, seed=seed, first_epoch=first_epoch)
    if name in GRADIENT_ORDERINGS:
        return run(o, random_vectors(num_epochs, num_workers, n, d, seed=18))
    return [o.begin_epoch() for _ in range(num_epochs + 1)]


@pytest.mark.parametrize("name", [n for n in ALL_ORDERINGS if n != "with-replacement"])
@pytest.mark.parametrize(
    "shape", [(1, 1, 2), (2, 2, 2), (3, 7, 3), (4, 16, 2)], ids=lambda s: "W{}-n{}-d{}".format(*s)
)
@pytest.mark.parametrize("first_epoch", ["identity", "random"])
def test_every_order_is_a_permutation(name, shape, first_epoch):
    num_workers, n, d = shape
    for epoch, orders in enumerate(_orders_over_epochs(name, num_workers, n, d, first_epoch)):
        assert orders.dtype == torch.long
        assert orders.shape == (num_workers, n)
        for w in range(num_workers):
            assert sorted(orders[w].tolist()) == list(range(n)), (
                f"epoch {epoch} worker {w}: {orders[w].tolist()}"
            )


@pytest.mark.parametrize("name", ALL_ORDERINGS)
def test_identity_first_epoch_is_arange(name):
    o = make(name, 3, 6, 2 if name in GRADIENT_ORDERINGS else 0, seed=4, first_epoch="identity")
    np.testing.assert_array_equal(o.begin_epoch().numpy(), np.tile(np.arange(6), (3, 1)))
    assert o.epoch == 0


@pytest.mark.parametrize("name", ALL_ORDERINGS)
def test_random_first_epoch_uses_per_worker_seeded_permutation(name):
    o = make(name, 3, 20, 2 if name in GRADIENT_ORDERINGS else 0, seed=4, first_epoch="random")
    expected = np.stack([torch.randperm(20, generator=rng_for(4, w, 0, ORDER)).numpy() for w in range(3)])
    np.testing.assert_array_equal(o.begin_epoch().numpy(), expected)
    assert len({tuple(row) for row in expected.tolist()}) == 3  # seeds differ per worker


@pytest.mark.parametrize("name", GRADIENT_ORDERINGS)
def test_epoch_counter(name):
    o = make(name, 2, 4, 2)
    vectors = random_vectors(3, 2, 4, 2, seed=19)
    for e in range(3):
        orders = o.begin_epoch()
        assert o.epoch == e
        feed_units(o, vectors[e], orders)


@pytest.mark.parametrize("name", GRADIENT_ORDERINGS)
def test_first_decision_of_every_epoch_is_a_tie_giving_minus(name):
    """orderings.md: r = 0 at the start of every epoch gives ε = -1 (the first unit / pair goes right)."""
    num_workers, n, d = 3, 6, 2
    vectors = random_vectors(4, num_workers, n, d, seed=20)
    o = make(name, num_workers, n, d, seed=2)
    orders = o.begin_epoch()
    for e in range(4):
        feed_units(o, vectors[e], orders)
        nxt = o.begin_epoch()
        # cd-grab: only rank 0's first pair sees r = 0
        workers = [0] if name == "cd-grab" else range(num_workers)
        for w in workers:
            if name == "grab":
                assert nxt[w, n - 1] == orders[w, 0]
            else:
                assert (nxt[w, 0], nxt[w, n - 1]) == (orders[w, 1], orders[w, 0])
        orders = nxt


@pytest.mark.parametrize("name", GRADIENT_ORDERINGS)
@pytest.mark.parametrize("n", [6, 7])
def test_zero_gradients_tie_every_decision(name, n):
    """All vectors zero: every <r, v> = 0, so ε = -1 throughout."""
    o = make(name, 2, n, 3, seed=6)
    orders = o.begin_epoch()
    o.observe(torch.zeros(2, n, 3))
    nxt = o.begin_epoch()
    for w in range(2):
        visit = orders[w].tolist()
        if name == "grab":
            expected = visit[::-1]
        else:
            m = n // 2
            left = [visit[2 * p + 1] for p in range(m)]
            right = [visit[2 * p] for p in range(m)][::-1]
            expected = left + ([visit[-1]] if n % 2 else []) + right
        assert nxt[w].tolist() == expected


# --------------------------------------------------------------------------------------------------
# Gradient-free orderings
# --------------------------------------------------------------------------------------------------


def _perm(n, seed, w, e):
    return torch.randperm(n, generator=rng_for(seed, w, e, ORDER))


@pytest.mark.parametrize("first_epoch", ["identity", "random"])
def test_rr_so_flipflop_with_replacement_rules(first_epoch):
    num_workers, n, seed, epochs = 3, 9, 21, 6
    first = torch.from_numpy(reference_first_orders(num_workers, n, seed, first_epoch))
    got = {name: [] for name in ("rr", "so", "flipflop", "with-replacement")}
    for name in got:
        o = make(name, num_workers, n, 0, seed=seed, first_epoch=first_epoch)
        for e in range(epochs):
            got[name].append(o.begin_epoch())
            assert o.epoch == e
    for e in range(epochs):
        fresh = first if e == 0 else torch.stack([_perm(n, seed, w, e) for w in range(num_workers)])
        assert torch.equal(got["rr"][e], fresh)
        assert torch.equal(got["so"][e], first)
        if e == 0:
            assert torch.equal(got["flipflop"][e], first)
            assert torch.equal(got["with-replacement"][e], first)
        else:
            expected_ff = got["flipflop"][e - 1].flip(1) if e % 2 else fresh
            assert torch.equal(got["flipflop"][e], expected_ff)
            draws = torch.stack(
                [torch.randint(n, (n,), generator=rng_for(seed, w, e, ORDER)) for w in range(num_workers)]
            )
            assert torch.equal(got["with-replacement"][e], draws)
    # D-RR seeds differ per worker
    assert not torch.equal(got["rr"][1][0], got["rr"][1][1])


def test_with_replacement_draws_repeat_units():
    o = make("with-replacement", 1, 50, 0, seed=0)
    o.begin_epoch()
    orders = o.begin_epoch()
    assert orders.shape == (1, 50)
    assert orders.min() >= 0 and orders.max() < 50
    assert len(set(orders[0].tolist())) < 50  # 50 uniform draws from 50 repeat with prob ~1


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", GRADIENT_ORDERINGS)
@pytest.mark.parametrize("n", [6, 7])
@pytest.mark.parametrize("missing", [1, 2, 6])
def test_begin_epoch_before_all_units_observed_raises(name, n, missing):
    o = make(name, 2, n, 3, seed=0)
    vectors = random_vectors(1, 2, n, 3, seed=22)[0]
    orders = o.begin_epoch()
    if missing < n:
        o.observe(gather(vectors, orders, 0, n - missing))
    with pytest.raises(RuntimeError):
        o.begin_epoch()


@pytest.mark.parametrize("name", ["pair-balance", "cd-grab"])
def test_begin_epoch_before_all_pairs_sent_as_items_raises(name):
    o = make(name, 2, 8, 3, seed=0)
    o.begin_epoch()
    o.observe_items(torch.randn(2, 3, 3))
    with pytest.raises(RuntimeError):
        o.begin_epoch()


@pytest.mark.parametrize("name", GRADIENT_ORDERINGS)
def test_wrong_shapes_raise_value_error(name):
    o = make(name, 2, 6, 3, seed=0)
    o.begin_epoch()
    bad = [
        torch.zeros(6, 3),  # missing worker axis
        torch.zeros(3, 2, 3),  # wrong num_workers
        torch.zeros(2, 2, 4),  # wrong dim
        torch.zeros(2, 2, 3, 1),  # extra axis
    ]
    for grads in bad:
        with pytest.raises(ValueError):
            o.observe(grads)
        with pytest.raises(ValueError):
            o.observe_items(grads)


@pytest.mark.parametrize("name", GRADIENT_ORDERINGS)
@pytest.mark.parametrize("n", [6, 7])
def test_too_many_units_raise_value_error(name, n):
    o = make(name, 2, n, 3, seed=0)
    o.begin_epoch()
    with pytest.raises(ValueError):
        o.observe(torch.randn(2, n + 2, 3))
    o2 = make(name, 2, n, 3, seed=0)
    o2.begin_epoch()
    with pytest.raises(ValueError):
        o2.observe_items(torch.randn(2, o2.items_per_epoch + 1, 3))


def test_unknown_name_lists_known_names():
    with pytest.raises(OrderlabError) as info:
        make_ordering("nope", num_workers=2, shard_size=4, dim=3)
    message = str(info.value)
    assert "nope" in message
    for name in ALL_ORDERINGS:
        assert name in message


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_workers": 0},
        {"shard_size": 0},
        {"first_epoch": "sorted"},
        {"balance": "random"},
        {"balance_c": 0.0},
        {"dim": 0},
    ],
)
def test_invalid_arguments_raise_orderlab_error(kwargs):
    args = {"num_workers": 2, "shard_size": 4, "dim": 3} | kwargs
    with pytest.raises(OrderlabError, match=next(iter(kwargs))):
        make_ordering("cd-grab", **args)


def test_a_spec_is_the_keywords():
    """make_ordering takes one OrderingSpec or its fields by keyword, never both, and names a typo."""
    spec = OrderingSpec(num_workers=2, shard_size=6, dim=3, seed=4, first_epoch="identity")
    from_spec, from_keywords = make_ordering("cd-grab", spec), make_ordering("cd-grab", **asdict(spec))
    assert torch.equal(from_spec.begin_epoch(), from_keywords.begin_epoch())
    with pytest.raises(OrderlabError, match="num_worker.*known: num_workers"):
        make_ordering("rr", num_worker=2, shard_size=6)
    with pytest.raises(OrderlabError, match="not both"):
        make_ordering("rr", spec, seed=1)


def test_every_module_of_the_package_registers_its_orderings():
    """An ordering is registered by being in the package: no import list to edit elsewhere."""
    import orderlab.orderings as package

    modules = {info.name for info in pkgutil.iter_modules(package.__path__)} - {
        "_balance",
        "_torch_balance",
        "spec",
    }
    assert modules == {"grab", "pair_balance", "permutations"}
    assert {ORDERINGS[name].__module__.rsplit(".", 1)[1] for name in ORDERINGS} == modules


# --------------------------------------------------------------------------------------------------
# Checkpointing: state_dict mid-epoch, load into a fresh ordering, continue
# --------------------------------------------------------------------------------------------------


def _roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("name", GRADIENT_ORDERINGS)
@pytest.mark.parametrize("balance", ["deterministic", "probabilistic"])
@pytest.mark.parametrize("n", [8, 9])
@pytest.mark.parametrize("cut", [0, 3, 4])  # units of epoch 1 observed before the checkpoint; 3 = mid-pair
@pytest.mark.parametrize("serialize", [True, False], ids=["saved", "in-memory"])
def test_state_dict_mid_epoch_then_continue(name, balance, n, cut, serialize):
    num_workers, d = 3, 4
    vectors = random_vectors(NUM_EPOCHS, num_workers, n, d, seed=23)
    kwargs = {"seed": 8, "balance": balance}
    uninterrupted = run(make(name, num_workers, n, d, **kwargs), vectors, chunks="random")

    o = make(name, num_workers, n, d, **kwargs)
    got = [o.begin_epoch()]
    feed_units(o, vectors[0], got[0], "3")
    got.append(o.begin_epoch())
    o.observe(gather(vectors[1], got[1], 0, cut))
    state = _roundtrip(o.state_dict()) if serialize else o.state_dict()
    # keep using the original afterwards: the checkpoint must not alias live state
    o.observe(torch.ones(num_workers, n - cut, d))

    fresh = make(name, num_workers, n, d, **kwargs)
    fresh.load_state_dict(state)
    assert fresh.epoch == 1
    fresh.observe(gather(vectors[1], got[1], cut, n))
    for e in range(2, NUM_EPOCHS):
        got.append(fresh.begin_epoch())
        feed_units(fresh, vectors[e], got[-1], "random", seed=e)
    got.append(fresh.begin_epoch())
    assert_same_orders(got, [x.numpy() for x in uninterrupted])


@pytest.mark.parametrize("name", ["rr", "so", "flipflop", "with-replacement"])
def test_state_dict_gradient_free(name):
    o = make(name, 2, 7, 0, seed=3)
    uninterrupted = [o.begin_epoch() for _ in range(5)]
    o = make(name, 2, 7, 0, seed=3)
    for _ in range(2):
        o.begin_epoch()
    fresh = make(name, 2, 7, 0, seed=3)
    fresh.load_state_dict(_roundtrip(o.state_dict()))
    rest = [fresh.begin_epoch() for _ in range(3)]
    for a, b in zip(rest, uninterrupted[2:], strict=True):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------
# Reordering guarantee (orderings.md, "Reordering guarantee" and "Measures")
# --------------------------------------------------------------------------------------------------


def _prefix_bound(steps: np.ndarray) -> float:
    """max_k ||sum_{t<=k} steps[t]||_inf, by a plain loop."""
    s, best = np.zeros(steps.shape[1]), 0.0
    for row in steps:
        s = s + row
        best = max(best, float(np.abs(s).max()))
    return best


@pytest.mark.parametrize("name", ["grab", "pair-balance"])
@pytest.mark.parametrize("n", [64, 65])
def test_one_reordering_step_satisfies_half_sum_bound(name, n):
    """W = 1, centered fixed vectors: bound(new order) <= (H + B)/2.

    H = the old order's bound, B = the signed prefix bound max_k ||sum_{t<=k} ε_t z_t||_inf.
    """
    d = 5
    rng = np.random.default_rng(24)
    z = rng.standard_normal((n, d))
    z -= z.mean(axis=0)
    vectors = torch.from_numpy(z.astype(np.float32)).unsqueeze(0)  # [1, n, d]
    zc = vectors[0].double().numpy()
    zc = zc - zc.mean(axis=0)
    o = make(name, 1, n, d, seed=0)
    orders = o.begin_epoch()
    for round_ in range(6):
        feed_units(o, vectors, orders, "5")
        nxt = o.begin_epoch()
        visit = orders[0].numpy()
        new = nxt[0].numpy()
        if name == "grab":
            # signs from the reference; from round 1 on its stale mean is the mean of the same vectors
            mean = vectors.double().numpy().mean(axis=1) * (round_ > 0)
            sign = ReferenceSign("deterministic", 30.0, 0, round_, 1)
            ref_next, _, signs = reference_grab_epoch(orders.numpy(), vectors.double().numpy(), mean, sign)
            np.testing.assert_array_equal(new, ref_next[0])
            eps = signs[0]
        else:
            position = np.empty(n, dtype=int)
            position[new] = np.arange(n)
            eps = np.where(position[visit] < n // 2, 1, -1)  # + units fill the left half
            if n % 2:
                eps[-1] = 1  # the middle unit: counted as the last "+" unit
        plus = [a for a, e in zip(visit, eps, strict=True) if e > 0]
        minus = [a for a, e in zip(visit, eps, strict=True) if e < 0]
        np.testing.assert_array_equal(new, np.array(plus + minus[::-1]))  # + in visiting order, - reversed
        h = _prefix_bound(zc[visit])
        b = _prefix_bound(eps[:, None] * zc[visit])
        new_bound = _prefix_bound(zc[new])
        assert new_bound <= (h + b) / 2 + 1e-6
        assert herding_bound(vectors[0], nxt[0]) == pytest.approx(new_bound, rel=1e-6, abs=1e-6)
        orders = nxt


def _bound_after_rounds(name, num_workers, vectors, rounds=10):
    n = vectors.shape[1]
    o = make(name, num_workers, n, vectors.shape[2], seed=0)
    orders = o.begin_epoch()
    for _ in range(rounds):
        if o.needs_gradients:
            feed_units(o, vectors, orders, "all")
        orders = o.begin_epoch()
    return parallel_herding_bound(vectors, orders)


def test_repeated_balancing_drives_parallel_bound_down():
    """orderings.md "Measures": d = 16, unit norm, W*n = 8192, 10 rounds.

    cd-grab falls to about 2 for every W, pair-balance grows like sqrt(W), rr stays near 30.
    """
    d, total = 16, 8192
    rng = np.random.default_rng(25)
    z = rng.standard_normal((total, d))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    z -= z.mean(axis=0)
    z = torch.from_numpy(z.astype(np.float32))
    bounds = {}
    for name, num_workers in [("cd-grab", 4), ("cd-grab", 32), ("pair-balance", 32), ("rr", 4), ("rr", 32)]:
        vectors = z.reshape(num_workers, total // num_workers, d)
        bounds[(name, num_workers)] = _bound_after_rounds(name, num_workers, vectors)
    assert bounds[("cd-grab", 4)] < 4, bounds
    assert bounds[("cd-grab", 32)] < 4, bounds
    assert bounds[("rr", 4)] > 15 and bounds[("rr", 32)] > 15, bounds
    assert bounds[("pair-balance", 32)] > 2 * bounds[("cd-grab", 32)], bounds
    assert bounds[("pair-balance", 32)] < bounds[("rr", 32)], bounds


# --------------------------------------------------------------------------------------------------
# Dependencies point down
# --------------------------------------------------------------------------------------------------


def test_importing_orderings_does_not_import_ray():
    code = (
        "import sys\n"
        "import orderlab.orderings, orderlab.herding, orderlab.seeding\n"
        "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120)


def test_sanity_reference_is_not_trivial():
    """The reference produces different orders for different vectors (guards against a vacuous comparison)."""
    v = random_vectors(2, 1, 16, 3, seed=26).double().numpy()
    a = reference_orders("pair-balance", [v[0]], seed=0, first_epoch="identity")
    b = reference_orders("pair-balance", [v[1]], seed=0, first_epoch="identity")
    assert not np.array_equal(a[1], b[1])
