"""orderlab.grads: per-example gradients by vmap against plain backward, flattening, vmap checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orderlab.errors import OrderlabError
from orderlab.grads import (
    assign_flat_gradient,
    check_vmappable,
    microbatch_gradient,
    num_parameters,
    per_example_gradients,
)

TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


class SmallConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(3 * 3 * 3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(F.relu(self.conv(x))).flatten(1))


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(outputs, targets)


def seeded(factory, seed: int) -> nn.Module:
    """``factory()`` initialised from ``seed`` without touching torch's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


# each case: (model, loss, inputs [5, ...], targets [5, ...]), seeded
def mlp_case():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(5, 6, generator=generator)
    targets = torch.randint(3, (5,), generator=generator)
    return seeded(mlp, 0), F.cross_entropy, inputs, targets


def conv_case():
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(5, 1, 6, 6, generator=generator)
    targets = torch.randint(4, (5,), generator=generator)
    return seeded(SmallConvNet, 1), F.cross_entropy, inputs, targets


def regression_case():
    generator = torch.Generator().manual_seed(2)
    inputs = torch.randn(5, 6, generator=generator)
    targets = torch.randn(5, 3, generator=generator)
    return seeded(mlp, 2), mse, inputs, targets


class SharedLinear(nn.Module):
    """Linear layers only (the fast path), one of them called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


def shared_linear_case(positions: tuple[int, ...] = ()):
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(5, *positions, 6, generator=generator)
    targets = torch.randn(5, *positions, 3, generator=generator)
    return seeded(SharedLinear, 3), mse, inputs, targets


CASES = {
    "mlp": mlp_case,
    "conv": conv_case,
    "mlp-mse": regression_case,
    "shared-linear": shared_linear_case,
    "shared-linear-sequence": lambda: shared_linear_case(positions=(4,)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_per_example_gradients_equal_single_example_backward(case: str) -> None:
    model, loss_fn, inputs, targets = CASES[case]()
    grads, mean_loss = per_example_gradients(model, loss_fn, inputs, targets)
    d = num_parameters(model)
    assert grads.shape == (len(inputs), d) and grads.dtype == torch.float32
    assert mean_loss.shape == (1,) and mean_loss.dtype == torch.float32
    for i in range(len(inputs)):
        grad, _ = microbatch_gradient(model, loss_fn, inputs[i : i + 1], targets[i : i + 1])
        torch.testing.assert_close(grads[i], grad, **TOLERANCE)


@pytest.mark.parametrize("case", sorted(CASES))
def test_mean_of_per_example_gradients_is_the_microbatch_gradient(case: str) -> None:
    model, loss_fn, inputs, targets = CASES[case]()
    grads, mean_loss = per_example_gradients(model, loss_fn, inputs, targets)
    grad, loss = microbatch_gradient(model, loss_fn, inputs, targets)
    assert grad.shape == (num_parameters(model),) and grad.dtype == torch.float32
    assert loss.shape == (1,) and not loss.requires_grad and not mean_loss.requires_grad
    torch.testing.assert_close(grads.mean(dim=0), grad, **TOLERANCE)
    torch.testing.assert_close(mean_loss, loss, **TOLERANCE)


def test_flat_gradient_follows_parameter_order() -> None:
    model, loss_fn, inputs, targets = mlp_case()
    grad, _ = microbatch_gradient(model, loss_fn, inputs, targets)
    expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(grad, expected, atol=0, rtol=0)
    grads, _ = per_example_gradients(model, loss_fn, inputs, targets)
    first_weight = model[0].weight  # the first parameter: the leading columns of every flat gradient
    leading = grads[:, : first_weight.numel()].mean(dim=0)
    torch.testing.assert_close(leading, first_weight.grad.reshape(-1), **TOLERANCE)


def test_per_example_gradients_leave_the_model_unchanged() -> None:
    model, loss_fn, inputs, targets = mlp_case()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    per_example_gradients(model, loss_fn, inputs, targets)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[name], atol=0, rtol=0)
        assert p.grad is None


def test_frozen_parameters_are_left_out() -> None:
    model, loss_fn, inputs, targets = mlp_case()
    model[0].weight.requires_grad_(False)
    total = sum(p.numel() for p in model.parameters())
    d = num_parameters(model)
    assert d == total - model[0].weight.numel()
    grads, _ = per_example_gradients(model, loss_fn, inputs, targets)
    grad, _ = microbatch_gradient(model, loss_fn, inputs, targets)
    assert grads.shape == (len(inputs), d) and grad.shape == (d,)
    torch.testing.assert_close(grads.mean(dim=0), grad, **TOLERANCE)


class WithUnusedLinear(nn.Module):
    """``mlp()`` followed by a linear layer that ``forward`` never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp, self.unused = mlp(), nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def test_a_linear_layer_the_forward_pass_skips_gets_zero_gradients() -> None:
    model, loss_fn, inputs, targets = mlp_case()
    wrapped = WithUnusedLinear()
    wrapped.mlp.load_state_dict(model.state_dict())
    grads, _ = per_example_gradients(wrapped, loss_fn, inputs, targets)
    unused = wrapped.unused.weight.numel() + wrapped.unused.bias.numel()
    assert grads.shape == (len(inputs), num_parameters(model) + unused)
    assert torch.count_nonzero(grads[:, -unused:]) == 0
    expected, _ = per_example_gradients(model, loss_fn, inputs, targets)
    torch.testing.assert_close(grads[:, :-unused], expected, atol=0, rtol=0)
    # the microbatch gradient too (its parameters get no .grad from backward)
    grad, _ = microbatch_gradient(wrapped, loss_fn, inputs, targets)
    assert torch.count_nonzero(grad[-unused:]) == 0
    expected_grad, _ = microbatch_gradient(model, loss_fn, inputs, targets)
    torch.testing.assert_close(grad[:-unused], expected_grad, atol=0, rtol=0)


