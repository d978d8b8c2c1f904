"""The block manager: which block of the paged KV pool holds which tokens of which sequence.

Blocks are reference-counted. A full block is named by a hash of its tokens and of every token
before it, so a later prompt with the same prefix can take the same blocks instead of computing
them again. A freed named block stays cached (least recently used first out) until its memory is
needed for something else.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence


def block_hashes(token_ids: Sequence[int], block_size: int, parent: int = 0) -> list[int]:
    """The chained hash of every full block of `token_ids`; `parent`: the hash of the block before
    them (continues a chain, so that a growing sequence hashes each block once)."""
    hashes, prev = [], parent
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        prev = hash((prev, tuple(token_ids[start:start + block_size])))
        hashes.append(prev)
    return hashes


class OutOfBlocks(RuntimeError):
    """No free block is left; the scheduler preempts a sequence and tries again."""


@dataclass
class BlockPool:
    num_blocks: int
    block_size: int
    enable_reuse: bool = True
    refs: list[int] = field(init=False)
    _free: list[int] = field(init=False)                                  # never named, or evicted
    _cached: OrderedDict[int, int] = field(init=False, default_factory=OrderedDict)  # hash -> block, refs == 0
    _by_hash: dict[int, int] = field(init=False, default_factory=dict)    # hash -> block, any refs
    _hash_of: dict[int, int] = field(init=False, default_factory=dict)    # block -> hash

    def __post_init__(self) -> None:
        if self.num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got {self.num_blocks}")
        self.refs = [0] * self.num_blocks
        self._free = list(range(self.num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (free or cached but unused)."""
        return len(self._free) + len(self._cached)

    def allocate(self) -> int:
        if self._free:
            block = self._free.pop()
        elif self._cached:
            h, block = self._cached.popitem(last=False)
            del self._by_hash[h], self._hash_of[block]
        else:
            raise OutOfBlocks(f"all {self.num_blocks} KV blocks are in use")
        self.refs[block] = 1
        return block

    def release(self, blocks: Sequence[int]) -> None:
        for block in blocks:
            if self.refs[block] <= 0:
                raise AssertionError(f"block {block} released more often than it was taken")
            self.refs[block] -= 1
            if self.refs[block] == 0:
                h = self._hash_of.get(block)
                if h is not None:
                    self._cached[h] = block
                else:
                    self._free.append(block)

    def share(self, block: int) -> None:
        """One more sequence reads this block (a prefix hit, or a forked beam)."""
        if self.refs[block] == 0:
            h = self._hash_of[block]
            del self._cached[h]
        self.refs[block] += 1

    def name(self, block: int, h: int) -> None:
        """Record that `block` is full and holds the prefix hashed to `h`."""
        if not self.enable_reuse or block in self._hash_of or h in self._by_hash:
            return
        self._by_hash[h] = block
        self._hash_of[block] = h

    def lookup(self, hashes: Sequence[int]) -> list[int]:
        """The cached blocks of the longest named prefix (not yet shared: call share on each)."""
        found = []
        if self.enable_reuse:
            for h in hashes:
                block = self._by_hash.get(h)
                if block is None:
                    break
                found.append(block)
        return found

    def check(self) -> None:
        """Invariants, for tests: every block is exactly one of in use, free, or cached."""
        used = {b for b, r in enumerate(self.refs) if r > 0}
        free, cached = set(self._free), set(self._cached.values())
        assert len(free) == len(self._free), "a block is free twice"
        assert not (used & free) and not (used & cached) and not (free & cached), "a block is in two states"
        assert used | free | cached == set(range(self.num_blocks)), "a block leaked"
