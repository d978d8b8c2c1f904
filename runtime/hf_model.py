"""The entry point optimum-nvidia users know: `kiln.AutoModelForCausalLM.from_pretrained(model)`
returns a model whose `generate(input_ids, ...)` takes and returns token tensors the way
`transformers`' does (prompt included, a left-padded batch accepted, finished rows padded),
running on kiln's runtime: greedy and sampling through the continuous-batching engine, beam
search on the same engine's paged KV pool, forking a beam's blocks when it is extended twice.
"""

from __future__ import annotations

import asyncio
from typing import Any, Sequence

import torch

from .engine import Engine
from .llm import LLM
from .sampling import BeamSearch, SamplingParams, beam_logprobs


class AutoModelForCausalLM:
    """`from_pretrained(model, use_fp8=False, **LLM options)`, as optimum-nvidia spells it."""

    @staticmethod
    def from_pretrained(model: Any, use_fp8: bool = False, **options: Any) -> "CausalLM":
        if use_fp8:
            raise ValueError("use_fp8=True needs kiln's FP8 quantization, which this version does not have yet; "
                             "use use_fp8=False")
        return CausalLM(LLM(model, **options))


class CausalLM:
    def __init__(self, llm: LLM):
        self.llm = llm

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0, top_k: int = 50,
                 top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0, num_beams: int = 1,
                 length_penalty: float = 1.0, early_stopping: bool = False, num_return_sequences: int = 1,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                 seed: int | None = None) -> torch.Tensor:
        """Token ids in, token ids out ([batch * num_return_sequences, input length + new tokens])."""
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 1:
            ids = ids[None]
        mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else torch.as_tensor(attention_mask).bool()
        prompts = [row[m].tolist() for row, m in zip(ids, mask)]
        eos = self._eos(eos_token_id)
        pad = pad_token_id if pad_token_id is not None else (next(iter(eos)) if eos else 0)
        if num_beams > 1:
            params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, use_beam_search=True,
                                    beam_width=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
                                    n=num_return_sequences, repetition_penalty=repetition_penalty)
            new = [seq for p in prompts for seq in self._beam_search(p, params, eos, num_return_sequences)]
        else:
            params = SamplingParams(max_tokens=max_new_tokens, n=num_return_sequences, seed=seed,
                                    temperature=temperature if do_sample else 0.0,
                                    top_k=top_k if do_sample else 0, top_p=top_p if do_sample else 1.0,
                                    min_p=min_p if do_sample else 0.0, repetition_penalty=repetition_penalty,
                                    **({"end_id": next(iter(eos))} if len(eos) == 1 else {"ignore_eos": not eos}))
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
            new = [o.token_ids for out in outputs for o in out.outputs]
        rows = ids.repeat_interleave(num_return_sequences, 0)
        width = max(len(n) for n in new)
        # transformers pads finished rows with pad_token_id, and finished beams with the eos token
        fill = next(iter(sorted(eos))) if num_beams > 1 and eos else pad
        tail = torch.full((len(new), width), fill, dtype=ids.dtype)
        for i, n in enumerate(new):
            tail[i, : len(n)] = torch.tensor(n, dtype=ids.dtype)
        return torch.cat([rows, tail], dim=1)

    async def agenerate(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """`generate` without blocking the event loop."""
        return await asyncio.get_running_loop().run_in_executor(None, lambda: self.generate(input_ids, **kwargs))

    def _eos(self, eos_token_id: int | Sequence[int] | None) -> set[int]:
        if eos_token_id is not None:
            return {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
        return set(self.llm.engine.eos_token_ids)

    def _beam_search(self, prompt: list[int], params: SamplingParams, eos: set[int], n: int) -> list[list[int]]:
        found = self.llm.call_in_engine(lambda engine: beam_search(engine, prompt, params, eos))
        return [tokens for _, tokens in found.best(n)]


def beam_search(engine: Engine, prompt: list[int], params: SamplingParams, eos: set[int]) -> BeamSearch:
    """Beam search over the engine's paged pool: every beam owns its blocks; a beam extended by
    several children is copied block by block."""
    search = BeamSearch(prompt, params, eos, max_length=len(prompt) + params.max_tokens)
    pool = engine.pool
    owned: list[list[int]] = []
    try:
        owned = [_grow(pool, [], len(prompt))]
        logits = _run(engine, [(prompt, 0, owned[0])])
        while True:
            outputs = [beam[len(prompt):] for beam in search.beams]
            scores = beam_logprobs(logits, [params] * len(search.beams), [prompt] * len(search.beams), outputs,
                                   [eos] * len(search.beams))
            parents = search.step(scores)
            if search.done:
                return search
            children = []
            for parent in parents:
                blocks = _grow(pool, [], len(search.beams[0]))
                for src, dst in zip(owned[parent], blocks):
                    for cache in engine.caches:
                        cache[dst].copy_(cache[src])
                children.append(blocks)
            for blocks in owned:
                pool.release(blocks)
            owned = children
            logits = _run(engine, [(beam, len(beam) - 1, blocks) for beam, blocks in zip(search.beams, owned)])
    finally:
        for blocks in owned:
            pool.release(blocks)


def _grow(pool: Any, blocks: list[int], tokens: int) -> list[int]:
    while len(blocks) * pool.block_size < tokens:
        blocks.append(pool.allocate())
    return blocks


def _run(engine: Engine, rows: list[tuple[list[int], int, list[int]]]) -> torch.Tensor:
    """One step over (tokens, first uncached position, blocks) rows; logits of each row's last token."""
    from .scheduler import Scheduled, Sequence as Seq

    batch = []
    for tokens, start, blocks in rows:
        seq = Seq(list(tokens))
        seq.blocks = blocks
        batch.append(Scheduled(seq, start, len(tokens) - start))
    return engine._run(batch)[0]
