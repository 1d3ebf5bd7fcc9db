"""The drop-in sampler's time per step against the training step itself (issue 20, item 5).

A user's loop on synthetic MNIST-shaped data (784 inputs, 10 classes, batch 64 per process): a
two-layer MLP (784-H-10; H = 128 is ~0.1 M parameters, H = 1024 ~0.8 M), SGD, one torch thread
per process. Each step is timed in three parts, in the order a loop with the sampler runs them:

- step: the training step alone, as with random reshuffling (forward, ``backward`` — through DDP,
  with its all-reduce, for the distributed rows — and ``optimizer.step``);
- grads: ``orderlab.sampler.per_example_gradients`` (``torch.func.vmap``), the [64, d] the sampler
  balances, needed only for it (unit="microbatch" needs none: the step's own gradient is the unit's);
- observe: ``sampler.observe(grads)``, with, for cd-grab, its all-gather of pair differences.

The ratios are the medians of grads and observe over the median step (steps after the first 3).
One process (``OrderedSampler``), then 2 gloo processes (``DistributedOrderedSampler``, DDP on gloo)
both sharing this machine's cores, in one run. Synthetic data, so no datasets directory is needed.

    python benchmarks/sampler_overhead.py            # H = 128 and 1024, 3 epochs of 24 steps (~2 min)
    python benchmarks/sampler_overhead.py --quick    # H = 128, 2 epochs of 12 steps (~10 s)
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from datetime import timedelta
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from _common import fmt, machine_line, markdown_table, median
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from orderlab.sampler import DistributedOrderedSampler, OrderedSampler, per_example_gradients

BATCH = 64
PLAIN = {
    "pair-balance": dict(ordering="pair-balance"),
    "grab": dict(ordering="grab"),
    "pair-balance, sketch_dim=4096": dict(ordering="pair-balance", sketch_dim=4096),
}
DISTRIBUTED = {
    "pair-balance (no exchange)": dict(ordering="pair-balance"),
    "cd-grab, float32": dict(ordering="cd-grab"),
    "cd-grab, bfloat16": dict(ordering="cd-grab", payload_dtype="bfloat16"),
    "cd-grab, sketch_dim=4096": dict(ordering="cd-grab", sketch_dim=4096),
}


def mlp(hidden: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def measure(model: nn.Module, sampler: Any, inputs: torch.Tensor, targets: torch.Tensor, epochs: int) -> dict:
    """Median seconds per step of the step, the per-example gradients and observe."""
    module = getattr(model, "module", model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    times: dict[str, list[float]] = {"step": [], "grads": [], "observe": []}
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        order = iter(sampler)
        while batch := list(islice(order, BATCH)):
            x, y = inputs[batch], targets[batch]
            started = time.perf_counter()
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            stepped = time.perf_counter()
            grads, _ = per_example_gradients(module, F.cross_entropy, x, y)
            graded = time.perf_counter()
            sampler.observe(grads)
            observed = time.perf_counter()
            for key, seconds in zip(
                times, (stepped - started, graded - stepped, observed - graded), strict=True
            ):
                times[key].append(seconds)
    return {key: median(values[3:]) for key, values in times.items()}


def data(num_examples: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.rand(num_examples, 784, generator=generator)
    return inputs, torch.randint(0, 10, (num_examples,), generator=generator)


def rank_main(
    rank: int, world: int, port: int, hidden_sizes: list[int], steps: int, epochs: int, out: str
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    inputs, targets = data(world * steps * BATCH)
    rows = {}
    for hidden in hidden_sizes:
        for label, case in DISTRIBUTED.items():
            model = DistributedDataParallel(mlp(hidden))
            sampler = DistributedOrderedSampler(len(inputs), seed=0, batch_size=BATCH, **case)
            rows[(hidden, label)] = measure(model, sampler, inputs, targets, epochs)
    if rank == 0:
        torch.save(rows, out)
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def table(rows: dict, hidden_sizes: list[int]) -> str:
    cells = []
    for (hidden, label), t in rows.items():
        params = sum(p.numel() for p in mlp(hidden).parameters())
        cells.append(
            [
                label,
                f"{params:,}",
                fmt(1e3 * t["step"]),
                fmt(1e3 * t["grads"]),
                fmt(1e3 * t["observe"]),
                fmt(t["observe"] / t["step"], 2),
                fmt((t["grads"] + t["observe"]) / t["step"], 2),
            ]
        )
    header = [
        "sampler",
        "d",
        "step ms",
        "grads ms",
        "observe ms",
        "observe / step",
        "(grads + observe) / step",
    ]
    return markdown_table(header, cells)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="H = 128 only, 2 epochs of 12 steps")
    parser.add_argument("--hidden", default=None, help="hidden widths, comma-separated (default 128,1024)")
    parser.add_argument("--steps", type=int, default=None, help="steps per epoch per process (default 24)")
    parser.add_argument("--epochs", type=int, default=None, help="default 3")
    args = parser.parse_args()
    hidden_sizes = [int(h) for h in (args.hidden or ("128" if args.quick else "128,1024")).split(",")]
    steps = args.steps or (12 if args.quick else 24)
    epochs = args.epochs or (2 if args.quick else 3)
    print(machine_line())
    print(
        f"\nbatch {BATCH} per process, {steps} steps per epoch, {epochs} epochs; medians over steps 4 onwards\n"
    )

    torch.set_num_threads(1)
    inputs, targets = data(steps * BATCH)
    plain = {}
    for hidden in hidden_sizes:
        for label, case in PLAIN.items():
            plain[(hidden, label)] = measure(
                mlp(hidden), OrderedSampler(len(inputs), **case), inputs, targets, epochs
            )
    print("### One process: `OrderedSampler` in a plain loop\n")
    print(table(plain, hidden_sizes))

    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rank0.pt")
        mp.start_processes(
            rank_main,
            args=(world, free_port(), hidden_sizes, steps, epochs, out),
            nprocs=world,
            start_method="spawn",
        )
        distributed = torch.load(out, weights_only=False)
    print(f"\n### {world} gloo processes: `DistributedOrderedSampler` in a DDP loop (rank 0's times)\n")
    print(table(distributed, hidden_sizes))


if __name__ == "__main__":
    main()
