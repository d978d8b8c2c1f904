"""The runtime's knobs, named as TensorRT-LLM's LLM API names them."""

from __future__ import annotations

import os
from dataclasses import dataclass


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(what)


@dataclass
class KvCacheConfig:
    """How big the paged KV pool is and whether full blocks are shared between requests."""

    free_gpu_memory_fraction: float = 0.9   # of the memory left after weights (GPU), or of available RAM (CPU)
    max_tokens: int | None = None           # a hard cap on the pool, in tokens
    tokens_per_block: int | None = None     # None: the compiled model's block size
    dtype: str = "auto"                     # the cache dtype; "auto": the model's
    enable_block_reuse: bool = True         # reuse full blocks of a common prompt prefix

    def __post_init__(self) -> None:
        _check(0.0 < self.free_gpu_memory_fraction <= 1.0,
               f"free_gpu_memory_fraction must be in (0, 1], got {self.free_gpu_memory_fraction}")
        _check(self.max_tokens is None or self.max_tokens >= 1, f"max_tokens must be positive, got {self.max_tokens}")
        _check(self.tokens_per_block is None or self.tokens_per_block >= 1,
               f"tokens_per_block must be positive, got {self.tokens_per_block}")


@dataclass
class BuildConfig:
    """Limits of one engine step and of one sequence."""

    max_batch_size: int = 64        # sequences in one step
    max_num_tokens: int = 2048      # tokens in one step: decode tokens plus prefill chunks
    max_seq_len: int | None = None  # prompt plus output; None: the model's maximum positions

    def __post_init__(self) -> None:
        _check(self.max_batch_size >= 1, f"max_batch_size must be positive, got {self.max_batch_size}")
        _check(self.max_num_tokens >= 1, f"max_num_tokens must be positive, got {self.max_num_tokens}")
        _check(self.max_seq_len is None or self.max_seq_len >= 2, f"max_seq_len must be at least 2, got {self.max_seq_len}")


def available_host_memory() -> int:
    """Bytes of RAM the kernel reports as available (Linux), for sizing the pool on CPU."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30
