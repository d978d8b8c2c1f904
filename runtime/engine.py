"""The engine loop: schedule a step, pack its tokens and attention metadata into the serving
graph's inputs, run the compiled model, sample, detokenise, and report what changed.

The engine reads everything it needs off the serving graph itself (the inputs the kv-cache pass
made: metadata, one K and one V cache per layer), so any backend's executable plugs in.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from typing import Sequence as Seq

import numpy as np
import torch

from ..backends import StepInfo
from ..backends.transfer import to_device
from ..ir.graph import Graph
from ..passes.kv_cache import SERVING_INPUTS
from .blocks import BlockPool
from .config import BuildConfig, KvCacheConfig, available_host_memory
from .detokenizer import IncrementalDetokenizer, StopChecker
from .sampling import (
    SamplingParams,
    device_sampling_from,
    request_generator,
    sample,
    sample_on_device,
)
from .scheduler import Scheduled, Scheduler, Sequence, Status

CPU_POOL_TOKENS = 65536
METADATA = SERVING_INPUTS


class RequestError(ValueError):
    """A request that cannot run (empty, too long, bad parameters); it fails alone."""


@dataclass
class CompletionOutput:
    """One generated sequence of a request, as vLLM and TensorRT-LLM shape it."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None     # "stop", "length", "abort"
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]          # the request's own list, in each of its outputs (as vLLM's): read only
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: list[dict[int, float] | None] | None = None  # per prompt token; None for the first


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence] = field(default_factory=list)
    outputs: list[CompletionOutput] = field(default_factory=list)
    on_update: Callable[["RequestOutput"], None] | None = None
    stream: bool = True                  # an output every step it changes; False: only once finished
    prompt_logprobs: dict[int, dict[int, float]] = field(default_factory=dict)  # by position

    @property
    def finished(self) -> bool:
        return None not in [o.finish_reason for o in self.outputs]  # 3x faster than all(o.finished ...): asked per step

    def snapshot(self, finished: bool | None = None) -> RequestOutput:
        """A copy of where the request stands; `finished` if the caller knows it already."""
        outs = [CompletionOutput(o.index, o.text, list(o.token_ids), o.cumulative_logprob,
                                 list(o.logprobs) if o.logprobs is not None else None, o.finish_reason, o.stop_reason)
                for o in self.outputs]
        prompt_logprobs = None
        if self.params.prompt_logprobs is not None:
            prompt_logprobs = [None] + [self.prompt_logprobs.get(p) for p in range(1, len(self.prompt_ids))]
        return RequestOutput(self.request_id, self.prompt, self.prompt_ids, outs,
                             self.finished if finished is None else finished, prompt_logprobs)


@dataclass
class _Pending:
    """A launched step whose sampled tokens are still on the device; the engine resolves them one
    step later, after launching the next step, so host work runs while the GPU computes."""

    seqs: list[Sequence]             # in the order of `tokens`
    tokens: torch.Tensor             # [len(seqs)] on the device
    host: torch.Tensor               # where they are being copied (pinned on a GPU)
    ready: Any                       # a CUDA event recorded after the copy, or None on CPU

    def row_of(self) -> dict[int, int]:
        return {seq.seq_id: i for i, seq in enumerate(self.seqs)}

    def resolve(self, check: Callable[[], None] | None = None) -> list[int]:
        """The tokens, once copied; `check` (raising) is polled while waiting."""
        if self.ready is not None:
            wait_for(self.ready, check)
        return self.host.tolist()


WAIT_POLL_S = 50e-6
FAILURE_GRACE_S = 5.0
"""How long a device error in a wait gives the health check to name a failed rank before it is raised."""


