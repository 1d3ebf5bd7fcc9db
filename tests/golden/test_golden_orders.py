"""Exact orders for tiny inputs, derived by hand from docs/orderings.md.

Conventions used in the derivations: vectors are indexed by (worker, local unit), ``first_epoch:
identity``, "ε = +1 iff <r, v> < 0", a tie (r = 0 at the start of an epoch) gives ε = -1. All values
are small integers or quarters, so float32 arithmetic is exact and the hand derivations are exact.
"""

from __future__ import annotations

import pytest
import torch

from orderlab.orderings import make_ordering
from orderlab.seeding import BALANCE, rng_for


def run_epochs(name, vectors_per_epoch, *, num_workers, **kwargs):
    """Orders of epochs 0..E; vectors_per_epoch[e][w][unit] is the unit's gradient (list of floats)."""
    tensors = [torch.tensor(v, dtype=torch.float32) for v in vectors_per_epoch]
    n, d = tensors[0].shape[1], tensors[0].shape[2]
    o = make_ordering(
        name, num_workers=num_workers, shard_size=n, dim=d, seed=0, first_epoch="identity", **kwargs
    )
    out = []
    for vectors in tensors:
        orders = o.begin_epoch()
        out.append(orders.tolist())
        grads = torch.stack([vectors[w, orders[w]] for w in range(num_workers)])
        o.observe(grads)
    out.append(o.begin_epoch().tolist())
    return out


def test_pair_balance_w1_n4_d1():
    # epoch 0, g = [1, 0, 3, 1], visit 0 1 2 3:
    #   pair (0,1): v = 1, r = 0 -> tie, ε = -1: next[0] = 1, next[3] = 0, r = -1
    #   pair (2,3): v = 2, <r,v> = -2 < 0 -> ε = +1: next[1] = 2, next[2] = 3, r = 1      -> [1, 2, 3, 0]
    # epoch 1, g = [5, 2, 0, 1], visit 1 2 3 0:
    #   pair (1,2): v = 2 - 0 = 2, tie -> ε = -1: next[0] = 2, next[3] = 1, r = -2
    #   pair (3,0): v = 1 - 5 = -4, <r,v> = 8 > 0 -> ε = -1: next[1] = 0, next[2] = 3     -> [2, 0, 3, 1]
    epochs = [[[[1], [0], [3], [1]]], [[[5], [2], [0], [1]]]]
    assert run_epochs("pair-balance", epochs, num_workers=1) == [
        [[0, 1, 2, 3]],
        [[1, 2, 3, 0]],
        [[2, 0, 3, 1]],
    ]


def test_pair_balance_w1_n4_d2():
    # g = [(1,2), (0,1), (2,0), (0,1)], visit 0 1 2 3:
    #   pair (0,1): v = (1,1), tie -> ε = -1: next[0] = 1, next[3] = 0, r = (-1,-1)
    #   pair (2,3): v = (2,-1), <r,v> = -2 + 1 = -1 < 0 -> ε = +1: next[1] = 2, next[2] = 3  -> [1, 2, 3, 0]
    epochs = [[[[1, 2], [0, 1], [2, 0], [0, 1]]]]
    assert run_epochs("pair-balance", epochs, num_workers=1) == [[[0, 1, 2, 3]], [[1, 2, 3, 0]]]


def test_pair_balance_odd_n5_middle_slot():
    # g = [2, 0, 7, 4, 1] in both epochs.
    # epoch 0, visit 0 1 2 3 4:
    #   pair (0,1): v = 2, tie -> -: next[0] = 1, next[4] = 0, r = -2
    #   pair (2,3): v = 3, <r,v> = -6 < 0 -> +: next[1] = 2, next[3] = 3, r = 1
    #   unit 4 takes the middle slot next[2]                                              -> [1, 2, 4, 3, 0]
    # epoch 1, visit 1 2 4 3 0:
    #   pair (1,2): v = 0 - 7 = -7, tie -> -: next[0] = 2, next[4] = 1, r = 7
    #   pair (4,3): v = 1 - 4 = -3, <r,v> = -21 < 0 -> +: next[1] = 4, next[3] = 3, r = 4
    #   unit 0 takes the middle slot                                                       -> [2, 4, 0, 3, 1]
    g = [[[2], [0], [7], [4], [1]]]
    expected = [[[0, 1, 2, 3, 4]], [[1, 2, 4, 3, 0]], [[2, 4, 0, 3, 1]]]
    assert run_epochs("pair-balance", [g, g], num_workers=1) == expected
    assert run_epochs("cd-grab", [g, g], num_workers=1) == expected  # W = 1: cd-grab == pair-balance


