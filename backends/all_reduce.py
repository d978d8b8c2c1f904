"""The all-reduce behind `dist.all_reduce` on the cuda backend.

A row-parallel layer's partial sums are a few KB per rank at decode, where an NCCL ring pays tens of
microseconds of latency per call and a 32-layer model makes 64 calls a step. For tensors up to
`one_shot_max_bytes`, each rank writes its partial sum into a buffer of torch's symmetric memory
(mapped into every rank's address space over NVLink) and one kernel per rank reads every peer's copy
and adds them ("one-shot", no ring). Larger tensors (prefill) and machines where symmetric memory
does not start go to NCCL. Both run inside captured CUDA graphs. Every rank makes the same choice for
a given tensor, so their collectives stay matched.

`KILN_ALL_REDUCE=nccl` forces NCCL (for comparisons); `auto` (the default) is the above.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as torch_dist

BUFFER_BYTES = 4 << 20
"""Symmetric buffer per rank: decode batches up to 256 tokens of an 8192-wide bf16 model."""
_SYMMETRIC_GROUPS: set[str] = set()
"""Process groups whose symmetric memory this process has set up (once per name for its life)."""


@dataclass
class AllReduce:
    """Sum-all-reduce over the default process group by the fastest route set up for this job."""

    world_size: int
    group_name: str | None = None          # symmetric memory's group, when one-shot is set up
    buffer: torch.Tensor | None = field(default=None, repr=False)  # this rank's symmetric buffer (bytes)
    one_shot_max_bytes: int = 0

    @classmethod
    def for_job(cls, device: torch.device, mode: str | None = None) -> AllReduce:
        """Set up on every rank at once (the symmetric buffer's rendezvous is a collective)."""
        world = torch_dist.get_world_size() if torch_dist.is_available() and torch_dist.is_initialized() else 1
        mode = (mode or os.environ.get("KILN_ALL_REDUCE", "auto")).lower()
        if mode not in ("auto", "nccl"):
            raise ValueError(f"KILN_ALL_REDUCE must be 'auto' or 'nccl', got {mode!r}")
        out = cls(world)
        if world == 1 or device.type != "cuda" or mode == "nccl":
            return out
        # torch keeps a group's symmetric-memory rendezvous for the process's life, keyed by the group's
        # name, which a later job's default group reuses: its rendezvous would wait forever on the first
        # job's store. Every rank learns whether one of them has been here before rendezvousing.
        fresh = torch.tensor([torch_dist.group.WORLD.group_name not in _SYMMETRIC_GROUPS], dtype=torch.int32,
                             device=device)
        torch_dist.all_reduce(fresh, op=torch_dist.ReduceOp.MIN)
        if not fresh.item():
            warnings.warn("kiln: this process ran a tensor-parallel job before; this one all-reduces through "
                          "NCCL (torch's symmetric memory keeps the first job's rendezvous). Start the job in a "
                          "new process for the one-shot all-reduce")
            return out
        buffer, name = _symmetric_buffer(device)
        ok = torch.tensor([buffer is not None], dtype=torch.int32, device=device)
        torch_dist.all_reduce(ok, op=torch_dist.ReduceOp.MIN)  # one-shot only if every rank has it
        if ok.item():
            out.buffer, out.group_name = buffer, name
            out.one_shot_max_bytes = BUFFER_BYTES if world <= 2 else BUFFER_BYTES // 8
        return out

    @property
    def route(self) -> str:
        """How tensors are reduced: one-shot up to `one_shot_max_bytes` and the process group above, or
        the process group's backend (nccl, gloo) alone."""
        backend = torch_dist.get_backend() if self.world_size > 1 else "none"
        return f"one-shot <= {self.one_shot_max_bytes >> 10} KiB, {backend} above" if self.buffer is not None \
            else backend

    def __call__(self, x: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
        nbytes = x.numel() * x.element_size()
        if (self.buffer is not None and reduce == "sum" and nbytes <= self.one_shot_max_bytes and nbytes % 16 == 0
                and x.dtype in (torch.bfloat16, torch.float16, torch.float32)):
            staged = self.buffer[:nbytes].view(x.dtype).view(x.shape)
            return torch.ops.symm_mem.one_shot_all_reduce_copy(staged, x.contiguous(), "sum", self.group_name)
        y = x.clone(memory_format=torch.contiguous_format)
        if self.world_size > 1:
            torch_dist.all_reduce(y, op=getattr(torch_dist.ReduceOp, reduce.upper()))
        return y


def _symmetric_buffer(device: torch.device) -> tuple[torch.Tensor | None, str | None]:
    """This rank's symmetric buffer, or (None, None) where symmetric memory does not start here."""
    try:
        import torch.distributed._symmetric_memory as symm_mem

        if not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy"):
            return None, None
        group = torch_dist.group.WORLD
        name = group.group_name
        enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
        if enable is not None:
            with warnings.catch_warnings(), contextlib.suppress(Exception):
                warnings.simplefilter("ignore")
                enable(name)
        buffer = symm_mem.empty(BUFFER_BYTES, dtype=torch.uint8, device=device)
        _SYMMETRIC_GROUPS.add(name)
        symm_mem.rendezvous(buffer, group)
        return buffer, name
    except Exception as e:  # noqa: BLE001  (no P2P, no driver support: NCCL does all of it)
        warnings.warn(f"kiln: symmetric memory did not start ({type(e).__name__}: {e}); all-reduces go to NCCL")
        return None, None

