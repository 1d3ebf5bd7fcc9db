"""Reduced-precision payloads and CountSketch, the two ways to shrink what workers send."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from orderlab.grads import CountSketch
from orderlab.orderings import OrderingSpec, make_ordering
from orderlab.server import OrderMessage, OrderServer
from orderlab.wire import decode_payload, encode_payload


@pytest.mark.parametrize(("payload_dtype", "bytes_per_value", "torch_dtype"),
                         [("float32", 4, torch.float32), ("float16", 2, torch.float16), ("bfloat16", 2, torch.bfloat16)])  # fmt: skip
def test_payload_round_trip_is_the_rounded_value(payload_dtype, bytes_per_value, torch_dtype):
    items = np.random.default_rng(0).standard_normal((5, 7), dtype=np.float32)
    wire = encode_payload(items, payload_dtype)
    assert wire.nbytes == items.size * bytes_per_value
    expected = torch.from_numpy(items).to(torch_dtype).to(torch.float32)
    assert torch.equal(decode_payload(wire), expected)


@pytest.mark.parametrize("payload_dtype", ["float16", "bfloat16"])
def test_server_balances_the_widened_payload(payload_dtype):
    num_workers, shard_size, dim = 2, 10, 6
    grads = torch.randn(num_workers, shard_size, dim, generator=torch.Generator().manual_seed(1))
    server = OrderServer("cd-grab", OrderingSpec(num_workers=num_workers, shard_size=shard_size, dim=dim))
    reference = make_ordering("cd-grab", num_workers=num_workers, shard_size=shard_size, dim=dim, seed=0)
    orders = reference.begin_epoch()

    async def one_epoch() -> np.ndarray:
        for w in range(num_workers):
            g = grads[w, orders[w]]
            diffs = (g[0::2] - g[1::2]).numpy()
            await server.push([OrderMessage(0, 0, w, encode_payload(diffs, payload_dtype))])
        return np.stack([await server.begin_epoch(1, w) for w in range(num_workers)])

    got = asyncio.run(one_epoch())
    visited = torch.stack([grads[w, orders[w]] for w in range(num_workers)])
    diffs = visited[:, 0::2] - visited[:, 1::2]
    reference.observe_items(decode_payload(encode_payload(diffs.numpy(), payload_dtype)))
    assert np.array_equal(got, reference.begin_epoch().numpy())


def test_count_sketch_is_linear_seeded_and_preserves_inner_products_on_average():
    dim, sketch_dim = 1000, 64
    x, y = torch.randn(2, dim, generator=torch.Generator().manual_seed(2))
    sketch = CountSketch(dim, sketch_dim, seed=7)
    assert sketch(x[None]).shape == (1, sketch_dim)
    assert torch.allclose(sketch((x - y)[None]), sketch(x[None]) - sketch(y[None]), atol=1e-5)
    assert torch.equal(CountSketch(dim, sketch_dim, seed=7)(x[None]), sketch(x[None]))
    assert not torch.equal(CountSketch(dim, sketch_dim, seed=8)(x[None]), sketch(x[None]))
    # each coordinate lands in one bucket with a sign: the norm is kept in expectation
    estimates = [
        float(CountSketch(dim, sketch_dim, seed=s)(torch.stack([x, y])).prod(0).sum()) for s in range(300)
    ]
    exact = float(x @ y)
    assert abs(np.mean(estimates) - exact) < 4 * np.std(estimates) / np.sqrt(len(estimates))
