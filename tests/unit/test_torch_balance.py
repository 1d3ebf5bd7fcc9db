"""The orderings balancing with torch on a device (``orderings._torch_balance``) against the CPU kernel.

Every test runs the torch path on the CPU; the ``cuda`` ones run it on a GPU as well, skipped with a
reason where there is none (benchmarks/device_check.py runs them on the GPU machine).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orderlab.orderings import make_ordering
from orderlab.sampler import OrderedSampler

NO_GPU = (
    "needs a CUDA GPU (torch.cuda.is_available() is False here); benchmarks/device_check.py runs it on one"
)
DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)]
    ),
]
GRADIENT_ORDERINGS = ["grab", "pair-balance", "cd-grab"]
W, N = 4, 11  # odd n: every worker's last unit takes the middle slot


def items_of_epochs(
    name: str, dim: int, payload: torch.dtype, epochs: int, seed: int
) -> list[list[torch.Tensor]]:
    """Per epoch, what a worker sends the ordering, in calls: unit gradients [W, k, dim] for grab (11
    units in calls of 3, 5, 3), pair differences [W, p, dim] otherwise (5 pairs in calls of 2, 3), in
    ``payload``."""
    generator = torch.Generator().manual_seed(seed)
    calls = [3, 5, 3] if name == "grab" else [2, 3]
    return [[torch.randn(W, k, dim, generator=generator).to(payload) for k in calls] for _ in range(epochs)]


def balance_epochs(name: str, dim: int, items: list[list[torch.Tensor]], device: str | None, **spec) -> tuple:
    """The orders of every epoch and the last running sums, balancing on ``device`` (None: the CPU
    kernel) the items of each epoch moved there."""
    ordering = make_ordering(name, num_workers=W, shard_size=N, dim=dim, seed=3, **spec)
    if device is not None:
        ordering.balance_on(device)
    orders = []
    for calls in items:
        orders.append(ordering.begin_epoch())
        for call in calls:
            ordering.observe_items(call if device is None else call.to(device))
    orders.append(ordering.begin_epoch())
    return orders, ordering


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("payload", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [3, 1000, 40_000])  # 40,000: three of the CPU kernel's chunks
@pytest.mark.parametrize("name", GRADIENT_ORDERINGS)
def test_the_torch_kernel_gives_the_cpu_kernels_orders_and_sums(name, dim, payload, device):
    items = items_of_epochs(name, dim, payload, epochs=3, seed=dim)
    expected, cpu = balance_epochs(name, dim, items, None)
    got, torch_path = balance_epochs(name, dim, items, device)
    assert torch_path.state.running_sum.device.type == device
    for epoch, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert torch.equal(a, b), f"epoch {epoch}"
    # float32 r ± v on both: the same sums bit for bit
    assert torch.equal(torch_path.state.running_sum.cpu(), cpu.state.running_sum)
    assert len({order_bytes(o) for o in expected}) == len(expected)  # the orders did move


def order_bytes(orders: torch.Tensor) -> bytes:
    return orders.numpy().tobytes()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", GRADIENT_ORDERINGS)
def test_the_probabilistic_rule_draws_as_on_the_cpu(name, device):
    items = items_of_epochs(name, 64, torch.float32, epochs=2, seed=7)
    spec = {"balance": "probabilistic", "balance_c": 5.0}
    expected, _ = balance_epochs(name, 64, items, None, **spec)
    got, _ = balance_epochs(name, 64, items, device, **spec)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["pair-balance", "cd-grab"])
def test_unit_gradients_pair_on_the_device(name, device):
    """``observe`` of unit gradients, pairs straddling calls, differenced on the device."""
    generator = torch.Generator().manual_seed(1)
    grads = [torch.randn(W, k, 500, generator=generator) for k in (3, 4, 4)]  # 11 units per worker
    orders = {}
    for where in (None, device):
        ordering = make_ordering(name, num_workers=W, shard_size=N, dim=500, seed=0)
        if where is not None:
            ordering.balance_on(where)
        ordering.begin_epoch()
        for call in grads:
            ordering.observe(call if where is None else call.to(where))
        orders[where] = ordering.begin_epoch()
    assert torch.equal(orders[device], orders[None])


def test_wire_bits_balance_as_their_tensors():
    """bfloat16 payloads as the order server holds them (one int16 array per worker) give the orders
    of the same payloads as one bfloat16 tensor."""
    items = items_of_epochs("cd-grab", 300, torch.bfloat16, epochs=1, seed=2)
    as_bits = [[[rows.view(torch.int16).numpy() for rows in call] for call in calls] for calls in items]
    expected, _ = balance_epochs("cd-grab", 300, items, "cpu")
    ordering = make_ordering("cd-grab", num_workers=W, shard_size=N, dim=300, seed=3)
    ordering.balance_on("cpu")
    ordering.begin_epoch()
    for call in as_bits[0]:
        ordering.observe_items(call)
    assert torch.equal(ordering.begin_epoch(), expected[1])


@pytest.mark.parametrize("name", GRADIENT_ORDERINGS)
def test_a_checkpoint_moves_between_the_kernels(name):
    """A torch-path ordering's state_dict (CPU tensors) resumes in a CPU-kernel ordering exactly."""
    items = items_of_epochs(name, 200, torch.float32, epochs=2, seed=5)
    expected, _ = balance_epochs(name, 200, items, None)
    first = make_ordering(name, num_workers=W, shard_size=N, dim=200, seed=3)
    first.balance_on("cpu")
    first.begin_epoch()
    for call in items[0]:
        first.observe_items(call)
    first.begin_epoch()
    first.observe_items(items[1][0])
    state = first.state_dict()
    assert state["running_sum"].device.type == "cpu"
    resumed = make_ordering(name, num_workers=W, shard_size=N, dim=200, seed=3)
    resumed.load_state_dict(state)
    for call in items[1][1:]:
        resumed.observe_items(call)
    assert torch.equal(resumed.begin_epoch(), expected[2])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
