"""The worker's ServerMessenger over Ray calls: pair differences written once into a reused send buffer."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from orderlab import messaging
from orderlab.channel import MessageRing
from orderlab.config import OrderingConfig
from orderlab.errors import OrderlabError
from orderlab.grads import CountSketch
from orderlab.messaging import RayCallTransport, RingTransport, ServerMessenger
from orderlab.order_queue import OrderMessage
from orderlab.orderings import PairStream
from orderlab.send_buffer import SendBuffer
from orderlab.wire import decode_payload, encode_payload


class RecordingServer:
    """Stands in for the order server actor's handle: like Ray, it copies the arguments at call time."""

    def __init__(self) -> None:
        self.messages: list = []
        self.push = self

    def remote(self, messages: list) -> None:
        self.messages.extend(copy.deepcopy(messages))


def run_messenger(steps: list[torch.Tensor], **kwargs) -> tuple[RecordingServer, ServerMessenger]:
    server = RecordingServer()
    messenger = ServerMessenger(RayCallTransport(server, rank=1, max_in_flight=1000), **kwargs)
    messenger.start(generation=3)
    for step in steps:
        messenger.add(step)
    messenger.send()  # what flush sends before it waits on the replies
    return server, messenger


@pytest.mark.parametrize("units_per_step", [1, 3, 4])
@pytest.mark.parametrize("payload_dtype", ["float32", "float16", "bfloat16"])
def test_pair_differences_arrive_keyed_and_in_order(units_per_step: int, payload_dtype: str) -> None:
    generator = torch.Generator().manual_seed(units_per_step)
    steps = [torch.randn(units_per_step, 10, generator=generator) for _ in range(7)]
    server, messenger = run_messenger(
        steps, message_kind="pair_differences", message_steps=2, payload_dtype=payload_dtype
    )
    expected = PairStream().push(torch.cat(steps).unsqueeze(0))[0]  # 7k units: floor(7k / 2) pairs
    starts = [m.start for m in server.messages]
    assert starts == [0, *np.cumsum([len(m.items) for m in server.messages])[:-1].tolist()]
    assert {(m.epoch, m.rank, m.generation) for m in server.messages} == {(0, 1, 3)}
    received = torch.cat([decode_payload(m.items) for m in server.messages])
    wire = decode_payload(encode_payload(expected.numpy(), payload_dtype))
    assert torch.equal(received, wire)  # the same rounding as encoding the exact differences
    assert messenger.items_sent == len(expected)
    assert messenger.bytes_sent == sum(m.items.nbytes for m in server.messages)


def test_unit_gradients_are_sent_whole_and_sketched() -> None:
    generator = torch.Generator().manual_seed(0)
    steps = [torch.randn(2, 50, generator=generator) for _ in range(5)]
    sketch = CountSketch(50, 8, seed=0)
    server, _ = run_messenger(steps, message_kind="unit_gradients", message_steps=3, sketch=sketch)
    assert [len(m.items) for m in server.messages] == [6, 4]
    received = torch.cat([torch.from_numpy(m.items) for m in server.messages])
    torch.testing.assert_close(received, sketch(torch.cat(steps)))


def test_sketched_pair_differences_are_the_sketch_of_the_difference() -> None:
    generator = torch.Generator().manual_seed(1)
    steps = [torch.randn(1, 40, generator=generator) for _ in range(6)]
    sketch = CountSketch(40, 16, seed=3)
    server, _ = run_messenger(steps, message_kind="pair_differences", message_steps=4, sketch=sketch)
    received = torch.cat([torch.from_numpy(m.items) for m in server.messages])
    units = torch.cat(steps)
    torch.testing.assert_close(received, sketch(units[0::2] - units[1::2]))
    assert received.shape == (3, 16)


def test_an_epoch_boundary_drops_the_unpaired_unit() -> None:
    server = RecordingServer()
    transport = RayCallTransport(server, rank=0, max_in_flight=1000)
    messenger = ServerMessenger(transport, message_kind="pair_differences", message_steps=1)
    messenger.add(torch.ones(3, 4))  # units 0-1 pair; unit 2 waits
    messenger.begin_epoch(1)
    messenger.add(torch.full((2, 4), 5.0))
    assert [(m.epoch, m.start, len(m.items)) for m in server.messages] == [(0, 0, 1), (1, 0, 1)]
    assert not server.messages[1].items.any()  # 5 - 5, not the dropped unit's 1 - 5


