"""The wire format of the vectors workers send the order server (``ordering.payload_dtype``).

float32 travels as float32; float16 as float16 (numpy's float16, read by the balancing kernel as
its uint16 bits); bfloat16, which numpy lacks, as its int16 bits. The balancing kernel widens half
precision in registers and keeps its running sum in float32 (``orderlab.orderings``).
"""

from __future__ import annotations

import numpy as np
import torch

from orderlab.orderings import widen

PAYLOAD_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def to_wire(items: torch.Tensor) -> np.ndarray:
    """Items [m, d] already in a payload dtype as the numpy array that travels: a view on CPU (numpy
    arrays travel zero-copy through Ray's object store), bfloat16 as its int16 bits (numpy has no
    bfloat16)."""
    items = items.cpu()
    return (items.view(torch.int16) if items.dtype == torch.bfloat16 else items).numpy()


def encode_payload(items: np.ndarray, payload_dtype: str) -> np.ndarray:
    """float32 items [m, d] in the wire format of ``payload_dtype`` (float32, float16 or bfloat16)."""
    return to_wire(torch.from_numpy(items).to(PAYLOAD_DTYPES[payload_dtype]))


def decode_payload(items: np.ndarray) -> torch.Tensor:
    """The inverse of ``encode_payload`` (the array's dtype says the format), widened to a float32
    tensor [..., d] (no copy for float32)."""
    return torch.from_numpy(widen(items))