@pytest.mark.parametrize("name", GRADIENT_ORDERINGS)
def test_gpu_items_keep_the_running_sums_on_the_gpu(name):
    """Items on the GPU move a default ordering's running sums there (no ``balance_on``), and they stay."""
    items = items_of_epochs(name, 1000, torch.float32, epochs=2, seed=11)
    expected, _ = balance_epochs(name, 1000, items, None)
    ordering = make_ordering(name, num_workers=W, shard_size=N, dim=1000, seed=3)
    orders = []
    for calls in items:
        orders.append(ordering.begin_epoch())
        for call in calls:
            ordering.observe_items(call.cuda())
            assert ordering.state.running_sum.is_cuda
    orders.append(ordering.begin_epoch())
    for a, b in zip(orders, expected, strict=True):
        assert torch.equal(a, b)
    assert np.array_equal(orders[-1].numpy(), expected[-1].numpy())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
@pytest.mark.parametrize("name", GRADIENT_ORDERINGS)
def test_the_sampler_balances_gpu_gradients_on_the_gpu(name):
    """``OrderedSampler.observe`` of CUDA gradients: the orders of the same gradients on the CPU,
    with the ordering's running sums on the GPU."""
    orders = {}
    for device in ("cpu", "cuda"):
        sampler, generator, orders[device] = (
            OrderedSampler(N, name, seed=5),
            torch.Generator().manual_seed(0),
            [],
        )
        for _ in range(3):
            orders[device].append(np.array(list(sampler)))
            grads = torch.randn(N, 300, generator=generator).to(device)
            sampler.observe(grads[:5])
            sampler.observe(grads[5:])
    assert sampler.ordering.state.running_sum.is_cuda
    for a, b in zip(orders["cuda"], orders["cpu"], strict=True):
        assert np.array_equal(a, b)