def test_num_parameters() -> None:
    assert num_parameters(nn.Linear(4, 3)) == 4 * 3 + 3
    assert num_parameters(mlp()) == (6 * 8 + 8) + (8 * 8 + 8) + (8 * 3 + 3)
    assert num_parameters(SmallConvNet()) == (3 * 1 * 3 * 3 + 3) + (27 * 4 + 4)
    assert num_parameters(nn.BatchNorm1d(5)) == 10  # running statistics are buffers, not parameters


def test_assign_flat_gradient_round_trips() -> None:
    model, loss_fn, inputs, targets = conv_case()
    flat = torch.randn(num_parameters(model), generator=torch.Generator().manual_seed(3))
    assign_flat_gradient(model, flat)
    for p in model.parameters():
        assert p.grad is not None and p.grad.shape == p.shape and p.grad.dtype == p.dtype
    assigned = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(assigned, flat, atol=0, rtol=0)
    flat.zero_()  # the gradients are copies, not views of flat
    assert all(p.grad.abs().sum() > 0 for p in model.parameters())

    grad, _ = microbatch_gradient(model, loss_fn, inputs, targets)
    model.zero_grad(set_to_none=True)
    assign_flat_gradient(model, grad)
    again, _ = microbatch_gradient(model, loss_fn, inputs, targets)
    torch.testing.assert_close(again, grad, atol=0, rtol=0)


def test_assign_flat_gradient_skips_frozen_parameters() -> None:
    model = mlp()
    frozen = model[2].bias
    frozen.requires_grad_(False)
    flat = torch.arange(num_parameters(model), dtype=torch.float32)
    assign_flat_gradient(model, flat)
    assert frozen.grad is None
    trainable = [p for p in model.parameters() if p.requires_grad]
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in trainable]), flat, atol=0, rtol=0)


@pytest.mark.parametrize("scale", [0.1, 10.0])
def test_assign_flat_gradient_clips_the_global_norm(scale: float) -> None:
    model = mlp()
    flat = torch.randn(num_parameters(model), generator=torch.Generator().manual_seed(4))
    flat *= scale / float(flat.norm())  # norm 0.1 (left alone) or 10 (clipped to 0.25)
    assign_flat_gradient(model, flat, max_norm=0.25)
    assigned = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    expected = flat if scale < 0.25 else flat * (0.25 / float(flat.norm()))
    torch.testing.assert_close(assigned, expected, rtol=1e-5, atol=1e-7)


