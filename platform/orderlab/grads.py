"""Per-unit gradients as flat float32 vectors.

``unit: example``: one gradient per example with ``torch.func.vmap(grad_and_value(...))`` over the
microbatch (Horace He & Richard Zou, functorch; torch.func "per-sample-gradients" tutorial).
``unit: microbatch``: the microbatch gradient a plain ``backward`` gives, one per worker step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from orderlab.errors import OrderlabError
from orderlab.seeding import SKETCH, rng_for

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def num_parameters(model: nn.Module) -> int:
    """d: the number of trainable scalars, the length of every flat gradient."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def vmap_problem(model: nn.Module) -> str | None:
    """Why ``vmap`` cannot compute the model's per-example gradients, or None when it can.

    BatchNorm with running statistics mixes examples through its batch statistics.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            return (
                f"train.unit='example' needs per-example gradients, but module {name!r} "
                f"({type(module).__name__}) tracks running statistics, which vmap cannot split per example; "
                "use train.unit='microbatch', or replace it with GroupNorm/LayerNorm "
                "(or construct it with track_running_stats=False)"
            )
    return None


def check_vmappable(model: nn.Module) -> None:
    """Reject models whose per-example gradients ``vmap`` cannot compute.

    Raises:
        OrderlabError: the model has BatchNorm with running statistics, naming the module and the fixes.
    """
    problem = vmap_problem(model)
    if problem is not None:
        raise OrderlabError(problem)


def per_example_gradients(
    model: nn.Module, loss_fn: LossFn, inputs: torch.Tensor, targets: torch.Tensor, groups: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example flat gradients of ``loss_fn(model(x[None]), y[None])`` and each group's mean loss.

    Models whose trainable parameters all belong to ``nn.Linear`` layers take a fast path: one
    forward and one ``autograd.grad`` to the layers' outputs, then each example's weight gradient is
    the outer product of its output gradient and its input, summed over any sequence positions
    (the approach of Opacus; Yousefpour et al., 2021). Other models use
    ``torch.func.vmap(grad_and_value(...))``. Both require ``loss_fn`` to be the mean of the examples'
    losses, as mean-reduced torch losses are.

    Args:
        model: the network (call ``check_vmappable`` once before).
        loss_fn: mean-reduced loss of (outputs, targets).
        inputs: [k, ...] microbatch inputs. targets: [k, ...] their targets.
        groups: the rows are this many equal consecutive groups (the microbatches of several
            simulated workers), each with its own mean loss; the fast path scales each example's
            output gradient as a call on its group alone would.

    Returns:
        (grads [k, d] float32 in ``model.parameters()`` order, each group's mean loss [groups] float32).
    """
    if _linear_only(model):
        return _linear_per_example_gradients(model, loss_fn, inputs, targets, groups)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    buffers = {name: b.detach() for name, b in model.named_buffers()}

    def example_loss(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        outputs = functional_call(model, (params, buffers), (x.unsqueeze(0),))
        return loss_fn(outputs, y.unsqueeze(0))

    grads, losses = vmap(grad_and_value(example_loss), in_dims=(None, 0, 0))(params, inputs, targets)
    flat = torch.cat([grads[name].reshape(inputs.shape[0], -1) for name in names], dim=1)
    return flat.to(torch.float32), losses.detach().view(groups, -1).mean(dim=1).to(torch.float32)


def group_loss(
    loss_fn: LossFn, outputs: torch.Tensor, targets: torch.Tensor, groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sum over ``groups`` equal consecutive groups of rows of each group's mean loss, and those
    means [groups]: the loss whose gradient is the sum of the groups' mean gradients."""
    if groups == 1:
        loss = loss_fn(outputs, targets)
        return loss, loss.detach().view(1)
    losses = torch.stack(
        [loss_fn(out, tgt) for out, tgt in zip(outputs.chunk(groups), targets.chunk(groups), strict=True)]
    )
    return losses.sum(), losses.detach()


def _linear_only(model: nn.Module) -> bool:
    """True when every trainable parameter belongs to an ``nn.Linear``."""
    linear = {id(p) for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters(recurse=False)}
    return all(id(p) in linear for p in model.parameters() if p.requires_grad)


def _linear_per_example_gradients(
    model: nn.Module, loss_fn: LossFn, inputs: torch.Tensor, targets: torch.Tensor, groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    calls: list[
        tuple[nn.Linear, torch.Tensor, torch.Tensor]
    ] = []  # every call: a layer may run several times

    def keep(module: nn.Linear, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        calls.append((module, args[0].detach(), output))

    hooks = [layer.register_forward_hook(keep) for layer in layers]
    try:
        loss, losses = group_loss(loss_fn, model(inputs), targets, groups)
    finally:
        for hook in hooks:
            hook.remove()
    k = inputs.shape[0]
    group_size = k // groups
    grad_outputs = torch.autograd.grad(loss, [output for _, _, output in calls])
    # each example's gradient goes straight into its row of ``flat``: no zero fill, no concatenation
    params = [p for p in model.parameters() if p.requires_grad]
    flat = torch.empty(k, sum(p.numel() for p in params), dtype=torch.float32, device=inputs.device)
    columns, offset = {}, 0
    for p in params:
        columns[id(p)], offset = flat[:, offset : offset + p.numel()], offset + p.numel()
    written: set[int] = set()  # the parameters whose columns hold a first call's gradient
    for (layer, activation, _), grad_output in zip(calls, grad_outputs, strict=True):
        activation = activation.reshape(k, -1, layer.in_features)
        # each group's loss is a mean over its examples
        grad_output = grad_output.reshape(k, -1, layer.out_features) * group_size
        if layer.weight.requires_grad:
            target = columns[id(layer.weight)].view(k, layer.out_features, layer.in_features)
            first = id(layer.weight) not in written
            if activation.shape[1] > 1:  # sequence positions: the outer products summed over them
                product = torch.bmm(grad_output.transpose(1, 2), activation)
                target.copy_(product) if first else target.add_(product)
            elif first:
                torch.mul(grad_output.transpose(1, 2), activation, out=target)
            else:
                target.addcmul_(grad_output.transpose(1, 2), activation)
            written.add(id(layer.weight))
        if layer.bias is not None and layer.bias.requires_grad:
            target, first = columns[id(layer.bias)], id(layer.bias) not in written
            torch.sum(grad_output, 1, out=target) if first else target.add_(grad_output.sum(dim=1))
            written.add(id(layer.bias))
    for p in params:
        if id(p) not in written:  # a layer the forward pass did not call
            columns[id(p)].zero_()
    return flat, losses.to(torch.float32)


def microbatch_gradient(
    model: nn.Module, loss_fn: LossFn, inputs: torch.Tensor, targets: torch.Tensor, groups: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat gradient of the mean loss over a microbatch, by one ``backward``.

    Args:
        groups: the rows are this many equal consecutive microbatches (of several simulated
            workers): the gradient is then the sum of their mean-loss gradients.

    Returns:
        (grad [d] float32, each group's mean loss [groups] float32).
    """
    model.zero_grad(set_to_none=True)
    loss, losses = group_loss(loss_fn, model(inputs), targets, groups)
    loss.backward()
    # a parameter the forward pass did not use has no .grad: zeros, as per_example_gradients gives
    flat = torch.cat(
        [
            p.new_zeros(p.numel()) if p.grad is None else p.grad.reshape(-1)
            for p in model.parameters()
            if p.requires_grad
        ]
    )
    return flat.to(torch.float32), losses.to(torch.float32)


def assign_flat_gradient(model: nn.Module, flat: torch.Tensor, max_norm: float | None = None) -> None:
    """Write ``flat`` [d] into the ``.grad`` of the model's trainable parameters, in order.

    Args:
        max_norm: when set, scale the gradient down to this L2 norm if it is longer
            (``torch.nn.utils.clip_grad_norm_``; config ``train.grad_clip``).
    """
    offset = 0
    for p in model.parameters():
        if p.requires_grad:
            size = p.numel()
            p.grad = flat[offset : offset + size].view_as(p).to(p.dtype).clone()
            offset += size
    assert offset == flat.numel(), "flat gradient length must equal num_parameters(model)"
    if max_norm is not None:
        nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm)


class CountSketch:
    """A fixed-seed CountSketch projection R^d -> R^m (Charikar, Chen & Farach-Colton, ICALP 2002).

    Coordinate i is added, with sign s(i) = ±1, to bucket h(i); h and s are drawn once from
    ``rng_for(seed, 0, 0, SKETCH)``, so every worker projects identically. O(d) memory and O(d) work
    per vector; linear, so sketching pair differences equals differencing sketches, and
    E<Sx, Sy> = <x, y>.

    Args:
        dim: d, the gradient length. sketch_dim: m, the sketch length. seed: experiment seed.
        device: where vectors live.
    """

    def __init__(self, dim: int, sketch_dim: int, seed: int, device: torch.device | str = "cpu") -> None:
        generator = rng_for(seed, 0, 0, SKETCH)
        self.sketch_dim = sketch_dim
        self.buckets = torch.randint(sketch_dim, (dim,), generator=generator).to(device)
        self.signs = (torch.randint(2, (dim,), generator=generator) * 2 - 1).to(device, torch.float32)

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        """Sketch rows: vectors [k, d] float32 -> [k, sketch_dim] float32."""
        out = torch.zeros(vectors.shape[0], self.sketch_dim, dtype=torch.float32, device=vectors.device)
        return out.index_add_(1, self.buckets, vectors * self.signs)
