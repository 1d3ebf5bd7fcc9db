"""A plain PyTorch loop with orderlab's OrderedSampler, against the same loop with random reshuffling.

Logistic regression on scikit-learn's digits (``orderlab.tasks.make_task("digits-logreg")``), SGD,
the same initial weights and steps for both; only the sampler differs. Each step takes per-example
gradients (``per_example_gradients``), steps on their mean and hands them to ``sampler.observe``.

Run (the datasets directory from ``orderlab data fetch digits-logreg --data-dir DIR``)::

    ORDERLAB_DATA=DIR python examples/plain_loop.py --ordering pair-balance --epochs 5

It prints each sampler's final training loss (the mean over the whole training set).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, Sampler, TensorDataset

from orderlab.sampler import OrderedSampler, assign_flat_gradient, per_example_gradients
from orderlab.tasks import load_task_data, make_task


def digits(data_dir: str, num_examples: int | None) -> TensorDataset:
    """scikit-learn's digits training set, or a fixed random subset of ``num_examples`` of it."""
    data = load_task_data(make_task("digits-logreg"), data_dir, num_examples)
    return TensorDataset(data.train_inputs, data.train_targets)


def train(dataset: TensorDataset, sampler: Sampler, *, epochs: int, batch_size: int, lr: float) -> float:
    """Train logistic regression from seed-0 weights; the final mean training loss."""
    torch.manual_seed(0)
    model = nn.Linear(dataset.tensors[0].shape[1], 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler)
    observe = getattr(sampler, "observe", None)
    for _ in range(epochs):
        for x, y in loader:
            grads, _ = per_example_gradients(model, F.cross_entropy, x, y)  # [B, d]
            assign_flat_gradient(model, grads.mean(dim=0))  # the minibatch gradient, into .grad
            optimizer.step()
            if observe is not None:
                observe(grads)  # the order of the next epoch learns from these
    with torch.no_grad():
        return float(F.cross_entropy(model(dataset.tensors[0]), dataset.tensors[1]))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("ORDERLAB_DATA", "../shared/data"))
    parser.add_argument("--ordering", default="pair-balance", help="pair-balance, grab, cd-grab, ...")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--num-examples", type=int, default=None, help="a prefix of the training set")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    dataset = digits(args.data_dir, args.num_examples)
    settings = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr)
    ordered = OrderedSampler(len(dataset), args.ordering, seed=args.seed)
    losses = {
        args.ordering: train(dataset, ordered, **settings),
        "random reshuffling": train(
            dataset, RandomSampler(dataset, generator=torch.Generator().manual_seed(args.seed)), **settings
        ),
    }
    for name, loss in losses.items():
        print(f"final train loss, {name}: {loss:.6f}")
    return losses


if __name__ == "__main__":
    main()