def test_a_ring_directory_that_cannot_hold_the_ring_is_a_clear_error(tmp_path) -> None:
    missing = tmp_path / "not-mounted"
    transport = RingTransport(
        RecordingServer(),
        rank=0,
        width=4,
        step_rows=2,
        shard_size=4,
        message_steps=1,
        max_in_flight=2,
        payload_dtype="float32",
        ring_directory=str(missing),
    )
    with pytest.raises(OrderlabError, match=f"in {missing} .*set ordering.ring_directory"):
        transport.start(generation=1)  # when the worker group starts, before any step


def bits(rows: torch.Tensor) -> torch.Tensor:
    """The rows' bit patterns (torch.equal on floats would take -0.0 for 0.0)."""
    return rows.view(torch.int16 if rows.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("payload_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("message_kind", ["pair_differences", "unit_gradients"])
def test_the_simulated_backends_rows_are_each_workers_rows(message_kind: str, payload_dtype: str) -> None:
    """One SendBuffer over W ranks (the simulated backend) writes, rank by rank, the bits that W
    single-rank buffers (Ray Train workers) write from the same steps, straddling pairs included."""
    generator = torch.Generator().manual_seed(5)
    steps = [torch.randn(3, 3, 12, generator=generator) for _ in range(4)]  # W = 3, k = 3 (odd)
    sketch = CountSketch(12, 5, seed=1)
    together = SendBuffer(message_kind, sketch=sketch, payload_dtype=payload_dtype)
    alone = [SendBuffer(message_kind, sketch=sketch, payload_dtype=payload_dtype) for _ in range(3)]
    for step in steps:
        written = together.write(step)
        assert [len(view) for view in written] == ([3, 3] if len(written) == 2 else [3])
        rows = torch.cat(written, dim=1)  # [W, p, 5]
        together.clear()
        for rank, buffer in enumerate(alone):
            buffer.write(step[rank : rank + 1])
            assert torch.equal(bits(rows[rank]), bits(buffer.pending()))
            buffer.clear()


@pytest.mark.parametrize("payload_dtype", ["float32", "bfloat16"])
def test_a_ring_carries_the_messages_ray_calls_carry_and_sends_a_full_slot_early(
    payload_dtype, tmp_path, monkeypatch
) -> None:
    """The ring transport's messages hold the Ray calls' rows (the same bits and keys, read by the
    server's side of the ring); a slot too small for ``message_steps`` steps is sent when full."""
    width = 1024  # a page holds 1 float32 row, 2 bfloat16 rows
    monkeypatch.setattr(messaging, "MAX_SLOT_BYTES", 3 * width * (4 if payload_dtype == "float32" else 2))
    generator = torch.Generator().manual_seed(7)
    steps = [torch.randn(3, width, generator=generator) for _ in range(9)]  # 13 pairs, some straddling
    settings = dict(message_kind="pair_differences", message_steps=4, payload_dtype=payload_dtype)
    by_calls, _ = run_messenger(steps, **settings)
    transport = messaging.make_transport(
        "shared_memory",
        None,
        rank=1,
        message_kind="pair_differences",
        units_per_step=3,
        width=width,
        shard_size=27,
        ordering=OrderingConfig(message_steps=4, max_in_flight=100, payload_dtype=payload_dtype),
    )
    assert isinstance(transport, RingTransport) and transport.rows == 4  # fewer than 4 steps' 6 pairs
    # what start() does before the server maps the ring (the server here is this test's reader)
    transport.generation = 3
    transport.ring = MessageRing.create(transport.slots, transport.slot_bytes, str(tmp_path), 27)
    server_side = MessageRing.attach(transport.ring.path)
    messenger = ServerMessenger(transport, **settings)
    for step in steps:
        messenger.add(step)
    messenger.send()
    received = [OrderMessage(*fields) for fields in server_side.receive()]
    assert max(len(m.items) for m in received) <= 4 and len(received) > len(by_calls.messages)
    assert {(m.epoch, m.rank, m.generation) for m in received} == {(0, 1, 3)}
    starts = [m.start for m in received]
    assert starts == [0, *np.cumsum([len(m.items) for m in received])[:-1].tolist()]
    ring_rows = np.concatenate([m.items for m in received])
    call_rows = np.concatenate([m.items for m in by_calls.messages])
    assert ring_rows.dtype == call_rows.dtype
    assert np.array_equal(ring_rows.view(np.uint8), call_rows.view(np.uint8))
    assert messenger.bytes_sent == ring_rows.nbytes
