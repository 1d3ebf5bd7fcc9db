"""DDP under ``torchrun`` with orderlab's DistributedOrderedSampler (CD-GraB), against random reshuffling.

Logistic regression on scikit-learn's digits (``orderlab.tasks.make_task("digits-logreg")``), one
process per rank on the gloo backend (CPU). Each rank takes its examples' per-example gradients for
the sampler (``per_example_gradients`` on the unwrapped module) and steps with DDP's usual
``loss.backward()``, whose all-reduce averages the ranks' gradients. The sampler all-gathers pair
differences on a gloo group of its own, so every rank gets orderlab's CD-GraB orders. The baseline
is the same loop with ``torch.utils.data.DistributedSampler(shuffle=True)`` and ``set_epoch``.

Run (the datasets directory from ``orderlab data fetch digits-logreg --data-dir DIR``)::

    ORDERLAB_DATA=DIR torchrun --nproc_per_node 2 examples/ddp_torchrun.py --epochs 5

Rank 0 prints each sampler's final training loss (the mean over the whole training set).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Sampler, TensorDataset

from orderlab.sampler import DistributedOrderedSampler, per_example_gradients
from orderlab.tasks import load_task_data, make_task


def digits(data_dir: str, num_examples: int | None) -> TensorDataset:
    """scikit-learn's digits training set, or a fixed random subset of ``num_examples`` of it."""
    data = load_task_data(make_task("digits-logreg"), data_dir, num_examples)
    return TensorDataset(data.train_inputs, data.train_targets)


def train(dataset: TensorDataset, sampler: Sampler, *, epochs: int, batch_size: int, lr: float) -> float:
    """Train from seed-0 weights (the same on every rank); the final mean training loss."""
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Linear(dataset.tensors[0].shape[1], 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler)
    observe = getattr(sampler, "observe", None)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)  # type: ignore[attr-defined]  # both samplers take it
        for x, y in loader:
            if observe is not None:
                grads, _ = per_example_gradients(model.module, F.cross_entropy, x, y)  # [B, d], no all-reduce
                observe(grads)
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()  # DDP averages the ranks' gradients
            optimizer.step()
    with torch.no_grad():
        return float(F.cross_entropy(model.module(dataset.tensors[0]), dataset.tensors[1]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("ORDERLAB_DATA", "../shared/data"))
    parser.add_argument("--ordering", default="cd-grab")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16, help="examples per step on each rank")
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--num-examples", type=int, default=None, help="a prefix of the training set")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # rank, world size and address from torchrun's environment
    dataset = digits(args.data_dir, args.num_examples)
    settings = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr)
    # batch_size= cuts each rank's shard to whole steps, so every rank takes the same number of steps
    ordered = DistributedOrderedSampler(
        len(dataset), args.ordering, seed=args.seed, batch_size=args.batch_size
    )
    losses = {
        args.ordering: train(dataset, ordered, **settings),
        "random reshuffling": train(
            dataset, DistributedSampler(dataset, shuffle=True, seed=args.seed), **settings
        ),
    }
    if dist.get_rank() == 0:
        print(
            f"ranks: {dist.get_world_size()}; examples no rank visits ({args.ordering}): {ordered.num_dropped}"
        )
        print(
            f"exchanged by the sampler: {ordered.bytes_sent} bytes sent by rank 0, {ordered.wait_seconds:.3f} s waited"
        )
        for name, loss in losses.items():
            print(f"final train loss, {name}: {loss:.6f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
