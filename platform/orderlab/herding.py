"""Herding measures of docs/orderings.md, "Measures".

Source: Lu et al., GraB (NeurIPS 2022), Sec. 3 (herding bound); Cooper et al., CD-GraB
(NeurIPS 2023), Sec. 3 (parallel herding bound).
"""

from __future__ import annotations

import math

import torch


def _max_prefix_norm(steps: torch.Tensor, norm: float) -> float:
    """Max over prefixes of ||sum of the first t rows|| for ``steps`` [T, d], accumulated in float64."""
    prefix = torch.cumsum(steps.to(torch.float64), dim=0)
    return float(torch.linalg.vector_norm(prefix, ord=norm, dim=1).max())


def herding_bound(vectors: torch.Tensor, order: torch.Tensor | None = None, norm: float = math.inf) -> float:
    """Herding bound max_k ||sum_{t<=k} (z_order[t] - z_mean)|| of a sequence.

    Args:
        vectors: [N, d] float tensor, z by index.
        order: LongTensor [N], the visiting order (default: index order).
        norm: vector norm, ``math.inf`` (the spec's measure) or 2.

    Returns:
        The bound as a Python float (computed in float64).

    Raises:
        ValueError: ``vectors`` is not 2-D, or ``order`` is not 1-D of length N.
    """
    if vectors.ndim != 2:
        raise ValueError(f"vectors must have shape [N, d], got {tuple(vectors.shape)}")
    if order is not None and tuple(order.shape) != (vectors.shape[0],):
        raise ValueError(f"order must have shape [{vectors.shape[0]}], got {tuple(order.shape)}")
    z = vectors if order is None else vectors[order]
    return _max_prefix_norm(z - vectors.to(torch.float64).mean(dim=0), norm)


def parallel_herding_bound(
    vectors: torch.Tensor, orders: torch.Tensor, norm: float = math.inf, chunk: int = 4096
) -> float:
    """Parallel herding bound of W orders: max_t ||sum_{s<=t} sum_w (z[w, orders[w, s]] - z_mean)||.

    Computed ``chunk`` coordinates at a time (both norms separate over coordinates: the ∞-norm's
    maximum, the 2-norm's sum of squares per step), so the float64 working memory is
    W × n × chunk × 8 bytes whatever d (every unit of a 6,400-example LeNet trial: 1.6 GB of float32
    vectors, 1 GB of float64 at once without chunks per 100 K coordinates).

    Args:
        vectors: [W, n, d] float tensor, z[w, j] = vector of worker w's local unit j.
        orders: LongTensor [W, n], orders[w, s] = the unit worker w visits at step s.
        norm: vector norm, ``math.inf`` (the spec's measure) or 2.
        chunk: coordinates per pass (> 0).

    Returns:
        The bound as a Python float; z_mean is the mean over all W*n vectors (float64).

    Raises:
        ValueError: ``vectors`` is not 3-D or ``orders`` is not [W, n].
    """
    if vectors.ndim != 3:
        raise ValueError(f"vectors must have shape [W, n, d], got {tuple(vectors.shape)}")
    num_workers, shard_size, dim = vectors.shape
    if orders.shape != (num_workers, shard_size):
        raise ValueError(f"orders must have shape [{num_workers}, {shard_size}], got {tuple(orders.shape)}")
    if norm not in (math.inf, 2):
        raise ValueError(f"norm={norm} must be math.inf or 2 (the norms that separate over coordinates)")
    best = torch.zeros(shard_size, dtype=torch.float64)  # per step: max |coordinate|, or sum of squares
    for first in range(0, dim, chunk):
        z = vectors[:, :, first : first + chunk].to(torch.float64)
        visited = torch.gather(z, 1, orders.unsqueeze(-1).expand(-1, -1, z.shape[2]))  # [W, n, chunk]
        per_step = visited.sum(dim=0) - num_workers * z.reshape(-1, z.shape[2]).mean(dim=0)  # [n, chunk]
        prefix = torch.cumsum(per_step, dim=0)
        if norm == math.inf:
            best = torch.maximum(best, prefix.abs().amax(dim=1))
        else:
            best += (prefix * prefix).sum(dim=1)
    return float((best if norm == math.inf else best.sqrt()).max())
