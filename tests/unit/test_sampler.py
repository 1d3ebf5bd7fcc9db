"""orderlab.sampler: the samplers give exactly the orders of ``make_ordering`` fed the same gradients
(one process, any chunking; 2 and 4 gloo processes for DistributedOrderedSampler), survive dry passes and
mid-epoch checkpoints, train a model through a DataLoader, and fail with clear errors."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from orderlab.config import load_config
from orderlab.errors import OrderlabError
from orderlab.grads import CountSketch, num_parameters
from orderlab.loop import TrainingLoop, build_model, plan_trial
from orderlab.orderings import ORDERINGS, PairStream, make_ordering, ordering_class
from orderlab.sampler import (
    DistributedOrderedSampler,
    OrderedSampler,
    assign_flat_gradient,
    microbatch_gradient,
    per_example_gradients,
    plan_shards,
)
from orderlab.simulated import SimulatedWorkers
from orderlab.tasks import load_task_data, make_task

DIM = 6
GRADIENT_ORDERINGS = sorted(name for name, cls in ORDERINGS.items() if cls.needs_gradients)


def unit_gradients(epoch: int, rank: int, shard_size: int, dim: int = DIM) -> torch.Tensor:
    """Fixed gradients [shard_size, dim] of rank ``rank``'s local units in ``epoch``, by unit index."""
    return torch.randn(shard_size, dim, generator=torch.Generator().manual_seed(1000 * epoch + rank))


def chunks(total: int, seed: int) -> list[int]:
    """Random chunk sizes (zeros and odd sizes included) summing to ``total``."""
    rng, sizes = np.random.default_rng(seed), []
    while sum(sizes) < total:
        sizes.append(min(int(rng.integers(0, 8)), total - sum(sizes)))
    return sizes


def observe_in_chunks(sampler: OrderedSampler, grads: torch.Tensor, seed: int) -> None:
    start = 0
    for size in chunks(len(grads), seed):
        sampler.observe(grads[start : start + size])
        start += size


def reference_orders(name: str, shard_size: int, epochs: int, **settings) -> list[np.ndarray]:
    """The W = 1 ordering's orders, fed each epoch's gradients in one call."""
    ordering = make_ordering(name, num_workers=1, shard_size=shard_size, dim=DIM, **settings)
    out = []
    for epoch in range(epochs):
        order = ordering.begin_epoch()[0]
        out.append(order.numpy())
        if ordering.needs_gradients:
            ordering.observe(unit_gradients(epoch, 0, shard_size)[order][None])
    return out


def run_epochs(sampler: OrderedSampler, epochs: int, dry_passes: int = 0) -> list[np.ndarray]:
    """Iterate ``epochs`` passes (after ``dry_passes`` passes observing nothing), observing each
    epoch's fixed gradients in random chunks; the unit orders."""
    for _ in range(dry_passes):
        list(sampler)
    out = []
    for epoch in range(epochs):
        order = np.array(list(sampler))
        out.append(order)
        observe_in_chunks(sampler, unit_gradients(epoch, 0, sampler.shard_size)[order], seed=epoch)
    return out


@pytest.mark.parametrize("name", sorted(ORDERINGS))
@pytest.mark.parametrize("shard_size", [20, 21])
def test_orders_equal_make_ordering_in_any_chunking(name, shard_size):
    sampler = OrderedSampler(shard_size, name, seed=5)
    got = run_epochs(sampler, 4)
    want = reference_orders(name, shard_size, 4, seed=5)
    for epoch, (g, w) in enumerate(zip(got, want, strict=True)):
        assert np.array_equal(g, w), f"{name} epoch {epoch}"
    assert sampler.epoch == 3 and sampler.num_dropped == 0


def test_observe_copies_what_it_keeps_so_a_reused_buffer_is_fine():
    n = 21
    sampler, buffer = OrderedSampler(n, "pair-balance", seed=5), torch.empty(8, DIM)
    for epoch, want in enumerate(reference_orders("pair-balance", n, 3, seed=5)):
        order = np.array(list(sampler))
        assert np.array_equal(order, want)
        grads, start = unit_gradients(epoch, 0, n)[order], 0
        for size in chunks(n, seed=epoch):  # odd chunks: the open pair's unit sits in the buffer
            sampler.observe(buffer[:size].copy_(grads[start : start + size]))
            start += size


