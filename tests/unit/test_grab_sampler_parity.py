"""Parity with grab-sampler 0.1.3 (docs/orderings.md, "Published implementations and how they differ").

"With first_epoch: identity and the same vectors, pair-balance and grab with W=1 must give exactly
the orders of grab-sampler's PairBalance and MeanBalance."

grab-sampler's protocol (grabsampler/sorter/SorterBase.py, MeanBalance.py, PairBalance.py and
GraBSampler.__iter__): call ``reset_epoch()`` at the start of every epoch, the first included; the
epoch's order is then ``sorter.orders``; ``step({name: grads[b, ...]})`` balances the next b examples,
assumed to arrive in the order ``sorter.orders`` (it pairs consecutive examples across calls).

Install (torch-sparse is imported at module level by a random projection we do not use, so it is
stubbed below when missing; do not install it, it would pull a different torch):
    pip install --no-deps grab-sampler==0.1.3 && pip install overrides absl-py scikit-learn
"""

from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np
import pytest
import torch

from orderlab.orderings import make_ordering
from orderlab.sampler import OrderedSampler

_stub_torch_sparse = (
    importlib.util.find_spec("grabsampler") is not None and importlib.util.find_spec("torch_sparse") is None
)
if _stub_torch_sparse:
    # grabsampler.utils.random_projection.JLVerySparseRP does `from torch_sparse import SparseTensor`
    # at import time; only that projection uses it.
    _stub = types.ModuleType("torch_sparse")
    _stub.SparseTensor = object  # type: ignore[attr-defined]
    sys.modules["torch_sparse"] = _stub
try:
    pytest.importorskip("grabsampler")
finally:
    if _stub_torch_sparse:
        del sys.modules["torch_sparse"]

from grabsampler.sorter import MeanBalance, PairBalance  # noqa: E402

SORTERS = {"grab": MeanBalance, "pair-balance": PairBalance}
NUM_EPOCHS = 3


def reference_orders(name, vectors_per_epoch, chunk):
    """grab-sampler's orders for epochs 0..E, fed ``chunk`` examples per ``step``."""
    n, d = vectors_per_epoch[0].shape
    sorter = SORTERS[name](n, d, random_first_epoch=False, dtype=torch.float32, device="cpu")
    out = []
    for vectors in vectors_per_epoch:
        sorter.reset_epoch()
        order = sorter.orders.clone()
        out.append(order)
        for start in range(0, n, chunk):
            sorter.step({"g": vectors[order[start : start + chunk]]})
    sorter.reset_epoch()
    out.append(sorter.orders.clone())
    return out


def orderlab_orders(name, vectors_per_epoch, chunk):
    n, d = vectors_per_epoch[0].shape
    o = make_ordering(name, num_workers=1, shard_size=n, dim=d, seed=0, first_epoch="identity")
    out = []
    for vectors in vectors_per_epoch:
        orders = o.begin_epoch()
        out.append(orders[0])
        for start in range(0, n, chunk):
            o.observe(vectors[orders[0, start : start + chunk]].unsqueeze(0))
    out.append(o.begin_epoch()[0])
    return out


@pytest.mark.parametrize("name", ["grab", "pair-balance"])
@pytest.mark.parametrize("n,d", [(2, 1), (8, 3), (32, 5), (100, 16)])
@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_orders_match_grab_sampler(name, n, d, chunk):
    rng = np.random.default_rng(n * 1000 + d)
    vectors = torch.from_numpy(rng.standard_normal((NUM_EPOCHS, n, d)).astype(np.float32))
    theirs = reference_orders(name, list(vectors), chunk)
    ours = orderlab_orders(name, list(vectors), chunk)
    assert len(theirs) == len(ours) == NUM_EPOCHS + 1
    for epoch, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a.tolist() == b.tolist(), f"epoch {epoch}"
    assert ours[-1].tolist() != list(range(n)) or n == 2  # the comparison is not vacuous


@pytest.mark.parametrize("name", ["grab", "pair-balance"])
def test_orders_match_grab_sampler_with_fixed_vectors(name):
    """The same vectors every epoch (grab's stale mean is then the exact mean)."""
    rng = np.random.default_rng(7)
    fixed = torch.from_numpy(rng.standard_normal((64, 8)).astype(np.float32))
    vectors = [fixed] * 5
    theirs = reference_orders(name, vectors, 4)
    ours = orderlab_orders(name, vectors, 4)
    for epoch, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a.tolist() == b.tolist(), f"epoch {epoch}"


def sampler_orders(name, vectors_per_epoch, chunk):
    """``orderlab.sampler.OrderedSampler``'s orders (one pass per epoch, ``observe`` in chunks)."""
    n = len(vectors_per_epoch[0])
    sampler = OrderedSampler(n, name, seed=0, first_epoch="identity")
    out = []
    for vectors in vectors_per_epoch:
        order = torch.tensor(list(sampler))
        out.append(order)
        for start in range(0, n, chunk):
            sampler.observe(vectors[order[start : start + chunk]])
    out.append(torch.tensor(list(sampler)))
    return out


@pytest.mark.parametrize("name", ["grab", "pair-balance"])
@pytest.mark.parametrize("n,d", [(2, 1), (32, 5), (100, 16)])
@pytest.mark.parametrize("chunk", [1, 7])
def test_ordered_sampler_gives_grab_sampler_orders(name, n, d, chunk):
    """The drop-in sampler at W = 1 (issue 20, item 3): grab-sampler's orders on the same gradients."""
    rng = np.random.default_rng(n * 1000 + d + 1)
    vectors = list(torch.from_numpy(rng.standard_normal((NUM_EPOCHS, n, d)).astype(np.float32)))
    theirs = reference_orders(name, vectors, chunk)
    ours = sampler_orders(name, vectors, chunk)
    assert len(ours) == NUM_EPOCHS + 1
    for epoch, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a.tolist() == b.tolist(), f"epoch {epoch}"
