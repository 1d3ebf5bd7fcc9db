"""The Ray-free parts of the training loop (orderlab.loop): trial plan, LR schedules, optimizers, model init, shards.

Expected values are computed here from the formulas (not by calling torch's schedulers); no Ray
cluster is started.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from orderlab.config import LRScheduleConfig, TrainConfig
from orderlab.errors import OrderlabError
from orderlab.loop import Shard, build_model, make_lr_scheduler, make_optimizer, plan_trial
from orderlab.tasks import TaskData, make_task

CPU = torch.device("cpu")

# --------------------------------------------------------------------------------------------------
# plan_trial
# --------------------------------------------------------------------------------------------------

# (num_examples, num_workers, batch_size)
PLAN_CASES = [(103, 4, 12), (50, 3, 6), (96, 4, 12), (12, 4, 12), (1000, 1, 32), (37, 2, 2), (64, 8, 8)]


@pytest.mark.parametrize(("num_examples", "num_workers", "batch_size"), PLAN_CASES)
def test_plan_with_example_units(num_examples: int, num_workers: int, batch_size: int) -> None:
    train = TrainConfig(num_workers=num_workers, batch_size=batch_size, unit="example")
    plan = plan_trial(train, num_examples, dim=17, needs_gradients=True, message_kind="pair_differences")
    k = batch_size // num_workers
    shard_size = (num_examples // (num_workers * k)) * k
    assert plan.num_workers == num_workers
    assert plan.unit_size == 1 and plan.units_per_step == k
    assert plan.shard_size == shard_size
    assert plan.steps_per_epoch == shard_size // k and plan.steps_per_epoch * k == plan.shard_size
    assert plan.num_dropped == num_examples - num_workers * shard_size
    assert 0 <= plan.num_dropped < num_workers * k  # less than one global step is dropped
    assert (plan.dim, plan.needs_gradients, plan.message_kind) == (17, True, "pair_differences")


@pytest.mark.parametrize(("num_examples", "num_workers", "batch_size"), PLAN_CASES)
def test_plan_with_microbatch_units(num_examples: int, num_workers: int, batch_size: int) -> None:
    train = TrainConfig(num_workers=num_workers, batch_size=batch_size, unit="microbatch")
    plan = plan_trial(train, num_examples, dim=5, needs_gradients=False, message_kind="none")
    microbatch = batch_size // num_workers
    shard_size = num_examples // (num_workers * microbatch)  # units; one unit per step
    assert plan.unit_size == microbatch and plan.units_per_step == 1
    assert plan.shard_size == shard_size and plan.steps_per_epoch == shard_size
    assert plan.num_dropped == num_examples - num_workers * shard_size * microbatch
    assert (plan.dim, plan.needs_gradients, plan.message_kind) == (5, False, "none")


@pytest.mark.parametrize("unit", ["example", "microbatch"])
def test_plan_rejects_too_few_examples(unit: str) -> None:
    train = TrainConfig(num_workers=4, batch_size=12, unit=unit)
    with pytest.raises(OrderlabError, match=r"train\.num_workers"):
        plan_trial(train, 11, dim=3, needs_gradients=True, message_kind="unit_gradients")
    with pytest.raises(OrderlabError, match=r"train\.num_workers"):
        plan_trial(train, 0, dim=3, needs_gradients=True, message_kind="unit_gradients")
    smallest = plan_trial(train, 12, dim=3, needs_gradients=True, message_kind="unit_gradients")
    assert smallest.steps_per_epoch == 1


# --------------------------------------------------------------------------------------------------
# make_optimizer
# --------------------------------------------------------------------------------------------------


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))


def test_make_optimizer_sgd() -> None:
    model = tiny_model()
    train = TrainConfig(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4)
    optimizer = make_optimizer(train, model)
    assert type(optimizer) is torch.optim.SGD
    group = optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(0.05)
    assert group["momentum"] == pytest.approx(0.9) and group["weight_decay"] == pytest.approx(1e-4)
    assert [id(p) for p in group["params"]] == [id(p) for p in model.parameters()]


@pytest.mark.parametrize(("name", "cls"), [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_make_optimizer_adam_family(name: str, cls: type) -> None:
    model = tiny_model()
    train = TrainConfig(optimizer=name, lr=3e-3, betas=(0.8, 0.95), weight_decay=0.02)
    optimizer = make_optimizer(train, model)
    assert type(optimizer) is cls
    group = optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(3e-3)
    assert tuple(group["betas"]) == pytest.approx((0.8, 0.95))
    assert group["weight_decay"] == pytest.approx(0.02)
    assert len(group["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize(
    ("scaling", "base", "expected"),
    [
        ("none", None, 0.1),
        ("none", 16, 0.1),
        ("linear", 16, 0.1 * 64 / 16),
        ("sqrt", 16, 0.1 * math.sqrt(64 / 16)),
        ("linear", 128, 0.1 * 64 / 128),
        ("sqrt", 256, 0.1 * math.sqrt(64 / 256)),
    ],
)
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_make_optimizer_scales_lr(optimizer: str, scaling: str, base: int | None, expected: float) -> None:
    train = TrainConfig(
        optimizer=optimizer, lr=0.1, batch_size=64, num_workers=4, lr_scaling=scaling, lr_base_batch_size=base
    )
    assert make_optimizer(train, tiny_model()).param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)


# --------------------------------------------------------------------------------------------------
# make_lr_scheduler: the LR before each optimizer step, from the formulas
# --------------------------------------------------------------------------------------------------


def expected_lr(train: TrainConfig, steps_per_epoch: int, t: int) -> float:
    """The LR in force for step t (0-based; t = total steps is the value after the last step)."""
    schedule, lr = train.lr_schedule, train.effective_lr
    total = train.epochs * steps_per_epoch
    if schedule.name == "constant":
        return lr
    if schedule.name == "step":
        return lr * schedule.gamma ** (t // (schedule.step_size * steps_per_epoch))
    if schedule.name == "multistep":
        passed = sum(1 for m in schedule.milestones if t >= m * steps_per_epoch)
        return lr * schedule.gamma**passed
    if schedule.name == "linear":  # lr -> min_lr linearly over all steps
        return lr + (schedule.min_lr - lr) * min(t, total) / total
    warmup = schedule.warmup_epochs * steps_per_epoch if schedule.name == "warmup-cosine" else 0
    if t < warmup:  # linear from lr / (warmup + 1) up to lr at t = warmup
        return lr * (t + 1) / (warmup + 1)
    progress = (t - warmup) / (total - warmup)
    return schedule.min_lr + (lr - schedule.min_lr) * (1 + math.cos(math.pi * progress)) / 2


SCHEDULES = {
    "constant": dict(epochs=4, lr_schedule="constant"),
    "step": dict(epochs=7, lr_schedule=dict(name="step", step_size=2, gamma=0.5)),
    "multistep": dict(epochs=6, lr_schedule=dict(name="multistep", milestones=[1, 4], gamma=0.1)),
    "cosine": dict(epochs=4, lr_schedule=dict(name="cosine", min_lr=0.01)),
    "cosine-to-zero": dict(epochs=3, lr_schedule="cosine"),
    "linear": dict(epochs=4, lr_schedule=dict(name="linear", min_lr=0.01)),
    "linear-to-zero": dict(epochs=3, lr_schedule="linear"),
    "warmup-cosine": dict(epochs=5, lr_schedule=dict(name="warmup-cosine", warmup_epochs=2, min_lr=0.001)),
    "warmup-cosine-1": dict(epochs=3, lr_schedule=dict(name="warmup-cosine", warmup_epochs=1)),
    "warmup-0-cosine": dict(epochs=3, lr_schedule=dict(name="warmup-cosine", warmup_epochs=0, min_lr=0.02)),
    "scaled-cosine": dict(
        epochs=4, lr_schedule="cosine", batch_size=32, lr_scaling="linear", lr_base_batch_size=16
    ),
    "adam-step": dict(epochs=4, optimizer="adam", lr_schedule=dict(name="step", step_size=1, gamma=0.3)),
}


@pytest.mark.parametrize("steps_per_epoch", [1, 3])
@pytest.mark.parametrize("case", sorted(SCHEDULES))
def test_lr_schedule_follows_formula(case: str, steps_per_epoch: int) -> None:
    settings = dict(SCHEDULES[case])
    settings["lr_schedule"] = LRScheduleConfig.model_validate(settings["lr_schedule"])
    train = TrainConfig(lr=0.1, num_workers=1, **settings)
    model = tiny_model()
    optimizer = make_optimizer(train, model)
    scheduler = make_lr_scheduler(train, optimizer, steps_per_epoch)
    total = train.epochs * steps_per_epoch
    got = []
    for t in range(total + 1):
        got.append(optimizer.param_groups[0]["lr"])
        assert scheduler.get_last_lr()[0] == pytest.approx(got[-1], rel=1e-9, abs=1e-12)
        if t < total:
            optimizer.step()
            scheduler.step()
    expected = [expected_lr(train, steps_per_epoch, t) for t in range(total + 1)]
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12, err_msg=f"{case}: {got} != {expected}")


def test_linear_schedule_with_min_lr_above_lr_is_a_user_error() -> None:
    # rejected either by the config (config.validate turns a ValidationError into an OrderlabError)
    # or by make_lr_scheduler with an OrderlabError; a torch ValueError escapes both clauses
    try:
        schedule = LRScheduleConfig(name="linear", min_lr=0.1)
        train = TrainConfig(lr=0.01, epochs=3, num_workers=1, lr_schedule=schedule)
        make_lr_scheduler(train, make_optimizer(train, tiny_model()), 2)
    except (OrderlabError, ValidationError) as err:
        assert "min_lr" in str(err)
    else:
        pytest.fail("min_lr=0.1 > lr=0.01 was accepted")


# --------------------------------------------------------------------------------------------------
# build_model
# --------------------------------------------------------------------------------------------------


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in model.state_dict().values()]


@pytest.mark.parametrize("task_name", ["mnist1d-mlp", "digits-logreg"])
def test_build_model_is_seeded_and_leaves_global_rng_alone(task_name: str) -> None:
    task = make_task(task_name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        state_before = torch.get_rng_state()
        first = weights(build_model(task, seed=0))
        assert torch.equal(torch.get_rng_state(), state_before), "build_model changed torch's global RNG"
        torch.manual_seed(456)  # a different global state must not change the weights
        second = weights(build_model(task, seed=0))
        other_seed = weights(build_model(task, seed=1))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(first, other_seed, strict=True))


# --------------------------------------------------------------------------------------------------
# Shard
# --------------------------------------------------------------------------------------------------


def synthetic_data(num_train: int, num_val: int) -> TaskData:
    """Row i of the training inputs is (i, 1000 + i), its target i; validation rows likewise from -1."""
    train_rows = torch.arange(num_train, dtype=torch.float32)
    val_rows = -1.0 - torch.arange(num_val, dtype=torch.float32)
    return TaskData(
        train_inputs=torch.stack([train_rows, 1000 + train_rows], dim=1),
        train_targets=torch.arange(num_train),
        val_inputs=torch.stack([val_rows, 1000 + val_rows], dim=1),
        val_targets=torch.arange(num_val) + 10_000,
    )


@pytest.mark.parametrize("unit", ["example", "microbatch"])
@pytest.mark.parametrize(("num_workers", "batch_size"), [(3, 6), (2, 4), (1, 3)])
def test_shard_owns_consecutive_units(unit: str, num_workers: int, batch_size: int) -> None:
    num_train, num_val = 41, 11
    data = synthetic_data(num_train, num_val)
    train = TrainConfig(num_workers=num_workers, batch_size=batch_size, unit=unit)
    plan = plan_trial(train, num_train, dim=2, needs_gradients=False, message_kind="none")
    n, u = plan.shard_size, plan.unit_size
    seen = []
    for rank in range(num_workers):
        shard = Shard(data, plan, range(rank, rank + 1), CPU)
        first = rank * n * u
        assert torch.equal(shard.unit_examples, torch.arange(first, first + n * u).view(n, u))
        assert torch.equal(shard.targets, torch.arange(first, first + n * u))
        assert torch.equal(shard.val_inputs[0], data.val_inputs[rank::num_workers])
        assert torch.equal(shard.val_targets[0], data.val_targets[rank::num_workers])

        order = np.random.default_rng(rank).permutation(n)
        k = plan.units_per_step
        for step in range(plan.steps_per_epoch):
            units = order[step * k : (step + 1) * k]
            inputs, targets = shard.batch(units[np.newaxis])
            rows = np.concatenate([np.arange(first + unit * u, first + (unit + 1) * u) for unit in units])
            assert torch.equal(targets, torch.from_numpy(rows))
            assert torch.equal(inputs, data.train_inputs[torch.from_numpy(rows)])
            seen.extend(rows.tolist())
    # every kept example exactly once per epoch; the dropped tail is at the end
    assert sorted(seen) == list(range(num_train - plan.num_dropped))


def test_shard_batch_keeps_the_given_order_and_repeats() -> None:
    data = synthetic_data(20, 4)
    plan = plan_trial(TrainConfig(num_workers=2, batch_size=4, unit="microbatch"), 20, 2, False, "none")
    shard = Shard(data, plan, range(1, 2), CPU)  # units of 2 examples, worker 1 owns examples 10..19
    inputs, targets = shard.batch(np.array([[4, 0, 4]], dtype=np.int64))
    assert targets.tolist() == [18, 19, 10, 11, 18, 19]
    assert inputs[:, 0].tolist() == [18.0, 19.0, 10.0, 11.0, 18.0, 19.0]


@pytest.mark.parametrize("unit", ["example", "microbatch"])
def test_a_shard_of_all_ranks_is_the_ranks_shards_side_by_side(unit: str) -> None:
    """The simulated backend's one shard of W ranks gives, for W orders, each rank's own rows in rank order."""
    num_workers, data = 3, synthetic_data(50, 10)
    plan = plan_trial(TrainConfig(num_workers=num_workers, batch_size=6, unit=unit), 50, 2, False, "none")
    every = Shard(data, plan, range(num_workers), CPU)
    singles = [Shard(data, plan, range(rank, rank + 1), CPU) for rank in range(num_workers)]
    orders = np.stack(
        [np.random.default_rng(rank).permutation(plan.shard_size) for rank in range(num_workers)]
    )
    k = plan.units_per_step
    for step in range(plan.steps_per_epoch):
        units = orders[:, step * k : (step + 1) * k]
        inputs, targets = every.batch(units)
        expected = [single.batch(units[rank : rank + 1]) for rank, single in enumerate(singles)]
        assert torch.equal(targets, torch.cat([t for _, t in expected]))
        assert torch.equal(inputs, torch.cat([i for i, _ in expected]))
        for rank in range(num_workers):
            assert torch.equal(every.rank_batch(rank, units[rank])[1], expected[rank][1])
    for rank, single in enumerate(singles):
        assert torch.equal(every.train_rows(rank)[1], single.targets)
        assert torch.equal(every.val_targets[rank], single.val_targets[0])
