"""Split-K in one launch: the programs of a column block each write f32 partial sums over their slice
of K, and the last of them to arrive adds the partials and writes the output. Decode GEMMs whose
N alone gives fewer programs than SMs (Llama's o and down projections, the 1B shape's q/k/v) use
it to stream their weights from every SM."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .hardware import num_sms


@triton.jit
def sum_splits_last(y, part_ptr, offs, mask, split_stride, out_ptrs, ticket_ptr, SPLITS: tl.constexpr):
    # Every program of a column block writes its f32 partial sums, then takes a ticket; the last to arrive adds
    # the partials in split order (the same rounding whichever comes last), writes the output, and puts the
    # counter back to 0 for the next call. No second launch; the counters live across calls (and graph replays).
    tl.store(part_ptr + tl.program_id(1) * split_stride + offs, y, mask=mask)
    tl.debug_barrier()  # all threads' partials are written before thread 0 takes the ticket (release, gpu scope)
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
    if ticket == SPLITS - 1:
        total = tl.load(part_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
        for k in tl.static_range(1, SPLITS):  # unrolled: all the partials' loads in flight at once
            total += tl.load(part_ptr + k * split_stride + offs, mask=mask, other=0.0, cache_modifier=".cg")
        tl.store(out_ptrs, total.to(out_ptrs.dtype.element_ty), mask=mask)
        tl.atomic_xchg(ticket_ptr, 0, sem="relaxed", scope="gpu")


def fill_split(programs: int, steps: int, per_sm: float) -> int:
    """The power-of-two K split that brings the grid to about per_sm programs per SM, a K step or more each."""
    split = 1
    while programs * split < per_sm * num_sms() and 2 * split <= steps:
        split *= 2
    return split


# Launches count their column blocks' arrivals here: one zeroed int32 buffer per device, made outside any
# CUDA-graph capture and left at zero by every launch, so graphs captured later may use it. Launches on one
# stream run one after another (with programmatic dependent launch too: a kernel touches its counters only
# after pdl_wait); two streams running these kernels at once would share the counters.
TICKETS_PER_DEVICE = 1 << 16
_TICKETS: dict[torch.device, torch.Tensor] = {}


def split_buffers(x: torch.Tensor, split: int, size: int, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(f32 partials [split, size], zeroed counters for blocks column blocks) for a split-K launch."""
    partials = torch.empty((split, size), dtype=torch.float32, device=x.device)
    tickets = _TICKETS.get(x.device)
    if tickets is None or blocks > tickets.numel():
        tickets = torch.zeros(max(blocks, TICKETS_PER_DEVICE), dtype=torch.int32, device=x.device)
        # Inside a capture the zeroing is a node of the graph, replayed with it: this launch's own buffer.
        if blocks <= TICKETS_PER_DEVICE and not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            _TICKETS[x.device] = tickets
    return partials, tickets