def test_grab_w1_n4_d2_stale_mean():
    # g0 = (1,0), g1 = (1,1), g2 = (-1,0), g3 = (0,-2) in both epochs.
    # epoch 0 (μ = 0), visit 0 1 2 3:
    #   unit 0: tie -> -: next[3] = 0, r = (-1,0)
    #   unit 1: <r,g1> = -1 < 0 -> +: next[0] = 1, r = (0,1)
    #   unit 2: <r,g2> = 0, tie -> -: next[2] = 2, r = (1,1)
    #   unit 3: <r,g3> = -2 < 0 -> +: next[1] = 3, r = (1,-1)                             -> [1, 3, 2, 0]
    # μ = mean = (1/4, -1/4); c1 = (3/4,5/4), c3 = (-1/4,-7/4), c2 = (-5/4,1/4), c0 = (3/4,1/4)
    # epoch 1, visit 1 3 2 0:
    #   unit 1: tie -> -: next[3] = 1, r = (-3/4,-5/4)
    #   unit 3: <r,c3> = 3/16 + 35/16 > 0 -> -: next[2] = 3, r = (-1/2,1/2)
    #   unit 2: <r,c2> = 5/8 + 1/8 > 0 -> -: next[1] = 2, r = (3/4,1/4)
    #   unit 0: <r,c0> = 9/16 + 1/16 > 0 -> -: next[0] = 0                                 -> [0, 2, 3, 1]
    g = [[[1, 0], [1, 1], [-1, 0], [0, -2]]]
    assert run_epochs("grab", [g, g], num_workers=1) == [[[0, 1, 2, 3]], [[1, 3, 2, 0]], [[0, 2, 3, 1]]]


def test_grab_w1_n4_d1_centering_matters():
    # g = [4, 0, 0, 0] in epochs 0 and 1, then g = [0, 0, 0, 2].
    # epoch 0 (μ = 0), visit 0 1 2 3: unit 0 tie -> - (next[3] = 0, r = -4); units 1..3 have
    #   g = 0, so <r,g> = 0 -> - each: next[2] = 1, next[1] = 2, next[0] = 3                -> [3, 2, 1, 0]
    # epoch 1 (μ = 1, c = [3, -1, -1, -1]), visit 3 2 1 0:
    #   unit 3: c = -1, tie -> -: next[3] = 3, r = 1
    #   unit 2: c = -1, <r,c> = -1 < 0 -> +: next[0] = 2, r = 0
    #   unit 1: c = -1, tie -> -: next[2] = 1, r = 1
    #   unit 0: c = 3, <r,c> = 3 > 0 -> -: next[1] = 0                                      -> [2, 0, 1, 3]
    #   (without the stale mean every decision would tie and the order would just reverse)
    # epoch 2 (μ = 1 from epoch 1, c = [-1, -1, -1, 1]), visit 2 0 1 3:
    #   unit 2: tie -> -: next[3] = 2, r = 1
    #   unit 0: <r,c> = -1 -> +: next[0] = 0, r = 0
    #   unit 1: tie -> -: next[2] = 1, r = 1
    #   unit 3: <r,c> = 1 > 0 -> -: next[1] = 3                                              -> [0, 3, 1, 2]
    g = [[[4], [0], [0], [0]]]
    g2 = [[[0], [0], [0], [2]]]
    expected = [[[0, 1, 2, 3]], [[3, 2, 1, 0]], [[2, 0, 1, 3]], [[0, 3, 1, 2]]]
    assert run_epochs("grab", [g, g, g2], num_workers=1) == expected


def test_cd_grab_w2_n4_coordinates_workers():
    # worker 0: a = [3, 1, 0, 2]; worker 1: b = [0, 4, 5, 1]; visit 0 1 2 3 on both.
    # p = 0 (L = 0, R = 3):
    #   w0 pair (0,1): v = 2, r = 0 tie -> -: next0[0] = 1, next0[3] = 0, r = -2
    #   w1 pair (0,1): v = -4, <r,v> = 8 > 0 -> -: next1[0] = 1, next1[3] = 0, r = 2
    # p = 1 (L = 1, R = 2):
    #   w0 pair (2,3): v = -2, <r,v> = -4 < 0 -> +: next0[1] = 2, next0[2] = 3, r = 0
    #   w1 pair (2,3): v = 4, r = 0 tie -> -: next1[1] = 3, next1[2] = 2, r = -4
    # -> next0 = [1, 2, 3, 0], next1 = [1, 3, 2, 0]
    # epoch 1: a = [1, 2, 4, 8], b = [8, 4, 2, 1]; visit0 = 1 2 3 0, visit1 = 1 3 2 0.
    # p = 0: w0 pair (1,2): v = -2, tie -> -: next0[0] = 2, next0[3] = 1, r = 2
    #        w1 pair (1,3): v = 3, <r,v> = 6 > 0 -> -: next1[0] = 3, next1[3] = 1, r = -1
    # p = 1: w0 pair (3,0): v = 7, <r,v> = -7 < 0 -> +: next0[1] = 3, next0[2] = 0, r = 6
    #        w1 pair (2,0): v = -6, <r,v> = -36 < 0 -> +: next1[1] = 2, next1[2] = 0, r = 0
    # -> next0 = [2, 3, 0, 1], next1 = [3, 2, 0, 1]
    epoch0 = [[[3], [1], [0], [2]], [[0], [4], [5], [1]]]
    epoch1 = [[[1], [2], [4], [8]], [[8], [4], [2], [1]]]
    expected = [
        [[0, 1, 2, 3], [0, 1, 2, 3]],
        [[1, 2, 3, 0], [1, 3, 2, 0]],
        [[2, 3, 0, 1], [3, 2, 0, 1]],
    ]
    assert run_epochs("cd-grab", [epoch0, epoch1], num_workers=2) == expected


