"""`forbid_host_reads()`: a context in which reading a tensor's values on the host raises (a device sync on CUDA,
and what CUDA-graph capture refuses). Import it as `from host_sync import forbid_host_reads` (tests/ is on
sys.path under pytest)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# the Tensor methods that hand a value to Python (or copy to the host), and torch.tensor / as_tensor, which copy
# Python data to the device
TENSOR_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "__array__")
TORCH_COPIES = ("tensor", "as_tensor")


class HostRead(AssertionError):
    pass


@contextlib.contextmanager
def forbid_host_reads() -> Iterator[None]:
    def refuse(name: str):
        def f(*args, **kwargs):
            raise HostRead(f"host read inside a sync-free region: {name}")
        return f

    saved = [(torch.Tensor, n, torch.Tensor.__dict__.get(n)) for n in TENSOR_READS]
    saved += [(torch, n, getattr(torch, n)) for n in TORCH_COPIES]
    try:
        for owner, name, _ in saved:
            setattr(owner, name, refuse(f"{owner.__name__}.{name}"))
        yield
    finally:
        for owner, name, old in saved:
            if old is None:
                delattr(owner, name)
            else:
                setattr(owner, name, old)
