"""The parallel herding bound against the number of workers W on fixed random vectors.

docs/orderings.md "Measures", after the random-vector simulation of the CD-GraB paper (Cooper et
al., NeurIPS 2023): W·n = 8192 unit vectors (d = 16), the same set for every W, split into W shards of n
consecutive vectors; 10 rounds of reordering. cd-grab's bound stays flat in W, per-worker
PairBalance (``pair-balance``, ID-GraB) grows like √W, ``rr`` stays near 30.

Measured with seed 0 (benchmarks/herding_vs_workers.py gives the same numbers, and more seeds):

| W | rr | pair-balance | cd-grab |
|---|---|---|---|
| 1 | 32.5 | 2.29 | 2.29 |
| 8 | 26.9 | 5.28 | 1.98 |
| 64 | 30.4 | 16.5 | 1.96 |

The thresholds below are about half of the measured factors, and seeds 0..7 stay inside them too:
pair-balance grows 5.0-7.7× from W=1 to 64, cd-grab 0.74-1.17×; at W=64 pair-balance ÷ cd-grab is
5.3-8.4 and rr ÷ pair-balance 1.8-2.8; rr ÷ cd-grab is at least 11 at every W. The test fails when
cd-grab, pair-balance or rr is replaced by another of the three (``grab`` in place of pair-balance
passes: per-worker MeanBalance grows with W too).
"""

from __future__ import annotations

import functools

import torch

from orderlab.herding import parallel_herding_bound
from orderlab.orderings import make_ordering

TOTAL, DIM, ROUNDS, SEED = 8192, 16, 10, 0
WORKERS = (1, 8, 64)


@functools.cache
def unit_vectors() -> torch.Tensor:
    """TOTAL Gaussian vectors scaled to unit norm, from a generator seeded with SEED: float32 [TOTAL, DIM]."""
    z = torch.randn(TOTAL, DIM, generator=torch.Generator().manual_seed(SEED))
    return z / torch.linalg.vector_norm(z, dim=1, keepdim=True)


def final_bound(name: str, num_workers: int) -> float:
    """The parallel herding bound (∞-norm) of ``name``'s orders after ROUNDS rounds, W = ``num_workers``."""
    vectors = unit_vectors().reshape(num_workers, TOTAL // num_workers, DIM)  # shard w: n consecutive
    o = make_ordering(name, num_workers=num_workers, shard_size=TOTAL // num_workers, dim=DIM, seed=SEED)
    orders = o.begin_epoch()
    for _ in range(ROUNDS):
        if o.needs_gradients:
            o.observe(torch.gather(vectors, 1, orders.unsqueeze(-1).expand(-1, -1, DIM)))
        orders = o.begin_epoch()
    return parallel_herding_bound(vectors, orders)


def test_cd_grab_stays_flat_in_workers_while_per_worker_pair_balance_grows() -> None:
    cd, pair, rr = ({w: final_bound(name, w) for w in WORKERS} for name in ("cd-grab", "pair-balance", "rr"))
    bounds = {"cd-grab": cd, "pair-balance": pair, "rr": rr}
    first, last = WORKERS[0], WORKERS[-1]
    assert cd[last] <= 1.5 * cd[first], bounds  # measured 0.86×
    assert pair[first] < pair[WORKERS[1]] < pair[last], bounds
    assert pair[last] >= 3 * pair[first], bounds  # measured 7.2×
    assert pair[last] >= 4 * cd[last], bounds  # measured 8.4×
    for w in WORKERS:
        assert rr[w] >= 1.4 * max(pair[w], cd[w]), bounds  # measured 1.8× at W = 64, 14× at W = 1
        assert rr[w] >= 6 * cd[w], bounds  # measured 14-16×
