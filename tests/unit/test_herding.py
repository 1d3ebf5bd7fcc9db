"""herding_bound and parallel_herding_bound against direct loops (docs/orderings.md, "Measures")."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from orderlab.herding import herding_bound, parallel_herding_bound

NORMS = [math.inf, 2]


def _norm(x: np.ndarray, norm: float) -> float:
    return float(np.abs(x).max()) if norm == math.inf else float(np.sqrt((x * x).sum()))


def loop_herding_bound(z: np.ndarray, order, norm: float) -> float:
    """max over k of ||sum_{t<=k} (z[order[t]] - mean)||, one prefix at a time."""
    n, d = z.shape
    mean = [sum(z[i, j] for i in range(n)) / n for j in range(d)]
    prefix = np.zeros(d)
    best = 0.0
    for t in range(n):
        prefix = prefix + (z[order[t]] - np.array(mean))
        best = max(best, _norm(prefix, norm))
    return best


def loop_parallel_herding_bound(z: np.ndarray, orders, norm: float) -> float:
    """max over steps t of ||sum_{s<=t} sum_w (z[w, orders[w, s]] - zbar)||, zbar over all W*n vectors."""
    num_workers, n, d = z.shape
    zbar = z.reshape(-1, d).mean(axis=0)
    prefix = np.zeros(d)
    best = 0.0
    for s in range(n):
        for w in range(num_workers):
            prefix = prefix + (z[w, orders[w][s]] - zbar)
        best = max(best, _norm(prefix, norm))
    return best


def _vectors(shape, seed):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape) + 0.3)  # not centered


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("n,d", [(1, 3), (7, 1), (40, 5)])
def test_herding_bound_matches_loop(norm, n, d):
    z = _vectors((n, d), seed=n * d)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    expected = loop_herding_bound(z.numpy(), order.tolist(), norm)
    assert herding_bound(z, order, norm=norm) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert herding_bound(z, None, norm=norm) == pytest.approx(
        loop_herding_bound(z.numpy(), list(range(n)), norm), rel=1e-12, abs=1e-12
    )
    assert herding_bound(z, norm=norm) == herding_bound(z, torch.arange(n), norm=norm)


def test_herding_bound_default_norm_is_inf_and_float32_input():
    z = _vectors((30, 4), seed=3).float()
    order = torch.randperm(30, generator=torch.Generator().manual_seed(2))
    expected = loop_herding_bound(z.double().numpy(), order.tolist(), math.inf)
    got = herding_bound(z, order)
    assert isinstance(got, float)
    assert got == pytest.approx(expected, rel=1e-6)


def test_herding_bound_hand_example():
    # z = [1, 3, 2, 2] (d = 1), mean 2: prefixes -1, 0, 0, 0 -> 1; order [1, 0, 2, 3]: 1, 0, 0, 0 -> 1
    # order [0, 2, 3, 1]: -1, -1, -1, 0 -> 1; z = [0, 4]: prefixes -2, 0 -> 2
    z = torch.tensor([[1.0], [3.0], [2.0], [2.0]])
    assert herding_bound(z) == 1.0
    assert herding_bound(z, torch.tensor([1, 0, 2, 3])) == 1.0
    assert herding_bound(torch.tensor([[0.0], [4.0]])) == 2.0
    # d = 2, 2-norm: z = [(1,0),(−1,0),(0,3),(0,−3)], mean 0; prefixes (1,0),(0,0),(0,3),(0,0)
    z2 = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 3.0], [0.0, -3.0]])
    assert herding_bound(z2, norm=2) == 3.0
    assert herding_bound(z2, torch.tensor([0, 2, 1, 3]), norm=2) == pytest.approx(math.sqrt(10))


def test_herding_bound_is_shift_invariant():
    z = _vectors((25, 3), seed=4)
    order = torch.randperm(25, generator=torch.Generator().manual_seed(3))
    shifted = z + torch.tensor([5.0, -2.0, 100.0], dtype=z.dtype)
    assert herding_bound(shifted, order) == pytest.approx(herding_bound(z, order), rel=1e-9)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("shape", [(1, 5, 2), (3, 8, 4), (4, 1, 3), (8, 16, 1)])
def test_parallel_herding_bound_matches_loop(norm, shape):
    num_workers, n, _ = shape
    z = _vectors(shape, seed=sum(shape))
    g = torch.Generator().manual_seed(5)
    orders = torch.stack([torch.randperm(n, generator=g) for _ in range(num_workers)])
    expected = loop_parallel_herding_bound(z.numpy(), orders.tolist(), norm)
    assert parallel_herding_bound(z, orders, norm=norm) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_parallel_herding_bound_hand_example():
    # W = 2, n = 2, d = 1: z[0] = [0, 2], z[1] = [4, 2]; zbar = 2
    # orders [[0, 1], [0, 1]]: step 0 adds (0-2) + (4-2) = 0, step 1 adds 0 + 0 -> bound 0
    # orders [[1, 0], [0, 1]]: step 0 adds 0 + 2 = 2, step 1 adds -2 + 0 -> bound 2
    z = torch.tensor([[[0.0], [2.0]], [[4.0], [2.0]]])
    assert parallel_herding_bound(z, torch.tensor([[0, 1], [0, 1]])) == 0.0
    assert parallel_herding_bound(z, torch.tensor([[1, 0], [0, 1]])) == 2.0


@pytest.mark.parametrize("norm", NORMS)
def test_one_worker_equals_herding_bound(norm):
    z = _vectors((1, 33, 4), seed=6)
    order = torch.randperm(33, generator=torch.Generator().manual_seed(7)).unsqueeze(0)
    assert parallel_herding_bound(z, order, norm=norm) == pytest.approx(
        herding_bound(z[0], order[0], norm=norm), rel=1e-12, abs=1e-12
    )


@pytest.mark.parametrize("norm", NORMS)
def test_invariant_to_worker_relabeling(norm):
    num_workers, n = 5, 12
    z = _vectors((num_workers, n, 3), seed=8)
    g = torch.Generator().manual_seed(9)
    orders = torch.stack([torch.randperm(n, generator=g) for _ in range(num_workers)])
    relabel = torch.tensor([3, 0, 4, 1, 2])
    assert parallel_herding_bound(z[relabel], orders[relabel], norm=norm) == pytest.approx(
        parallel_herding_bound(z, orders, norm=norm), rel=1e-12, abs=1e-12
    )


def test_parallel_bound_of_identical_workers_scales_with_w():
    # every worker holds the same vectors and order: the per-step sum is W times one worker's step
    z1 = _vectors((1, 10, 2), seed=10)
    order = torch.randperm(10, generator=torch.Generator().manual_seed(11)).unsqueeze(0)
    z4 = z1.repeat(4, 1, 1)
    assert parallel_herding_bound(z4, order.repeat(4, 1)) == pytest.approx(
        4 * parallel_herding_bound(z1, order), rel=1e-12
    )


@pytest.mark.parametrize(
    "orders_shape",
    [(3, 7), (2, 8), (2,), (2, 7, 1), (7, 2)],
)
def test_parallel_herding_bound_rejects_wrong_orders_shape(orders_shape):
    z = _vectors((2, 7, 3), seed=12)
    with pytest.raises(ValueError):
        parallel_herding_bound(z, torch.zeros(orders_shape, dtype=torch.long))


def test_parallel_herding_bound_rejects_vectors_without_worker_axis():
    with pytest.raises(ValueError):
        parallel_herding_bound(_vectors((7, 3), seed=13), torch.zeros(1, 7, dtype=torch.long))


@pytest.mark.parametrize(
    "vectors_shape,order_shape",
    [((7, 3), (6,)), ((7, 3), (8,)), ((7, 3), (1, 7)), ((7,), (7,))],
)
def test_herding_bound_rejects_wrong_shapes(vectors_shape, order_shape):
    # like parallel_herding_bound: a mis-sized order must not silently measure a different sequence
    z = _vectors(vectors_shape, seed=14)
    with pytest.raises(ValueError):
        herding_bound(z, torch.zeros(order_shape, dtype=torch.long))


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("chunk", [1, 4, 11, 100])
def test_parallel_bound_taken_in_chunks_of_coordinates_is_the_whole(norm, chunk):
    z = _vectors((3, 20, 11), seed=5)
    generator = torch.Generator().manual_seed(2)
    orders = torch.stack([torch.randperm(20, generator=generator) for _ in range(3)])
    expected = loop_parallel_herding_bound(z.numpy(), orders.tolist(), norm)
    assert parallel_herding_bound(z, orders, norm=norm, chunk=chunk) == pytest.approx(expected, rel=1e-12)


def test_parallel_bound_rejects_norms_that_do_not_separate_over_coordinates():
    with pytest.raises(ValueError, match="norm=1"):
        parallel_herding_bound(_vectors((2, 3, 4), seed=0), torch.zeros(2, 3, dtype=torch.long), norm=1)
