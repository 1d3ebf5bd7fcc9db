"""Order quality with CountSketch: cd-grab fed exact vs sketched vectors, against rr.

Simulation of docs/orderings.md "Measures", scaled up so that sketching compresses: fixed vectors
z[w, j] (W workers × n per worker), ``rounds`` rounds of reordering: each round feeds the vectors to
the ordering in the current orders (``observe``) and takes the next orders (``begin_epoch``). cd-grab
is fed either the exact vectors or their ``orderlab.grads.CountSketch`` (d -> m); the parallel
herding bound (``orderlab.herding.parallel_herding_bound``, ∞-norm) of the final orders is always
measured on the EXACT vectors. rr draws fresh permutations every round.

Vectors: unit-norm Gaussian random vectors (d = 4096, W = 4, n = 1024), and real per-example
gradients (``orderlab.grads.per_example_gradients``) of mnist1d-logreg (and mnist-logreg when
``orderlab.tasks`` has it) at the model's initial weights and after ``--sgd-steps`` SGD steps.
Bytes per pair: what a worker sends per pair difference in float32 (d × 4 exact, m × 4 sketched).

    python benchmarks/sketch_quality.py          # the README's table (about 2 minutes)
    python benchmarks/sketch_quality.py --quick  # d = 1024, n = 256, 2 seeds, 5 rounds
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import fmt, machine_line, markdown_table, median, parse_sizes

from orderlab.grads import CountSketch, num_parameters, per_example_gradients
from orderlab.herding import parallel_herding_bound
from orderlab.loop import build_model
from orderlab.orderings import make_ordering
from orderlab.tasks import TASKS, make_task, resolve_data_dir


def final_orders(
    vectors: torch.Tensor, ordering: str, rounds: int, seed: int, sketch_dim: int | None = None
) -> torch.Tensor:
    """The orders after ``rounds`` rounds of reordering fixed ``vectors`` [W, n, d]: LongTensor [W, n].

    With ``sketch_dim``, the ordering sees ``CountSketch(d, sketch_dim, seed)`` of the vectors.
    """
    num_workers, shard_size, dim = vectors.shape
    fed = vectors
    if sketch_dim is not None:
        sketch = CountSketch(dim, sketch_dim, seed)
        fed = sketch(vectors.reshape(-1, dim)).reshape(num_workers, shard_size, sketch_dim)
    o = make_ordering(ordering, num_workers=num_workers, shard_size=shard_size, dim=fed.shape[2], seed=seed)
    orders = o.begin_epoch()
    for _ in range(rounds):
        if o.needs_gradients:
            o.observe(torch.gather(fed, 1, orders.unsqueeze(-1).expand(-1, -1, fed.shape[2])))
        orders = o.begin_epoch()
    return orders


def compare(vectors_by_seed: dict[int, torch.Tensor], sketch_dims: list[int], rounds: int) -> list[dict]:
    """Final parallel herding bounds (on the exact vectors) per ordering and sketch size (m < d), by seed."""
    rows = []
    dim = next(iter(vectors_by_seed.values())).shape[2]
    cases = [("rr", None), ("cd-grab", None)] + [("cd-grab", m) for m in sketch_dims if m < dim]
    for ordering, sketch_dim in cases:
        orders = {
            seed: final_orders(v, ordering, rounds, seed, sketch_dim) for seed, v in vectors_by_seed.items()
        }
        bounds = [parallel_herding_bound(vectors_by_seed[seed], o) for seed, o in orders.items()]
        bounds_2 = [parallel_herding_bound(vectors_by_seed[seed], o, norm=2) for seed, o in orders.items()]
        rows.append(
            {
                "ordering": ordering,
                "sketch_dim": sketch_dim,
                "bytes_per_pair": 0 if ordering == "rr" else 4 * (sketch_dim or dim),
                "bound": median(bounds),
                "bounds": bounds,
                "bound_2": median(bounds_2),
            }
        )
    return rows


def random_vectors(num_workers: int, shard_size: int, dim: int, seed: int) -> torch.Tensor:
    """Unit-norm Gaussian vectors [W, n, d], float32."""
    z = torch.randn(num_workers, shard_size, dim, generator=torch.Generator().manual_seed(seed))
    return z / torch.linalg.vector_norm(z, dim=2, keepdim=True)


def task_gradients(
    task_name: str, num_workers: int, shard_size: int, sgd_steps: int, seed: int
) -> torch.Tensor:
    """Per-example gradients [W, n, d] of the task's first W × n training examples after ``sgd_steps`` steps.

    n is ``shard_size``, or less when the training set has fewer than W × ``shard_size`` examples.

    The steps are plain SGD (lr 0.1, batch 64, seeded batches) on the whole training set, from the
    model's initial weights (``orderlab.worker.build_model``); 0 steps: the initial weights.
    """
    task = make_task(task_name)
    data = task.load(resolve_data_dir(None))
    model = build_model(task, seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(sgd_steps):
        batch = torch.randint(len(data.train_targets), (64,), generator=generator)
        optimizer.zero_grad()
        task.loss(model(data.train_inputs[batch]), data.train_targets[batch]).backward()
        optimizer.step()
    shard_size = min(shard_size, len(data.train_targets) // num_workers)
    count = num_workers * shard_size
    grads = [
        per_example_gradients(
            model, task.loss, data.train_inputs[i : i + 256], data.train_targets[i : i + 256]
        )[0]
        for i in range(0, count, 256)
    ]
    return torch.cat(grads)[:count].reshape(num_workers, shard_size, num_parameters(model))


def table_rows(label: str, dim: int, rows: list[dict]) -> list[list[str]]:
    exact = next(r for r in rows if r["ordering"] == "cd-grab" and r["sketch_dim"] is None)
    rr = next(r for r in rows if r["ordering"] == "rr")
    out = []
    for r in rows:
        name = r["ordering"] if r["sketch_dim"] is None else f"cd-grab, CountSketch m={r['sketch_dim']}"
        if r["ordering"] == "cd-grab" and r["sketch_dim"] is None:
            name = "cd-grab, exact"
        out.append(
            [
                label,
                f"{dim:,}",
                name,
                fmt(r["bytes_per_pair"]) if r["ordering"] != "rr" else "0",
                fmt(r["bound"]),
                ", ".join(fmt(b) for b in r["bounds"]),
                f"{r['bound'] / exact['bound']:.2f}",
                f"{r['bound'] / rr['bound']:.2f}",
                fmt(r["bound_2"]),
                f"{r['bound_2'] / exact['bound_2']:.2f}",
            ]
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dim", type=int, default=4096, help="d of the random vectors")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--shard-size", type=int, default=1024, help="n vectors per worker")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument(
        "--seeds", type=int, default=3, help="seeds (vectors, first orders, sketches); median"
    )
    parser.add_argument("--sketch-dims", type=parse_sizes, default=parse_sizes("32,128,512,2048"))
    parser.add_argument("--tasks", default="mnist1d-logreg,mnist-logreg", help="tasks for real gradients")
    parser.add_argument("--sgd-steps", type=parse_sizes, default=parse_sizes("0,200"), help="gradient states")
    parser.add_argument("--quick", action="store_true", help="d = 1024, n = 256, 2 seeds, 5 rounds")
    args = parser.parse_args()
    if args.quick:
        args.dim, args.shard_size, args.seeds, args.rounds = 1024, 256, 2, 5
        args.sketch_dims = [m for m in args.sketch_dims if m < 1024]
    torch.set_num_threads(1)
    print(f"# sketch_quality: {machine_line()}", flush=True)
    started = time.perf_counter()
    seeds = range(args.seeds)
    W, n = args.workers, args.shard_size
    rows = table_rows(
        "random unit vectors",
        args.dim,
        compare({s: random_vectors(W, n, args.dim, s) for s in seeds}, args.sketch_dims, args.rounds),
    )
    tasks = [t for t in args.tasks.split(",") if t in TASKS]
    for task in tasks:
        for steps in args.sgd_steps:
            gradients = task_gradients(task, W, n, steps, seed=0)
            state = "initial weights" if steps == 0 else f"after {steps} SGD steps"
            label = f"{task} gradients ({state}, n = {gradients.shape[1]})"
            rows += table_rows(
                label,
                gradients.shape[2],
                compare({s: gradients for s in seeds}, args.sketch_dims, args.rounds),
            )
        print(f"  {task} done", flush=True)
    print(
        f"\nParallel herding bound (∞-norm; 2-norm in the last columns; on the exact vectors) after {args.rounds} rounds of reordering, "
        f"W = {W}, n = {n} per worker, median over {args.seeds} seeds (random vectors: new vectors per seed; "
        "gradients: fixed vectors, seeds vary the first orders and the sketch)"
    )
    print()
    header = [
        "vectors",
        "d",
        "ordering fed",
        "bytes/pair",
        "bound ∞",
        "by seed",
        "÷ exact cd-grab",
        "÷ rr",
        "bound 2-norm",
        "2-norm ÷ exact",
    ]
    print(markdown_table(header, rows))
    print(f"\n(sketch_quality took {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