def test_pair_balance_w2_n4_keeps_sums_apart():
    # Same epoch-0 vectors as the cd-grab case, one running sum per worker:
    #   w0: pair (0,1): v = 2, tie -> -: next0 = [1, ., ., 0], r0 = -2
    #       pair (2,3): v = -2, <r0,v> = 4 > 0 -> -: next0[1] = 3, next0[2] = 2              -> [1, 3, 2, 0]
    #   w1: pair (0,1): v = -4, tie -> -: next1 = [1, ., ., 0], r1 = 4
    #       pair (2,3): v = 4, <r1,v> = 16 > 0 -> -: next1[1] = 3, next1[2] = 2             -> [1, 3, 2, 0]
    epoch0 = [[[3], [1], [0], [2]], [[0], [4], [5], [1]]]
    expected = [[[0, 1, 2, 3], [0, 1, 2, 3]], [[1, 3, 2, 0], [1, 3, 2, 0]]]
    assert run_epochs("pair-balance", [epoch0], num_workers=2) == expected


def test_cd_grab_w2_odd_n3_middle_slots():
    # worker 0: a = [1, 3, 5]; worker 1: b = [2, 9, 4]
    #   p = 0: w0 pair (0,1): v = -2, tie -> -: next0[0] = 1, next0[2] = 0, r = 2
    #          w1 pair (0,1): v = -7, <r,v> = -14 < 0 -> +: next1[0] = 0, next1[2] = 1, r = -5
    #   each worker's last unit (2) takes its middle slot 1
    # -> next0 = [1, 2, 0], next1 = [0, 2, 1]   (pair-balance would give [1, 2, 0] for both)
    epoch0 = [[[1], [3], [5]], [[2], [9], [4]]]
    assert run_epochs("cd-grab", [epoch0], num_workers=2) == [[[0, 1, 2], [0, 1, 2]], [[1, 2, 0], [0, 2, 1]]]
    assert run_epochs("pair-balance", [epoch0], num_workers=2)[1] == [[1, 2, 0], [1, 2, 0]]


@pytest.mark.parametrize("name", ["pair-balance", "cd-grab"])
def test_n2_first_pair_tie_flips_every_epoch(name):
    # n = 2: the only pair of rank 0 is the epoch's first decision, r = 0 -> ε = -1 -> [b, a],
    # whatever the vectors are. pair-balance: the same for every worker (each has its own r = 0).
    torch.manual_seed(0)
    epochs = [torch.randn(3, 2, 4).tolist() for _ in range(4)]
    out = run_epochs(name, epochs, num_workers=3)
    workers = range(3) if name == "pair-balance" else [0]
    for e, orders in enumerate(out):
        for w in workers:
            assert orders[w] == ([0, 1] if e % 2 == 0 else [1, 0])


def test_probabilistic_tiny_c_is_hand_checkable():
    # c -> 0: p = clip(1/2 - <r,v>/(2c), 0, 1) is 1 for <r,v> < 0, 0 for > 0, and 1/2 on a tie.
    # g = [1, 0, 3, 1] (as in test_pair_balance_w1_n4_d1). The first pair is a tie: ε = +1 iff u0 < 1/2,
    # u0 the first draw of rng_for(0, 0, 0, BALANCE).
    #   ε0 = +1: next[0] = 0, next[3] = 1, r = 1; pair (2,3): <r,v> = 2 > 0 -> p = 0 -> -: [0, 3, 2, 1]
    #   ε0 = -1: r = -1; pair (2,3): <r,v> = -2 < 0 -> p = 1 -> +:                          [1, 2, 3, 0]
    u0 = float(torch.rand((), generator=rng_for(0, 0, 0, BALANCE)))
    expected = [0, 3, 2, 1] if u0 < 0.5 else [1, 2, 3, 0]
    epochs = [[[[1], [0], [3], [1]]]]
    out = run_epochs("pair-balance", epochs, num_workers=1, balance="probabilistic", balance_c=1e-6)
    assert out[1] == [expected]
    out = run_epochs("cd-grab", epochs, num_workers=1, balance="probabilistic", balance_c=1e-6)
    assert out[1] == [expected]