def test_first_epoch_identity_and_probabilistic_rules_pass_through():
    settings = dict(seed=2, first_epoch="identity", balance="probabilistic", balance_c=3.0)
    sampler = OrderedSampler(15, "pair-balance", **settings)
    assert all(
        np.array_equal(g, w)
        for g, w in zip(
            run_epochs(sampler, 3), reference_orders("pair-balance", 15, 3, **settings), strict=True
        )
    )
    assert np.array_equal(run_epochs(OrderedSampler(15, "grab", **settings), 1)[0], np.arange(15))


def test_microbatch_units_yield_index_lists_and_take_one_row_per_unit():
    sampler = OrderedSampler(23, "grab", seed=1, unit="microbatch", microbatch_size=4)
    assert sampler.shard_size == 5 and sampler.num_dropped == 3 and len(sampler) == 5
    want = reference_orders("grab", 5, 3, seed=1)
    for epoch in range(3):
        batches = list(sampler)
        units = np.array([b[0] // 4 for b in batches])
        assert all(b == list(range(4 * u, 4 * u + 4)) for b, u in zip(batches, units, strict=True))
        assert np.array_equal(units, want[epoch])
        for row in unit_gradients(epoch, 0, 5)[units]:  # gradient accumulation: one [d] per microbatch
            sampler.observe(row)


def test_sketch_balances_the_count_sketch_of_pair_differences():
    n, m = 30, 4
    sampler = OrderedSampler(n, "pair-balance", seed=0, sketch_dim=m)
    ordering = make_ordering("pair-balance", num_workers=1, shard_size=n, dim=m, seed=0)
    sketch = CountSketch(DIM, m, seed=0)
    for epoch, got in enumerate(run_epochs(sampler, 3)):
        order = ordering.begin_epoch()[0]
        assert np.array_equal(got, order.numpy())
        ordering.observe_items(sketch(PairStream().push(unit_gradients(epoch, 0, n)[order]))[None])


def test_batch_size_cuts_the_tail_as_orderlab_trials_do():
    from orderlab.config import TrainConfig
    from orderlab.loop import plan_trial

    for unit, workers, per_worker, examples in [
        ("example", 3, 8, 1000),
        ("microbatch", 4, 5, 333),
        ("example", 1, 64, 1437),
    ]:
        train = TrainConfig(num_workers=workers, batch_size=workers * per_worker, unit=unit)
        trial = plan_trial(train, examples, dim=1, needs_gradients=True, message_kind="pair_differences")
        ours = plan_shards(
            examples,
            num_replicas=workers,
            rank=0,
            unit=unit,
            microbatch_size=per_worker if unit == "microbatch" else None,
            batch_size=per_worker,
        )
        assert (ours.shard_size, ours.num_dropped, ours.unit_size) == (
            trial.shard_size,
            trial.num_dropped,
            trial.unit_size,
        )


def test_a_dry_pass_changes_nothing():
    for name in GRADIENT_ORDERINGS:
        plain = run_epochs(OrderedSampler(17, name, seed=4), 3)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # one dry pass warns of nothing
            dry = run_epochs(OrderedSampler(17, name, seed=4), 3, dry_passes=1)
        assert all(np.array_equal(a, b) for a, b in zip(plain, dry, strict=True)), name


def test_gradient_free_orderings_move_on_after_each_complete_pass_or_at_set_epoch():
    sampler, want = OrderedSampler(12, "rr", seed=3), reference_orders("rr", 12, 4, seed=3)
    assert [np.array_equal(list(sampler), w) for w in want] == [True] * 4
    sampler.set_epoch(1)
    assert np.array_equal(list(sampler), want[1]) and sampler.epoch == 1
    flip = OrderedSampler(12, "flipflop", seed=3)
    flip.set_epoch(3)
    assert np.array_equal(list(flip), reference_orders("flipflop", 12, 4, seed=3)[3])


def test_never_observing_keeps_the_order_and_warns():
    sampler = OrderedSampler(10, "cd-grab", seed=0)
    first = list(sampler)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(sampler) == first  # the second pass: a dry pass was legitimate
    with pytest.warns(RuntimeWarning, match="observed nothing in 2 passes over epoch 0"):
        assert list(sampler) == first
    sampler.set_epoch(1)
    with pytest.warns(RuntimeWarning, match=r"set_epoch\(1\).*keeps that order"):
        assert list(sampler) == first
    assert sampler.epoch == 0


@pytest.mark.parametrize("name", ["pair-balance", "grab"])
def test_an_epoch_cut_short_is_completed_with_zero_gradients(name):
    n = 13
    sampler = OrderedSampler(n, name, seed=0)
    ordering = make_ordering(name, num_workers=1, shard_size=n, dim=DIM, seed=0)
    order = np.array(list(sampler))
    assert np.array_equal(order, ordering.begin_epoch()[0])
    grads = unit_gradients(0, 0, n)[order]
    sampler.observe(grads[:7])  # e.g. a DataLoader with drop_last=True dropped the last 6
    with pytest.warns(RuntimeWarning, match="7 of 13 units observed; the other 6 are balanced as zero"):
        got = list(sampler)
    ordering.observe(torch.cat([grads[:7], torch.zeros(6, DIM)])[None])
    assert np.array_equal(got, ordering.begin_epoch()[0]) and sampler.epoch == 1


def test_state_dict_mid_epoch_resumes_exactly():
    n = 19
    whole = run_epochs(OrderedSampler(n, "pair-balance", seed=7), 4)
    sampler = OrderedSampler(n, "pair-balance", seed=7)
    run_epochs(sampler, 1)
    order = np.array(list(sampler))
    grads = unit_gradients(1, 0, n)[order]
    sampler.observe(grads[:9])  # an open pair: unit 8 waits for its partner
    buffer = io.BytesIO()
    torch.save(sampler.state_dict(), buffer)
    buffer.seek(0)
    resumed = OrderedSampler(n, "pair-balance", seed=7)
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    assert len(resumed) == n - 9
    rest = np.array(list(resumed))
    assert np.array_equal(rest, order[9:]) and np.array_equal(order, whole[1])
    resumed.observe(grads[9:])
    for epoch in (2, 3):
        order = np.array(list(resumed))
        assert np.array_equal(order, whole[epoch]), epoch
        observe_in_chunks(resumed, unit_gradients(epoch, 0, n)[order], seed=epoch)


def test_state_dict_before_any_gradient_and_of_another_sampler():
    sampler = OrderedSampler(8, "grab", seed=1)
    list(sampler)
    state = sampler.state_dict()
    fresh = OrderedSampler(8, "grab", seed=1)
    fresh.load_state_dict(state)
    assert list(fresh) == list(sampler)
    with pytest.raises(OrderlabError, match=r"seed=1 \(here 2\)"):
        OrderedSampler(8, "grab", seed=2).load_state_dict(state)


def test_errors_name_the_argument_and_the_fix():
    with pytest.raises(OrderlabError, match="ordering.name='pairbalance' is unknown; known: .*pair-balance"):
        OrderedSampler(10, "pairbalance")
    with pytest.raises(OrderlabError, match="unit='batch' is unknown"):
        OrderedSampler(10, unit="batch")
    with pytest.raises(OrderlabError, match="needs microbatch_size"):
        OrderedSampler(10, unit="microbatch")
    with pytest.raises(OrderlabError, match="microbatch_size applies to unit='microbatch'"):
        OrderedSampler(10, microbatch_size=4)
    with pytest.raises(OrderlabError, match="batch_size=3 .* multiple of the unit's 2"):
        OrderedSampler(10, unit="microbatch", microbatch_size=2, batch_size=3)
    with pytest.raises(OrderlabError, match="num_examples=3 is fewer than"):
        OrderedSampler(3, batch_size=4)
    with pytest.raises(OrderlabError, match="sketch_dim=0"):
        OrderedSampler(10, sketch_dim=0)
    sampler = OrderedSampler(10, "pair-balance", dim=DIM)
    with pytest.raises(OrderlabError, match="observe before the first pass"):
        sampler.observe(torch.zeros(2, DIM))
    list(sampler)
    with pytest.raises(OrderlabError, match=r"expected \[k, dim=6\] per-example gradients.*got shape \[6\]"):
        sampler.observe(torch.zeros(DIM))
    with pytest.raises(OrderlabError, match=r"expected \[k, dim=6\].*got shape \[2, 5\]"):
        sampler.observe(torch.zeros(2, 5))
    with pytest.raises(OrderlabError, match="11 units, but only 10 of epoch 0's 10 remain"):
        sampler.observe(torch.zeros(11, DIM))
    sampler.observe(torch.zeros(1, DIM))
    sampler.set_epoch(0)
    with pytest.raises(OrderlabError, match=r"set_epoch\(0\).*1 of its 10 units observed.*set_epoch\(1\)"):
        list(sampler)
    sampler.set_epoch(5)
    with pytest.raises(OrderlabError, match=r"call set_epoch\(1\)"):
        list(sampler)
    with pytest.raises(OrderlabError, match="no torch.distributed process group"):
        DistributedOrderedSampler(10, "rr")
    with pytest.raises(OrderlabError, match="exchanges items between ranks"):
        DistributedOrderedSampler(10, "cd-grab", num_replicas=2, rank=0)
    with pytest.raises(OrderlabError, match=r"rank=2 must be in 0..num_replicas-1"):
        DistributedOrderedSampler(10, "rr", num_replicas=2, rank=2)
    with pytest.raises(OrderlabError, match="payload_dtype='int8' is unknown"):
        DistributedOrderedSampler(10, "rr", num_replicas=2, rank=0, payload_dtype="int8")


def w_worker_reference(
    name: str, num_workers: int, shard_size: int, epochs: int, **settings
) -> list[np.ndarray]:
    """orderlab's W-worker ordering fed every rank's fixed gradients in one call per epoch: [W, n] orders."""
    dim = settings.pop("dim", DIM)
    sketch = settings.pop("sketch", None)
    ordering = make_ordering(name, num_workers=num_workers, shard_size=shard_size, dim=dim, **settings)
    out = []
    for epoch in range(epochs):
        orders = ordering.begin_epoch()
        out.append(orders.numpy())
        if not ordering.needs_gradients:
            continue
        grads = torch.stack([unit_gradients(epoch, r, shard_size)[orders[r]] for r in range(num_workers)])
        if sketch is None:
            ordering.observe(grads)
        else:  # what the sampler exchanges: sketched pair differences in the payload dtype
            differences = PairStream().push(grads)
            items = sketch(differences.reshape(-1, DIM)).view(num_workers, -1, dim)
            ordering.observe_items(items.to(torch.bfloat16))
    return out


@pytest.mark.parametrize("name", ["pair-balance", "grab", "rr", "so"])
def test_rank_local_orderings_give_orderlab_orders_without_a_process_group(name):
    num_workers, n = 3, 11
    want = w_worker_reference(name, num_workers, n, 3, seed=9)
    for rank in range(num_workers):
        sampler = DistributedOrderedSampler(3 * n + 2, name, seed=9, num_replicas=num_workers, rank=rank)
        assert sampler.num_dropped == 2 and sampler.bytes_sent == 0
        for epoch in range(3):
            local = np.array(list(sampler)) - rank * n
            assert np.array_equal(local, want[epoch][rank]), (rank, epoch)
            if sampler.needs_gradients:
                observe_in_chunks(sampler, unit_gradients(epoch, rank, n)[local], seed=rank)


# ----- 2 and 4 gloo processes ----------------------------------------------------------------

SHARD, EPOCHS, SEED = 21, 3, 11
CASES = {
    "cd-grab": dict(ordering="cd-grab"),
    "cd-grab-sketch-bf16": dict(ordering="cd-grab", sketch_dim=4, payload_dtype="bfloat16"),
    "pair-balance": dict(ordering="pair-balance"),
    "pair-balance-probabilistic": dict(ordering="pair-balance", balance="probabilistic", balance_c=2.0),
    "grab": dict(ordering="grab"),
    "rr": dict(ordering="rr"),
}


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    results = {}
    for label, case in CASES.items():
        sampler = DistributedOrderedSampler(world * SHARD + 1, seed=SEED, exchange_items=4, **case)
        list(sampler)  # a dry pass on every rank
        orders = []
        for epoch in range(EPOCHS):
            sampler.set_epoch(epoch)  # DDP's habit: after the dry pass, epoch 0 again for rr too
            local = np.array(list(sampler)) - rank * SHARD
            orders.append(local)
            if sampler.needs_gradients:  # each rank chunks differently
                observe_in_chunks(sampler, unit_gradients(epoch, rank, SHARD)[local], seed=10 * rank + epoch)
        results[label] = {"orders": orders, "bytes_sent": sampler.bytes_sent, "dropped": sampler.num_dropped}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(main: Any, world: int, out_dir: Path) -> list[Any]:
    """Run ``main(rank, world, port, out_dir)`` in ``world`` spawned processes (120 s at most); each
    rank's ``out_dir/rank{r}.pt``."""
    context = mp.start_processes(
        main, args=(world, free_port(), str(out_dir)), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 120
    try:
        while not context.join(timeout=1):
            assert time.monotonic() < deadline, "the gloo processes did not finish in 120 s"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.mark.parametrize("world", [2, 4])
def test_distributed_sampler_in_gloo_processes_gives_orderlab_orders(tmp_path, world):
    results = run_ranks(_rank_main, world, tmp_path)
    for label, case in CASES.items():
        settings = {k: v for k, v in case.items() if k not in ("ordering", "sketch_dim", "payload_dtype")}
        if "sketch_dim" in case:
            settings.update(dim=case["sketch_dim"], sketch=CountSketch(DIM, case["sketch_dim"], SEED))
        want = w_worker_reference(case["ordering"], world, SHARD, EPOCHS, seed=SEED, **settings)
        for rank in range(world):
            got = results[rank][label]
            assert got["dropped"] == 1
            for epoch in range(EPOCHS):
                assert np.array_equal(got["orders"][epoch], want[epoch][rank]), (label, rank, epoch)
    # exchanged: 10 pair differences per epoch (21 units), float32 or 4 bfloat16 values; else nothing
    assert results[1]["cd-grab"]["bytes_sent"] == EPOCHS * 10 * DIM * 4
    assert results[1]["cd-grab-sketch-bf16"]["bytes_sent"] == EPOCHS * 10 * 4 * 2
    assert results[1]["pair-balance-probabilistic"]["bytes_sent"] == EPOCHS * 10 * DIM * 4
    assert all(results[1][label]["bytes_sent"] == 0 for label in ("pair-balance", "grab", "rr"))


# ----- DataLoader integration on digits ------------------------------------------------------


def digits(data_dir: Path) -> TensorDataset:
    from orderlab.tasks import load_task_data, make_task

    data = load_task_data(make_task("digits-logreg"), str(data_dir))
    return TensorDataset(data.train_inputs, data.train_targets, torch.arange(len(data.train_targets)))


def full_loss(model: nn.Module, dataset: TensorDataset) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(dataset.tensors[0]), dataset.tensors[1]))


def test_dataloader_trains_digits_with_per_example_gradients(data_dir):
    dataset = digits(data_dir)
    torch.manual_seed(0)
    model = nn.Linear(64, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    sampler = OrderedSampler(len(dataset), "pair-balance", seed=0, batch_size=32)
    loader = DataLoader(dataset, batch_size=32, sampler=sampler, drop_last=True)
    before, epoch_grads, epoch_orders = full_loss(model, dataset), [], []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # batch_size= leaves drop_last nothing to drop
        for _ in range(2):
            grads_seen, indices = [], []
            for x, y, index in loader:
                grads, loss = per_example_gradients(model, F.cross_entropy, x, y)
                assign_flat_gradient(model, grads.mean(dim=0))
                optimizer.step()
                sampler.observe(grads[:16])  # any chunking
                sampler.observe(grads[16:])
                grads_seen.append(grads)
                indices.extend(index.tolist())
            epoch_grads.append(torch.cat(grads_seen))
            epoch_orders.append(np.array(indices))
    assert full_loss(model, dataset) < 0.5 * before
    assert sampler.epoch == 1 and sampler.shard_size == len(dataset) // 32 * 32
    ordering = make_ordering("pair-balance", num_workers=1, shard_size=sampler.shard_size, dim=650, seed=0)
    for grads, order in zip(epoch_grads, epoch_orders, strict=True):
        assert np.array_equal(ordering.begin_epoch()[0], order)
        ordering.observe(grads[None])


def test_batch_sampler_with_microbatch_units_and_loader_workers(data_dir):
    dataset = digits(data_dir)
    torch.manual_seed(0)
    model = nn.Linear(64, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    sampler = OrderedSampler(len(dataset), "cd-grab", seed=1, unit="microbatch", microbatch_size=16)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=2)
    before, visited = full_loss(model, dataset), []
    for _ in range(2):
        visited.append([])
        for x, y, _ in loader:
            grad, _ = microbatch_gradient(model, F.cross_entropy, x, y)  # fills .grad too
            optimizer.step()
            sampler.observe(grad)
            visited[-1].append(int(y.shape[0]))
    assert full_loss(model, dataset) < 0.5 * before
    assert visited == [[16] * sampler.shard_size] * 2 and sampler.num_dropped == len(dataset) % 16


def test_the_sampler_imports_no_ray():
    code = "import sys, orderlab.sampler; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ----- against the platform's own trial ------------------------------------------------------


class RecordingWorkers(SimulatedWorkers):
    """The simulated backend's workers, keeping each epoch's orders and every step's unit gradients."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.orders: list[np.ndarray] = []
        self.grads: list[list[torch.Tensor]] = []

    def fetch_orders(self, epoch: int) -> tuple[np.ndarray, float]:
        orders, waited = super().fetch_orders(epoch)
        self.orders.append(orders.copy())
        self.grads.append([])
        return orders, waited

    def observe(self, unit_grads: torch.Tensor) -> None:
        self.grads[-1].append(unit_grads.clone())
        super().observe(unit_grads)


def _platform_rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    """One rank: its sampler fed its unit gradients of the recorded trial; whether each epoch's order
    is the trial's."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    trial = torch.load(Path(out_dir) / "trial.pt", weights_only=False)
    n = trial["shard_size"]
    sampler = DistributedOrderedSampler(world * n, trial["ordering"], seed=trial["seed"], dim=trial["dim"])
    same = []
    for orders, steps in zip(trial["orders"], trial["grads"], strict=True):
        same.append(np.array_equal(np.array(list(sampler)) - rank * n, orders[rank]))
        for step in steps:
            sampler.observe(step[rank])
    torch.save(same, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.datasets
@pytest.mark.parametrize("name", ["cd-grab", "pair-balance", "grab"])
def test_samplers_give_the_platform_trials_orders(tmp_path, name):
    """A digits trial of orderlab (the simulated backend, 2 workers, 3 epochs): each rank's
    DistributedOrderedSampler in its own gloo process, fed that rank's unit gradients of the trial
    in its visiting order, hands out the trial's orders every epoch."""
    config = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
    cfg = load_config(config, {"sweep": {}, "train.epochs": 3, "ordering.name": name, "seed": 5})
    task = make_task(cfg.task.name)
    data = load_task_data(task, cfg.task.data_dir)
    ordering = ordering_class(name)
    dim = num_parameters(build_model(task, cfg.seed))
    plan = plan_trial(
        cfg.train, len(data.train_targets), dim, ordering.needs_gradients, ordering.message_kind
    )
    workers = RecordingWorkers(cfg, plan)
    TrainingLoop(
        cfg, plan, workers, trial_id="t", results_root=str(tmp_path), device=torch.device("cpu")
    ).run()
    assert len({str(orders) for orders in workers.orders}) == 3  # the trial's orders move every epoch
    recorded = {"ordering": name, "seed": cfg.seed, "dim": dim, "shard_size": plan.shard_size}
    torch.save({**recorded, "orders": workers.orders, "grads": workers.grads}, tmp_path / "trial.pt")
    assert run_ranks(_platform_rank_main, plan.num_workers, tmp_path) == [[True] * 3] * plan.num_workers
