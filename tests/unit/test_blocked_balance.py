"""Blocked balancing (Gram-matrix form) against the per-vector rule, and block-boundary invariance."""

from __future__ import annotations

import pytest
import torch

from orderlab.orderings import make_ordering
from orderlab.orderings._balance import SignRule, block_size


def per_vector_signs(vectors: torch.Tensor, rule: SignRule) -> tuple[list[bool], torch.Tensor]:
    """The spec's rule one vector at a time: ε = +1 iff <r, v> < 0 (or the walk's draw), r += ε v."""
    running_sum = torch.zeros(vectors.shape[1], dtype=torch.float64)
    signs = []
    for v in vectors.double():
        positive = rule.positive(float(running_sum @ v), 0)
        running_sum += v if positive else -v
        signs.append(positive)
    return signs, running_sum


@pytest.mark.parametrize("balance", ["deterministic", "probabilistic"])
@pytest.mark.parametrize("block", [1, 7, 64, 1000])
def test_block_signs_equal_the_per_vector_rule(balance, block):
    vectors = torch.randn(1000, 50, generator=torch.Generator().manual_seed(3))
    reference_rule = SignRule(balance=balance, balance_c=3.0, seed=1, num_sums=1)
    reference_rule.begin_epoch(0)
    expected, expected_sum = per_vector_signs(vectors, reference_rule)
    rule = SignRule(balance=balance, balance_c=3.0, seed=1, num_sums=1)
    rule.begin_epoch(0)
    running_sum = torch.zeros(50)
    signs = []
    for start in range(0, len(vectors), block):
        signs += rule.balance_block(running_sum, vectors[start : start + block], 0)
    assert signs == expected
    assert running_sum.double() == pytest.approx(expected_sum, abs=1e-3)


@pytest.mark.parametrize("name", ["grab", "pair-balance", "cd-grab"])
def test_running_sum_is_bitwise_independent_of_chunking(name):
    num_workers, shard_size, dim = 3, 200, 33
    grads = torch.randn(num_workers, shard_size, dim, generator=torch.Generator().manual_seed(5))
    states = []
    for chunks in ([shard_size], [1] * shard_size, [5, 50, 3, 100, 42]):
        ordering = make_ordering(name, num_workers=num_workers, shard_size=shard_size, dim=dim, seed=0)
        order = ordering.begin_epoch()
        visited = torch.stack([grads[w, order[w]] for w in range(num_workers)])
        position = 0
        for size in chunks:
            ordering.observe(visited[:, position : position + size])
            position += size
        states.append((ordering.running_sum.clone(), ordering.begin_epoch()))
    for running_sum, orders in states[1:]:
        assert torch.equal(running_sum, states[0][0])
        assert torch.equal(orders, states[0][1])


def test_block_size_depends_only_on_dim_and_workers():
    assert block_size(10_000, 1) == 256
    assert block_size(1_000_000, 1) == 16  # 64 MiB of float32 vectors per block
    assert block_size(10_000, 4) == 64
    assert block_size(10_000_000, 4) == 1
