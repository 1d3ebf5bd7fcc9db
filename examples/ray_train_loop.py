"""A Ray Train user loop with orderlab's DistributedOrderedSampler (CD-GraB), against random reshuffling.

``ray.train.torch.TorchTrainer`` runs ``train_loop_per_worker`` on CPU workers with a gloo process
group. ``prepare_data_loader`` replaces a loader's sampler with a ``DistributedSampler`` unless it
is called with ``add_dist_sampler=False`` (Ray issues 22406, 22108), so the loop passes that to keep
the DistributedOrderedSampler; the baseline loop uses Ray's default (``add_dist_sampler=True``: a
shuffling ``DistributedSampler``, which Ray reseeds each epoch when the loop calls ``set_epoch``).
Logistic regression on scikit-learn's digits (``orderlab.tasks.make_task("digits-logreg")``).

Run (the datasets directory from ``orderlab data fetch digits-logreg --data-dir DIR``; this starts a
local Ray, or joins RAY_ADDRESS)::

    ORDERLAB_DATA=DIR python examples/ray_train_loop.py --num-workers 2 --epochs 5

It prints each sampler's final training loss (the mean over the whole training set, from rank 0).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any

import ray
import ray.train.torch
import torch
import torch.nn.functional as F
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from orderlab.sampler import DistributedOrderedSampler, per_example_gradients
from orderlab.tasks import load_task_data, make_task


def digits(data_dir: str, num_examples: int | None) -> TensorDataset:
    """scikit-learn's digits training set, or a fixed random subset of ``num_examples`` of it."""
    data = load_task_data(make_task("digits-logreg"), data_dir, num_examples)
    return TensorDataset(data.train_inputs, data.train_targets)


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, float]:
    """One Ray Train worker: its process group is up (gloo); returns rank 0's final loss."""
    torch.set_num_threads(1)
    dataset = digits(config["data_dir"], config["num_examples"])
    batch_size = config["batch_size"]
    if config["ordering"] == "random reshuffling":
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True)
        loader = ray.train.torch.prepare_data_loader(loader)  # Ray's DistributedSampler
        sampler = None
    else:
        # rank and world size from the process group Ray Train set up
        sampler = DistributedOrderedSampler(len(dataset), config["ordering"], seed=0, batch_size=batch_size)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler)
        loader = ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False)  # keeps the sampler
        assert loader.sampler is sampler, "prepare_data_loader replaced the sampler"
    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(nn.Linear(dataset.tensors[0].shape[1], 10))  # DDP
    module = getattr(model, "module", model)
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"])
    for epoch in range(config["epochs"]):
        if sampler is None:
            loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]  # Ray's DistributedSampler
        for x, y in loader:
            if sampler is not None:
                grads, _ = per_example_gradients(module, F.cross_entropy, x, y)  # [B, d], no all-reduce
                sampler.observe(grads)
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()  # DDP averages the workers' gradients
            optimizer.step()
    with torch.no_grad():
        loss = float(F.cross_entropy(module(dataset.tensors[0]), dataset.tensors[1]))
    return {"loss": loss}


def train(config: dict[str, Any], num_workers: int, storage_path: str) -> float:
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=False),
        run_config=RunConfig(
            name=f"sampler-example-{config['ordering'].replace(' ', '-')}", storage_path=storage_path
        ),
    )
    return float(trainer.fit().return_value["loss"])  # Ray Train v2: rank 0's return value


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("ORDERLAB_DATA", "../shared/data"))
    parser.add_argument("--ordering", default="cd-grab")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16, help="examples per step on each worker")
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--num-examples", type=int, default=None, help="a prefix of the training set")
    parser.add_argument(
        "--storage-path", default=None, help="Ray Train's storage (default: a temporary directory)"
    )
    args = parser.parse_args(argv)
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False)
    config = {
        "data_dir": os.path.abspath(args.data_dir),  # the workers' working directory is not ours
        "num_examples": args.num_examples,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "epochs": args.epochs,
    }
    with tempfile.TemporaryDirectory() as tmp:
        storage = args.storage_path or tmp
        losses = {
            name: train({**config, "ordering": name}, args.num_workers, storage)
            for name in (args.ordering, "random reshuffling")
        }
    for name, loss in losses.items():
        print(f"final train loss, {name}: {loss:.6f}")
    return losses


if __name__ == "__main__":
    main()
