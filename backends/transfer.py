"""Host-to-device copies that never make the host wait on the device.

A copy from pageable memory may be serialised behind the work already queued on the stream, so a
host thread that copies a step's metadata behind a step that cannot finish (a tensor-parallel peer
died inside a collective) blocks in the driver before it can notice. Staged in pinned memory (torch's
caching host allocator keeps a block until its copy is done), the copy is only enqueued."""
from __future__ import annotations

import torch


def pinned(t: torch.Tensor) -> torch.Tensor:
    """`t` where a non-blocking copy to a GPU cannot block: on the device already, or pinned."""
    return t if t.is_cuda or t.is_pinned() else t.pin_memory()


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`t` on `device`, enqueued without waiting (a plain copy when `device` is not a GPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return pinned(t).to(device, non_blocking=True)


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """dst.copy_(src), enqueued without waiting when dst is on a GPU."""
    return dst.copy_(pinned(src) if dst.is_cuda else src, non_blocking=dst.is_cuda)
