"""Parallel herding bound against the number of workers W: cd-grab stays flat, per-worker balancing grows.

The random-vector simulation of the CD-GraB paper (Cooper et al., NeurIPS 2023) at the scale of
docs/orderings.md "Measures": W·n = 8192 fixed unit-norm vectors (d = 16; a seeded torch generator
draws them normal, then each is scaled to norm 1), the same set for every W, worker w owning the
n = 8192 / W consecutive vectors w·n .. (w+1)·n - 1. Each of ``--rounds`` rounds (epochs), every worker
observes its own vectors in the epoch's visiting order and ``begin_epoch`` gives the next orders; the
parallel herding bound (``orderlab.herding.parallel_herding_bound``, ∞-norm) of the final orders is
reported as the mean over ``--seeds`` seeds (seed s draws the vectors and seeds the ordering).

Expected shape (the paper, there with W·n = 10^6 and 16 rounds): cd-grab about constant in W, per-worker
PairBalance (``pair-balance``, ID-GraB) growing like √W (the paper: about 2√W), rr far above both.

    python benchmarks/herding_vs_workers.py                 # the table and docs/figures/herding-vs-workers.png
    python benchmarks/herding_vs_workers.py --seeds 1 --workers 1,8,64 --figure /tmp/h.png
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
from _common import fmt, machine_line, markdown_table, parse_sizes

from orderlab.herding import parallel_herding_bound
from orderlab.orderings import make_ordering

ORDERINGS = ("rr", "grab", "pair-balance", "cd-grab")


def unit_vectors(total: int, dim: int, seed: int) -> torch.Tensor:
    """``total`` Gaussian vectors scaled to unit norm, drawn from a generator seeded with ``seed``:
    float32 [total, dim]."""
    z = torch.randn(total, dim, generator=torch.Generator().manual_seed(seed))
    return z / torch.linalg.vector_norm(z, dim=1, keepdim=True)


def final_orders(vectors: torch.Tensor, ordering: str, rounds: int, seed: int) -> torch.Tensor:
    """The orders after ``rounds`` rounds of reordering fixed ``vectors`` [W, n, d]: LongTensor [W, n].

    Each round every worker observes all of its vectors in the round's visiting order, in one call.
    """
    num_workers, shard_size, dim = vectors.shape
    o = make_ordering(ordering, num_workers=num_workers, shard_size=shard_size, dim=dim, seed=seed)
    orders = o.begin_epoch()
    for _ in range(rounds):
        if o.needs_gradients:
            o.observe(torch.gather(vectors, 1, orders.unsqueeze(-1).expand(-1, -1, dim)))
        orders = o.begin_epoch()
    return orders


def bounds_by_workers(
    orderings: list[str], workers: list[int], total: int, dim: int, rounds: int, seeds: int
) -> dict[tuple[str, int], list[float]]:
    """Final parallel herding bounds (∞-norm) by (ordering, W), one per seed."""
    bounds: dict[tuple[str, int], list[float]] = {}
    for seed in range(seeds):
        z = unit_vectors(total, dim, seed)
        for num_workers in workers:
            vectors = z.reshape(num_workers, total // num_workers, dim)  # shard w: n consecutive vectors
            for ordering in orderings:
                orders = final_orders(vectors, ordering, rounds, seed)
                bounds.setdefault((ordering, num_workers), []).append(parallel_herding_bound(vectors, orders))
        print(f"  seed {seed} done", flush=True)
    return bounds


def save_figure(
    path: str, orderings: list[str], workers: list[int], means: dict[tuple[str, int], float], title: str
) -> None:
    """Mean bound against W on log-log axes, one line per ordering and 2√W, as a PNG at ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    figure = Figure(figsize=(6.4, 4.4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for ordering in orderings:
        axes.plot(workers, [means[(ordering, w)] for w in workers], marker="o", label=ordering)
    axes.plot(workers, [2 * math.sqrt(w) for w in workers], "k:", label="2√W (about the paper's ID-GraB)")
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xticks(workers, [str(w) for w in workers])
    axes.yaxis.set_major_formatter(ScalarFormatter())
    axes.yaxis.set_minor_formatter(NullFormatter())
    axes.set_yticks([1, 2, 3, 5, 10, 20, 30, 50])
    axes.set_xlabel("workers W (W·n fixed)")
    axes.set_ylabel("parallel herding bound (∞-norm)")
    axes.set_title(title, fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=parse_sizes, default=parse_sizes("1,2,4,8,16,32,64"))
    parser.add_argument("--orderings", default=",".join(ORDERINGS))
    parser.add_argument("--total", type=int, default=8192, help="W·n, the vectors over all workers")
    parser.add_argument("--dim", type=int, default=16, help="d of the vectors")
    parser.add_argument("--rounds", type=int, default=10, help="epochs of reordering")
    parser.add_argument("--seeds", type=int, default=5, help="seeds (vectors and orderings); mean")
    parser.add_argument("--figure", default="docs/figures/herding-vs-workers.png", help="PNG path")
    parser.add_argument("--quick", action="store_true", help="2 seeds")
    args = parser.parse_args()
    if args.quick:
        args.seeds = 2
    orderings = [name for name in args.orderings.split(",") if name]
    if any(args.total % w for w in args.workers):
        parser.error(f"every W in --workers must divide --total={args.total}")
    torch.set_num_threads(1)
    print(f"# herding_vs_workers: {machine_line()}", flush=True)
    started = time.perf_counter()
    bounds = bounds_by_workers(orderings, args.workers, args.total, args.dim, args.rounds, args.seeds)
    means = {key: statistics.mean(values) for key, values in bounds.items()}
    ratio = "pair-balance" in orderings and "cd-grab" in orderings
    header = ["W", "n", *orderings] + (["pair-balance ÷ cd-grab", "2√W"] if ratio else [])
    rows = []
    for w in args.workers:
        row = [str(w), f"{args.total // w:,}", *(fmt(means[(name, w)]) for name in orderings)]
        if ratio:
            row += [f"{means[('pair-balance', w)] / means[('cd-grab', w)]:.2f}", f"{2 * math.sqrt(w):.2f}"]
        rows.append(row)
    title = (
        f"W·n = {args.total:,} unit vectors, d = {args.dim}, {args.rounds} rounds, mean of {args.seeds} seeds"
    )
    print(f"\nParallel herding bound (∞-norm) of the final orders: {title}")
    print("(2√W: about the CD-GraB paper's ID-GraB bound, to compare with the pair-balance column)\n")
    print(markdown_table(header, rows))
    print("\nby seed:\n")
    print(
        markdown_table(
            ["W", *orderings],
            [
                [str(w), *(", ".join(fmt(b) for b in bounds[(name, w)]) for name in orderings)]
                for w in args.workers
            ],
        )
    )
    save_figure(args.figure, orderings, args.workers, means, title)
    print(f"\nfigure: {args.figure}")
    print(f"(herding_vs_workers took {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