def wait_for(event: Any, check: Callable[[], None] | None = None) -> None:
    """Wait for a CUDA event; with `check`, by polling it, so that a step that can never finish (a
    tensor-parallel peer died inside a collective) raises `check`'s error instead of hanging."""
    if check is None:
        event.synchronize()
        return
    while True:
        try:
            if event.query():
                return
        except Exception:  # the device failed under the step (a dead peer's memory read by a collective):
            deadline = time.monotonic() + FAILURE_GRACE_S  # let `check` name the failure if it is one
            while time.monotonic() < deadline:
                check()
                time.sleep(1e-3)
            raise
        check()
        time.sleep(WAIT_POLL_S)


PLACEHOLDER = -1
"""Stands in a sequence's output_ids for a token still on the device (at most one, the last)."""


@dataclass
class _SeqState:
    """What the engine keeps per sequence besides its tokens, and what it decides about it once."""

    request: Request
    output: CompletionOutput
    generator: torch.Generator | None
    detokenizer: IncrementalDetokenizer | None
    stop: StopChecker | None
    eos: set[int]
    finish_ids: set[int]       # eos and stop_token_ids: a sampled one ends the sequence
    max_outputs: int           # it ends by length with this many outputs (max_tokens, or the longest sequence)
    device_from: float         # from this many outputs its tokens are sampled on the device (inf: never)