class NormNet(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6))
        self.body.add_module("norm", norm)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_check_vmappable_rejects_batchnorm_with_running_stats() -> None:
    with pytest.raises(OrderlabError) as info:
        check_vmappable(NormNet(nn.BatchNorm1d(6)))
    message = str(info.value)
    assert "microbatch" in message
    assert "body.norm" in message and "BatchNorm1d" in message


def test_check_vmappable_rejects_batchnorm2d_in_a_conv_net() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(OrderlabError, match="microbatch") as info:
        check_vmappable(model)
    assert "'1'" in str(info.value) and "BatchNorm2d" in str(info.value)


@pytest.mark.parametrize(
    "norm",
    [
        lambda: nn.BatchNorm1d(6, track_running_stats=False),
        lambda: nn.LayerNorm(6),
        lambda: nn.GroupNorm(2, 6),
        lambda: nn.Identity(),
    ],
    ids=["batchnorm-no-running-stats", "layernorm", "groupnorm", "none"],
)
def test_check_vmappable_accepts_models_without_running_stats(norm) -> None:
    check_vmappable(NormNet(norm()))
    check_vmappable(mlp())
    check_vmappable(SmallConvNet())


def test_per_example_gradients_with_layernorm() -> None:
    model = seeded(lambda: NormNet(nn.LayerNorm(6)), 4)
    generator = torch.Generator().manual_seed(4)
    inputs, targets = torch.randn(4, 4, generator=generator), torch.randint(2, (4,), generator=generator)
    grads, _ = per_example_gradients(model, F.cross_entropy, inputs, targets)
    for i in range(len(inputs)):
        grad, _ = microbatch_gradient(model, F.cross_entropy, inputs[i : i + 1], targets[i : i + 1])
        torch.testing.assert_close(grads[i], grad, **TOLERANCE)


def test_linear_fast_path_equals_vmap_on_sequences_and_frozen_layers() -> None:
    """The nn.Linear outer-product path against vmap, with a sequence dimension and a frozen layer."""
    from orderlab.grads import _linear_only

    model = seeded(lambda: nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3, bias=False)), 9)
    model[0].bias.requires_grad_(False)
    generator = torch.Generator().manual_seed(9)
    inputs, targets = torch.randn(6, 4, 5, generator=generator), torch.randn(6, 4, 3, generator=generator)
    assert _linear_only(model)
    grads, mean_loss = per_example_gradients(model, mse, inputs, targets)
    assert grads.shape == (6, num_parameters(model))
    for i in range(len(inputs)):
        grad, _ = microbatch_gradient(model, mse, inputs[i : i + 1], targets[i : i + 1])
        torch.testing.assert_close(grads[i], grad, **TOLERANCE)
    torch.testing.assert_close(mean_loss, mse(model(inputs), targets).detach().view(1), **TOLERANCE)
    assert not _linear_only(SmallConvNet())  # conv layers take the vmap path


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("groups", [2, 3])
def test_grouped_gradients_are_each_groups_own(case: str, groups: int) -> None:
    """Several simulated workers' microbatches in one call: the same per-example gradients and each
    group's own mean loss; the microbatch gradient is the sum of the groups' mean gradients."""
    model, loss_fn, inputs, targets = CASES[case]()
    rows = len(inputs) - len(inputs) % groups
    inputs, targets = inputs[:rows], targets[:rows]
    grads, losses = per_example_gradients(model, loss_fn, inputs, targets, groups)
    parts = [
        per_example_gradients(model, loss_fn, x, y)
        for x, y in zip(inputs.chunk(groups), targets.chunk(groups), strict=True)
    ]
    expected = torch.cat([g for g, _ in parts])
    torch.testing.assert_close(grads, expected, **TOLERANCE)
    torch.testing.assert_close(losses, torch.cat([loss for _, loss in parts]), **TOLERANCE)
    grad, group_losses = microbatch_gradient(model, loss_fn, inputs, targets, groups)
    sums = [
        microbatch_gradient(model, loss_fn, x, y)[0]
        for x, y in zip(inputs.chunk(groups), targets.chunk(groups), strict=True)
    ]
    torch.testing.assert_close(grad, torch.stack(sums).sum(dim=0), **TOLERANCE)
    torch.testing.assert_close(group_losses, losses, **TOLERANCE)
