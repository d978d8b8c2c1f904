"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Every step packs decode tokens and prefill chunks under a token budget (`max_num_tokens`) and a
sequence limit (`max_batch_size`). Running sequences go first, oldest first; waiting ones are
admitted in arrival order while blocks and budget last, taking cached blocks of a shared prefix.
When a running sequence needs a block and none is free, the newest running sequence is
preempted: its blocks are released and it goes back to the front of the queue, to be recomputed
later (never dropped).
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable

from .blocks import BlockPool, OutOfBlocks, block_hashes


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One stream of tokens: a prompt and what has been generated after it."""

    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    request: Any = None                  # what the engine hangs on it (params, detokenizer, ...)
    seq_id: int = field(default_factory=lambda: next(_ids))
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0                # tokens whose K/V are in the cache
    num_named: int = 0                   # full blocks recorded in the pool's prefix index
    hashes: list[int] = field(default_factory=list)  # chained hashes of its first full blocks (tokens never change)
    status: Status = Status.WAITING
    preemptions: int = 0

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def tokens(self, start: int, end: int) -> list[int]:
        """token_ids[start:end] without building token_ids (a step reads one token of each sequence)."""
        prompt = len(self.prompt_ids)
        if start >= prompt:
            return self.output_ids[start - prompt: end - prompt]
        if end <= prompt:
            return self.prompt_ids[start:end]
        return self.prompt_ids[start:] + self.output_ids[: end - prompt]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


@dataclass
class Scheduled:
    """One sequence's share of a step: `num_tokens` tokens starting at `start`."""

    seq: Sequence
    start: int
    num_tokens: int

    @property
    def produces_logits(self) -> bool:
        """Whether the chunk reaches the last known token (so the next token can be sampled)."""
        return self.start + self.num_tokens == len(self.seq)


class Scheduler:
    def __init__(self, pool: BlockPool, max_batch_size: int, max_num_tokens: int):
        self.pool = pool
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.prefill_tokens = 0          # tokens computed for prompts (not decode), for reuse accounting
        self.preemptions = 0

    # -- requests ---------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Release a sequence's blocks, whether it ended or was cancelled."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self.pool.release(seq.blocks)
        seq.blocks = []
        seq.status = Status.FINISHED

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ---------------------------------------------------------------------------------

    def schedule(self) -> list[Scheduled]:
        batch: list[Scheduled] = []
        budget = self.max_num_tokens
        block_size = self.pool.block_size
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:      # preempted while making room for an older one
                continue
            if len(batch) == self.max_batch_size or budget == 0:
                break
            start = seq.num_computed
            n = min(len(seq.prompt_ids) + len(seq.output_ids) - start, budget)
            if len(seq.blocks) * block_size < start + n and not self._grow(seq, start + n):
                continue                              # it preempted itself
            batch.append(Scheduled(seq, start, n))
            budget -= n
        while self.waiting and len(batch) < self.max_batch_size and budget > 0:
            seq = self.waiting[0]
            full = (len(seq) - 1) // self.pool.block_size  # the last token is always computed
            hits = self.pool.lookup(self._hashes(seq, full)[:full])
            start = len(hits) * self.pool.block_size
            n = min(len(seq) - start, budget)
            need = -(-(start + n) // self.pool.block_size) - len(hits)
            cached_free = sum(1 for b in hits if self.pool.refs[b] == 0)
            if need > self.pool.num_free - cached_free:
                break                                 # wait for blocks rather than preempt for newcomers
            self.waiting.popleft()
            for b in hits:
                self.pool.share(b)
            seq.blocks, seq.num_computed, seq.num_named = list(hits), start, len(hits)
            self._grow(seq, start + n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append(Scheduled(seq, start, n))
            budget -= n
        return batch

    def _grow(self, seq: Sequence, tokens: int) -> bool:
        """Give `seq` blocks for `tokens` tokens, preempting the newest other sequences if needed;
        False if `seq` itself had to be preempted."""
        while len(seq.blocks) * self.pool.block_size < tokens:
            try:
                seq.blocks.append(self.pool.allocate())
            except OutOfBlocks:
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pool.release(seq.blocks)
        seq.blocks, seq.num_computed, seq.num_named = [], 0, 0
        seq.status = Status.WAITING
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def advance(self, batch: Iterable[Scheduled]) -> None:
        """After the step ran: the scheduled tokens are cached; name the blocks they filled."""
        for s in batch:
            seq = s.seq
            if seq.status is not Status.RUNNING:  # finished (or preempted) after the step was launched
                continue
            if s.start < len(seq.prompt_ids):
                self.prefill_tokens += min(s.start + s.num_tokens, len(seq.prompt_ids)) - s.start
            seq.num_computed = s.start + s.num_tokens
            full = seq.num_computed // self.pool.block_size
            if full > seq.num_named:
                hashes = self._hashes(seq, full)
                for i in range(seq.num_named, full):
                    self.pool.name(seq.blocks[i], hashes[i])
                seq.num_named = full

    def _hashes(self, seq: Sequence, full: int) -> list[int]:
        """`seq.hashes`, extended to cover at least its first `full` blocks. Their tokens are final: a
        token still on the device (the engine's placeholder) is a sequence's last, which a lookup
        leaves out, and the engine reads it before `advance` counts it computed."""
        known, size = seq.hashes, self.pool.block_size
        if len(known) < full:
            known += block_hashes(seq.tokens(len(known) * size, full * size), size, known[-1] if known else 0)
        return known