class Engine:
    """Runs a serving graph's executable over a paged KV pool it owns."""

    def __init__(self, graph: Graph, executable: Callable[..., list[torch.Tensor]], *, tokenizer: Any = None,
                 kv_cache_config: KvCacheConfig | None = None, build_config: BuildConfig | None = None,
                 max_positions: int | None = None, eos_token_ids: Seq[int] = (), device: str = "cpu",
                 overlap: bool | None = None, progress: bool = True):
        names = [v.name for v in graph.inputs]
        if names[: len(METADATA)] != list(METADATA):
            raise ValueError(f"not a serving graph (inputs {', '.join(names[:8])}...): compile it with the "
                             f"'serving' pipeline")
        self.executable = executable
        self.tokenizer = tokenizer
        tokenizer_eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_token_ids = set(eos_token_ids) | ({tokenizer_eos} if tokenizer_eos is not None else set())
        self.kv_config = kv_cache_config or KvCacheConfig()
        self.build_config = build_config or BuildConfig()
        self.device = device
        caches = graph.inputs[len(METADATA):]
        _, block, kv_heads, head_dim = caches[0].type.shape
        if self.kv_config.tokens_per_block not in (None, block):
            raise ValueError(f"kv_cache_config.tokens_per_block={self.kv_config.tokens_per_block} but the model was "
                             f"compiled for blocks of {block}; compile with tokens_per_block="
                             f"{self.kv_config.tokens_per_block}")
        dtype = caches[0].type.dtype.torch
        self.max_seq_len = self.build_config.max_seq_len or max_positions or 4096
        num_blocks = self._pool_blocks(len(caches), block, kv_heads, head_dim, dtype)
        # never read before written (paged attention reads each sequence's first context_lens tokens)
        self.caches = [torch.empty(num_blocks, block, kv_heads, head_dim, dtype=dtype, device=device) for _ in caches]
        self.pool = BlockPool(num_blocks, block, self.kv_config.enable_block_reuse)
        self.scheduler = Scheduler(self.pool, self.build_config.max_batch_size, self.build_config.max_num_tokens)
        self.requests: dict[str, Request] = {}
        self._state: dict[int, _SeqState] = {}
        self.steps = 0
        # Overlap: a step whose rows all sample on the device (greedy, or drawn without a seed, with no
        # logprobs or penalties) leaves its tokens there, and the next step is scheduled and launched
        # before they are read (a finished sequence may so compute one token that is dropped).
        # Default: on for GPU executables that take host metadata (kiln's cuda backend).
        self.overlap = (device.startswith("cuda") and getattr(executable, "host_inputs", False)) \
            if overlap is None else overlap
        self._pending: _Pending | None = None
        self._health: Callable[[], None] | None = getattr(executable, "check_health", None)  # raises if broken
        capture = getattr(executable, "capture_decode", None)  # kiln's cuda backend: its decode graphs, up front
        if capture is not None and device.startswith("cuda"):
            capture(self.caches, self.build_config.max_batch_size, progress)

    def _pool_blocks(self, num_caches: int, block: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        per_token = num_caches * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
        if self.kv_config.max_tokens is not None:
            tokens = self.kv_config.max_tokens
        else:
            if self.device.startswith("cuda"):
                free, _ = torch.cuda.mem_get_info(torch.device(self.device))
                tokens = int(free * self.kv_config.free_gpu_memory_fraction) // per_token
            else:  # a CPU serves tests and debugging: a quarter of free RAM, at most CPU_POOL_TOKENS
                tokens = min(int(available_host_memory() * self.kv_config.free_gpu_memory_fraction) // 4 // per_token,
                             CPU_POOL_TOKENS)
            tokens = min(tokens, self.max_seq_len * self.build_config.max_batch_size)
        blocks = tokens // block
        if blocks < 1:
            raise ValueError(f"the KV pool would hold {tokens} tokens, less than one block of {block}: raise "
                             f"kv_cache_config.max_tokens or free_gpu_memory_fraction")
        return blocks

    # -- requests -----------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_ids: Seq[int], params: SamplingParams, prompt: str | None = None,
                    on_update: Callable[[RequestOutput], None] | None = None, stream: bool = True) -> Request:
        """Queue a request; with stream=False, step() reports it only when it finishes (vLLM's
        FINAL_ONLY), which saves a snapshot per request per step."""
        prompt_ids = [int(t) for t in prompt_ids]
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already running")
        if not prompt_ids:
            raise RequestError("the prompt is empty: give at least one token")
        if len(prompt_ids) >= self.max_seq_len:
            raise RequestError(f"the prompt has {len(prompt_ids)} tokens but max_seq_len is {self.max_seq_len}: "
                               f"shorten it or raise build_config.max_seq_len")
        if len(prompt_ids) + 1 > self.capacity:
            raise RequestError(f"the prompt has {len(prompt_ids)} tokens but the KV pool holds {self.capacity}: "
                               f"raise kv_cache_config.max_tokens")
        if params.best_of is not None and params.best_of > params.n:
            raise RequestError(f"best_of={params.best_of} > n={params.n} is not supported by this runtime yet: "
                               f"ask for n={params.best_of} and rank by cumulative_logprob")
        if params.use_beam_search:
            raise RequestError("beam-search requests are run by LLM.generate / generate_async, not queued on the "
                               "engine's batch")
        request = Request(request_id, prompt, prompt_ids, params, on_update=on_update, stream=stream)
        max_outputs = min(params.max_tokens, min(self.max_seq_len, self.capacity) - len(prompt_ids))
        for i in range(params.n):
            seq = Sequence(list(prompt_ids), request=request)
            out = CompletionOutput(i, logprobs=[] if params.logprobs is not None else None,
                                   cumulative_logprob=0.0 if params.logprobs is not None else None)
            gen_params = params if params.seed is None or i == 0 else _reseeded(params, params.seed + i)
            detok = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens) \
                if self.tokenizer is not None else None
            stops = params.stop if isinstance(params.stop, list) else [params.stop] if params.stop else []
            checker = StopChecker(stops, params.include_stop_str_in_output) if stops and detok is not None else None
            eos = set() if params.ignore_eos else {params.end_id} if params.end_id is not None else set(self.eos_token_ids)
            generator = request_generator(gen_params)
            device_from = device_sampling_from(params, generator)
            self._state[seq.seq_id] = _SeqState(request, out, generator, detok, checker, eos,
                                                eos | set(params.stop_token_ids or ()), max_outputs,
                                                math.inf if device_from is None else device_from)
            request.seqs.append(seq)
            request.outputs.append(out)
            self.scheduler.add(seq)
        self.requests[request_id] = request
        return request

    def abort(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        for seq, out in zip(request.seqs, request.outputs):
            if not out.finished:  # (its sequence may have left the scheduler already: a last token pending)
                self.scheduler.finish(seq)
                out.finish_reason = "abort"
            self._state.pop(seq.seq_id, None)
        if request.on_update:
            request.on_update(request.snapshot())

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or self._pending is not None

    @property
    def capacity(self) -> int:
        """The most tokens one sequence can hold: the whole pool."""
        return self.pool.num_blocks * self.pool.block_size

    # -- one step -----------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one step; the outputs of requests that changed (with overlap, those of the step before)."""
        return self._report(self._advance())

    def _advance(self) -> dict[str, Request]:
        """Schedule and launch a step, and take in the tokens that are ready: the requests they changed.
        (Apart from `_report`, so that the step's own objects are freed before it makes an output per
        request: fewer live objects, fewer garbage-collector passes over them.)"""
        batch = self.scheduler.schedule()
        pending, self._pending = self._pending, None
        if not batch and pending is None:
            if self.scheduler.waiting:
                raise RuntimeError("no sequence can be scheduled: the KV pool is too small for the waiting "
                                   "request")
            return {}
        try:
            launched = self._run(batch, pending) if batch else None
        except BaseException:
            self._pending = pending  # a step that failed to launch loses none of the tokens still to read
            raise
        touched: dict[str, Request] = {}
        if pending is not None:  # the GPU is busy with `batch` while the host takes these in
            state = self._state
            for seq, token in zip(pending.seqs, pending.resolve(self._health)):
                st = state.get(seq.seq_id)
                if st is not None and seq.output_ids and seq.output_ids[-1] == PLACEHOLDER:
                    seq.output_ids.pop()
                    self._append(seq, st, token, 0.0, None)
                    touched[st.request.request_id] = st.request
        if launched is not None:
            self._take_step(batch, *launched, touched)
        return touched

    def _report(self, touched: dict[str, Request]) -> list[RequestOutput]:
        """The outputs of the changed requests (of those not streamed, only once finished), also handed to
        their callbacks; finished requests are let go."""
        outputs = []
        for request in touched.values():
            finished = request.finished
            if not request.stream and not finished:
                continue
            snap = request.snapshot(finished)
            outputs.append(snap)
            if request.on_update:
                request.on_update(snap)
            if finished:
                self.requests.pop(request.request_id, None)
        return outputs

    def _take_step(self, batch: list[Scheduled], logits: torch.Tensor, sample_rows: list[int],
                   sample_seqs: list[Sequence], prompt_rows: list[tuple[int, Sequence, int]],
                   touched: dict[str, Request]) -> None:
        """Advance the scheduler past a launched step and sample its rows (or leave them pending)."""
        self.scheduler.advance(batch)
        self.steps += 1
        # a sequence that finished on the previous step's token computed one more: dropped here
        rows, ready, states = [], [], []
        for row, seq in zip(sample_rows, sample_seqs):
            st = self._state.get(seq.seq_id)
            if st is not None and seq.status is not Status.FINISHED:
                rows.append(row)
                ready.append(seq)
                states.append(st)
        prompt_rows = [r for r in prompt_rows if r[1].seq_id in self._state]
        if prompt_rows:
            self._await(logits)
            self._prompt_logprobs(logits, prompt_rows, touched)
        if not ready:
            return
        params = [st.request.params for st in states]
        if self.overlap and not prompt_rows and all(len(seq.output_ids) >= st.device_from
                                                    for seq, st in zip(ready, states)):
            self._pending = self._launch_sampling(logits, rows, ready, states, params)
            return
        self._await(logits)
        sampled = sample(logits[rows], params, [seq.prompt_ids for seq in ready],
                         [seq.output_ids for seq in ready], [st.generator for st in states],
                         eos_ids=[st.finish_ids for st in states])
        for i, (seq, st) in enumerate(zip(ready, states)):
            self._append(seq, st, sampled.token_ids[i], sampled.logprobs[i], sampled.top_logprobs[i])
            touched[st.request.request_id] = st.request

    def _await(self, logits: torch.Tensor) -> None:
        """Before the host reads the step's results: wait for them checking the executable's health
        (a tensor-parallel job whose peer died raises here rather than hang in a read)."""
        if self._health is not None and logits.is_cuda:
            event = torch.cuda.Event()
            event.record()
            wait_for(event, self._health)

    def _launch_sampling(self, logits: torch.Tensor, rows: list[int], ready: list[Sequence], states: list[_SeqState],
                         params: list[SamplingParams]) -> _Pending:
        """Enqueue the sampling of `rows` and its copy to the host; the sequences hold a placeholder."""
        if rows != list(range(logits.shape[0])):  # (a decode step samples every row, in order: no gather)
            logits = logits.index_select(0, to_device(torch.tensor(rows, dtype=torch.int64), logits.device))
        tokens = sample_on_device(logits, params)
        if logits.is_cuda:
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = tokens, None
        for seq, st in zip(ready, states):
            seq.output_ids.append(PLACEHOLDER)
            if len(seq.output_ids) >= st.max_outputs:
                self.scheduler.finish(seq)  # this token is its last: schedule nothing more for it
        return _Pending(ready, tokens, host, event)

    def _append(self, seq: Sequence, st: _SeqState, token: int, logprob: float, top: dict[int, float] | None) -> None:
        params, out = st.request.params, st.output
        seq.output_ids.append(token)
        out.token_ids.append(token)
        if out.cumulative_logprob is not None:
            out.cumulative_logprob += logprob
        if out.logprobs is not None:
            out.logprobs.append({**(top or {}), token: logprob})
        reason = None
        if token in st.finish_ids:  # the sampler held them back until min_tokens
            reason, out.stop_reason = "stop", None if token in st.eos else token
        if st.detokenizer is not None and (reason is None or params.include_stop_str_in_output):
            st.detokenizer.add(token)
            out.text = st.detokenizer.text
            if st.stop is not None:  # hold back the start of a stop string until it is known not to be one
                cut = st.stop.check(out.text)
                out.text = out.text[: st.stop.sent] if cut is None else cut[0]
                if cut is not None:
                    reason, out.stop_reason = "stop", cut[1]
        if reason is None and len(seq.output_ids) >= st.max_outputs:
            reason = "length"
        if reason is not None and st.detokenizer is not None and not isinstance(out.stop_reason, str):
            st.detokenizer.flush()          # ended without a stop string: a split character and held-back
            out.text = st.detokenizer.text  # text are released
        if reason is not None:
            out.finish_reason = reason
            self.scheduler.finish(seq)
            self._state.pop(seq.seq_id, None)

    def _prompt_logprobs(self, logits: torch.Tensor, rows: list[tuple[int, Sequence, int]],
                         touched: dict[str, Request]) -> None:
        """Logprobs of prompt tokens from the rows that predict them (row at position p predicts p + 1)."""
        logprobs = torch.log_softmax(logits[[r for r, _, _ in rows]].float(), dim=-1)
        for (_, seq, p), lp in zip(rows, logprobs):
            request = self._state[seq.seq_id].request
            token = seq.prompt_ids[p + 1]
            k = request.params.prompt_logprobs
            top = {} if k == 0 else dict(zip(*(t.tolist() for t in reversed(lp.topk(k)))))
            request.prompt_logprobs[p + 1] = {**top, token: float(lp[token])}
            touched[request.request_id] = request

    def _run(self, batch: list[Scheduled], pending: _Pending | None = None
             ) -> tuple[torch.Tensor, list[int], list[Sequence], list[tuple[int, Sequence, int]]]:
        """Launch one step; the logits, the rows to sample from and their sequences, and (row, sequence,
        position) of prompt rows whose logprobs were asked for. Tokens still pending on the device are
        gathered there. Per-token metadata is computed in numpy from per-sequence scalars."""
        tokens, starts, counts, tables = [], [], [], []
        rows, sample_rows, sample_seqs, prompt_rows = [], [], [], []
        pending_rows = pending.row_of() if pending is not None else {}
        gather_at, gather_from = [], []  # positions in this step's tokens, rows of pending.tokens
        for s in batch:
            seq, start, count = s.seq, s.start, s.num_tokens
            ids = seq.tokens(start, start + count)
            if ids[-1] == PLACEHOLDER and seq.seq_id in pending_rows:
                gather_at.append(len(tokens) + count - 1)
                gather_from.append(pending_rows[seq.seq_id])
            first = len(tokens)
            tokens += ids
            starts.append(start)
            counts.append(count)
            tables.append(seq.blocks)
            if start < len(seq.prompt_ids) - 1:  # prompt tokens whose logprobs may be asked for
                st = self._state.get(seq.seq_id)
                if st is not None and st.request.params.prompt_logprobs is not None and st.output.index == 0:
                    for p in range(start, min(start + count, len(seq.prompt_ids) - 1)):
                        prompt_rows.append((len(rows), seq, p))
                        rows.append(first + p - start)
            if s.produces_logits:
                sample_rows.append(len(rows))
                sample_seqs.append(seq)
                rows.append(len(tokens) - 1)
        host = getattr(self.executable, "host_inputs", False)  # it moves them itself, knowing the step's shape
        device = "cpu" if host else self.device
        start_of = np.array(starts, dtype=np.int64)
        count_of = np.array(counts, dtype=np.int64)
        query_start = np.zeros(len(batch) + 1, dtype=np.int64)
        np.cumsum(count_of, out=query_start[1:])
        lens = start_of + count_of
        seq_of_token = np.repeat(np.arange(len(batch)), count_of)
        positions = np.arange(len(tokens)) - np.repeat(query_start[:-1] - start_of, count_of)
        table = _block_table(tables)
        bs = self.pool.block_size
        slots = table[seq_of_token, positions // bs].astype(np.int64) * bs + positions % bs

        def tensor(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
            return to_device(torch.from_numpy(a).to(dtype), device)

        token_input = tensor(np.array(tokens, dtype=np.int32), torch.int32)
        if gather_at:
            token_input = _gather_tokens(token_input, gather_at, gather_from, pending.tokens)
        inputs = [token_input, tensor(positions, torch.int32), tensor(slots, torch.int64), tensor(table, torch.int32),
                  tensor(lens, torch.int32), tensor(query_start, torch.int32),
                  tensor(np.array(rows, dtype=np.int64), torch.int64)]
        if host:
            step = StepInfo(len(batch), len(tokens), int(count_of.max()), int(lens.max()))
            return self.executable(*inputs, *self.caches, step=step)[0], sample_rows, sample_seqs, prompt_rows
        return self.executable(*inputs, *self.caches)[0], sample_rows, sample_seqs, prompt_rows


def _block_table(tables: list[list[int]]) -> np.ndarray:
    """The sequences' block lists as one int32 table, zero-padded (built in numpy: a nested-list tensor
    costs a few ms a step at 512 sequences)."""
    lengths = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))
    table = np.zeros((len(tables), int(lengths.max())), dtype=np.int32)
    table[np.arange(table.shape[1]) < lengths[:, None]] = np.fromiter(
        itertools.chain.from_iterable(tables), dtype=np.int32, count=int(lengths.sum()))
    return table


def _gather_tokens(tokens: torch.Tensor, at: list[int], rows: list[int], pending: torch.Tensor) -> torch.Tensor:
    """`tokens` with positions `at` taken from `pending`'s `rows` (where it lives: no wait on the device)."""
    if len(at) == len(tokens) == len(pending) and at == rows == list(range(len(at))):  # decode, in the same order
        return pending.to(tokens.dtype)
    index = to_device(torch.tensor([at, rows], dtype=torch.int64), pending.device)
    tokens = to_device(tokens, pending.device)
    tokens[index[0]] = pending.index_select(0, index[1]).to(tokens.dtype)
    return tokens


def _reseeded(params: SamplingParams, seed: int) -> SamplingParams:
    from dataclasses import replace

    return replace(params, seed=seed)

