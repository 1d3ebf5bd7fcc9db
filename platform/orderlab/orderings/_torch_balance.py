"""The balancing rules with torch tensors on any device: running sums that stay on a GPU.

``fused_balance`` (numba, ``_balance.py``) balances numpy arrays on the CPU. When an ordering's
items are on a GPU (or ``balance_on`` chose a device), grab, pair-balance and cd-grab keep their
running sums on that device and balance with ``balance_step`` instead: per vector one product and
one float64 reduction (the inner product), the sign, and one in-place update, all launched without
waiting for the GPU; the signs come back to the host once per ``observe`` call.

Same signs as the CPU rule (docs/orderings.md, "Balancing sign"): ε = +1 iff <r, v> < 0, a tie
gives -1. r stays float32 and each coordinate gets r + ε v exactly as on the CPU (ε v is exact), so
the running sums are bit-identical while the signs are. The inner products differ only in rounding:
float32 products summed in float64 here, float32 within chunks of 16,384 coordinates and float64
across them there, so an order can differ only where |<r, v>| is within rounding of 0, e.g.
|<r, v>| < 1e-6 ‖r‖ ‖v‖ at d = 1e6 (random vectors there meet one such near-tie in about a
million decisions). tests/unit/test_torch_balance.py checks equal orders on CPU and CUDA.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from orderlab.orderings._balance import BalancingEpochs, Items, SignRule, rank_arrays

#: payload dtypes balanced as they are (widened to float32 inside the kernels); others become float32
_PAYLOAD_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def items_device(items: Items) -> torch.device | None:
    """The device of ``items`` when they are torch tensors off the CPU (a GPU), else None."""
    first = items if isinstance(items, torch.Tensor) else (items[0] if len(items) else None)
    if isinstance(first, torch.Tensor) and first.device.type != "cpu":
        return first.device
    return None


def device_rows(items: Items, num_workers: int, dim: int, what: str, device: torch.device) -> torch.Tensor:
    """Every worker's items as one tensor [num_workers, k, dim] on ``device``, without a copy when
    they are one tensor there already.

    Args:
        items: a tensor [num_workers, k, dim], or one array or tensor [k, dim] per worker: float32,
            float16 and bfloat16 stay as they are (numpy uint16 / int16 are float16 / bfloat16 bits,
            the wire formats), other dtypes become float32.

    Raises:
        ValueError: not num_workers items, or an item not [k, dim] with the same k for all.
    """
    if isinstance(items, torch.Tensor) and items.ndim == 3:
        rows = items.detach()
        if rows.shape[0] != num_workers or rows.shape[2] != dim:
            raise ValueError(
                f"{what} must have shape [num_workers={num_workers}, k, dim={dim}], got {tuple(rows.shape)}"
            )
    elif (
        not isinstance(items, torch.Tensor)
        and len(items) == num_workers
        and all(isinstance(item, torch.Tensor) and item.device == device for item in items)
    ):
        shapes = {tuple(item.shape) for item in items}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2 or next(iter(shapes))[1] != dim:
            raise ValueError(
                f"{what} must be [k, dim={dim}] per worker with one k for all, got {sorted(shapes)}"
            )
        rows = torch.stack([torch.as_tensor(item).detach() for item in items])
    else:  # numpy arrays or CPU tensors: rank_arrays checks them and gives float32 or wire bits
        arrays = np.stack(rank_arrays(items, num_workers, dim, what))
        rows = torch.from_numpy(arrays)
        if arrays.dtype == np.uint16:
            rows = torch.from_numpy(arrays.view(np.int16)).view(torch.float16)
        elif arrays.dtype == np.int16:
            rows = rows.view(torch.bfloat16)
    if rows.dtype not in _PAYLOAD_DTYPES:
        rows = rows.to(torch.float32)
    return rows.to(device)


def balance_step(
    running_sums: torch.Tensor,
    vectors: torch.Tensor,
    sign: SignRule,
    sum_indices: Sequence[int],
    out: torch.Tensor,
) -> None:
    """One balancing step for S running sums at once: ε_s from <r_s, v_s>, then r_s += ε_s v_s.

    Args:
        running_sums: float32 [S, d], updated in place. vectors: [S, d] float32, float16 or
            bfloat16, on the same device. sign: the sign rule (deterministic: decided on the device,
            no wait; probabilistic: the inner products come to the host for the rule's draws).
        sum_indices: the running sums' indices for the probabilistic rule's generators.
        out: float32 [S] on the device: receives ε (+1.0 or -1.0).
    """
    inner = torch.sum(running_sums * vectors, dim=1, dtype=torch.float64)
    if sign.probabilistic:
        signs = [
            1.0 if sign.positive(value, s) else -1.0
            for value, s in zip(inner.tolist(), sum_indices, strict=True)
        ]
        out.copy_(torch.tensor(signs))
    else:
        out.copy_(torch.where(inner < 0.0, 1.0, -1.0))  # orderings.md: strict; the tie at r = 0 gives ε = -1
    running_sums.addcmul_(vectors, out.unsqueeze(1))


def balance_pairs(state: BalancingEpochs, differences: torch.Tensor, coordinated: bool) -> np.ndarray:
    """PairBalance's signs for the next p pairs of every worker, on the running sums' device.

    Args:
        state: the ordering's epochs; ``state.running_sum`` [1 or W, d] float32 is updated in place.
        differences: [W, p, d] pair differences on that device (float32, float16 or bfloat16).
        coordinated: cd-grab's one sum, pairs pair-major and rank-minor; else a sum per worker.

    Returns:
        bool [p, W]: ε = +1 per pair, as ``SignRule.balance_rows`` gives them (docs/orderings.md).
    """
    num_workers, num_pairs = differences.shape[:2]
    sums = state.running_sum
    signs = torch.empty(num_pairs, num_workers, dtype=torch.float32, device=sums.device)
    everyone = range(num_workers)
    for j in range(num_pairs):
        if coordinated:
            for w in everyone:
                balance_step(sums, differences[w, j].unsqueeze(0), state.sign, (0,), signs[j, w : w + 1])
        else:
            balance_step(sums, differences[:, j], state.sign, everyone, signs[j])
    return (signs > 0).cpu().numpy()


def balance_centered(
    state: BalancingEpochs, grads: torch.Tensor, stale_mean: torch.Tensor, gradient_sum: torch.Tensor
) -> np.ndarray:
    """MeanBalance's signs for the next k units of every worker: c = g - μ balanced per worker.

    Args:
        state: the ordering's epochs; ``state.running_sum`` [W, d] float32 is updated in place.
        grads: float32 [W, k, d]. stale_mean: float32 [W, d], μ. gradient_sum: float32 [W, d], this
            epoch's sum of raw gradients, updated in place (sequentially, as on the CPU). All on
            the running sums' device.

    Returns:
        bool [k, W]: ε = +1 per unit.
    """
    num_workers, num_units = grads.shape[:2]
    sums = state.running_sum
    signs = torch.empty(num_units, num_workers, dtype=torch.float32, device=sums.device)
    for j in range(num_units):
        balance_step(sums, grads[:, j] - stale_mean, state.sign, range(num_workers), signs[j])
        gradient_sum += grads[:, j]
    return (signs > 0).cpu().numpy()
