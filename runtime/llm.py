"""`kiln.LLM`: the API TensorRT-LLM and vLLM users know.

    llm = kiln.LLM("smollm2")
    out = llm.generate(["Hello", "The capital of France is"], SamplingParams(max_tokens=16))
    async for partial in llm.generate_async("Hello", streaming=True): ...

One engine thread owns the engine and runs steps while any request is in flight; `generate`
and `generate_async` hand requests to it and wait on futures, so many callers (threads or one
event loop) share continuous batching.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from typing import Any, Sequence

from tqdm.auto import tqdm

from .config import BuildConfig, KvCacheConfig
from .engine import Engine, RequestError, RequestOutput
from .sampling import SamplingParams

Prompt = str | Sequence[int]


class RequestFuture:
    """A request in flight: `.result(timeout)`, `await future` / `.aresult()`, and with
    streaming, `async for output in future` (each output is cumulative; `finished` on the last; a
    reader that starts late gets the latest output first, not every earlier one)."""

    def __init__(self, llm: "LLM", request_id: str, streaming: bool):
        self._llm, self.request_id, self.streaming = llm, request_id, streaming
        self._done = threading.Event()
        self._latest: RequestOutput | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = []

    # called from the engine thread
    def _update(self, output: RequestOutput) -> None:
        with self._lock:
            self._latest = output
            waiters = list(self._waiters)
            if output.finished:
                self._done.set()
        for loop, q in waiters:
            loop.call_soon_threadsafe(q.put_nowait, output)

    def _fail(self, error: BaseException) -> None:
        with self._lock:
            self._error = error
            self._done.set()
            waiters = list(self._waiters)
        for loop, q in waiters:
            loop.call_soon_threadsafe(q.put_nowait, error)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> RequestOutput:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._latest

    async def aresult(self) -> RequestOutput:
        last = None
        async for out in self._stream():
            last = out
        if self._error is not None:
            raise self._error
        return last if last is not None else self._latest

    def __await__(self):
        return self.aresult().__await__()

    def __aiter__(self):
        return self._stream()

    async def _stream(self):
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if self._latest is not None:  # outputs are cumulative: a late reader starts from the latest
                q.put_nowait(self._latest)
            if self._error is not None:
                q.put_nowait(self._error)
            finished = self._done.is_set()
            if not finished:
                self._waiters.append((asyncio.get_running_loop(), q))
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        except asyncio.CancelledError:
            self.abort()
            raise

    def abort(self) -> None:
        """Stop generating; the request finishes with finish_reason "abort"."""
        self._llm._abort(self.request_id)


class LLM:
    """Compile a model (or take a compiled one) and serve it with continuous batching."""

    def __init__(self, model: Any, tokenizer: Any = None, skip_tokenizer_init: bool = False, *, target: str = "auto",
                 dtype: str = "auto", quant_config: Any = None, build_config: BuildConfig | None = None,
                 kv_cache_config: KvCacheConfig | None = None, tensor_parallel_size: int = 1,
                 trust_remote_code: bool = False):
        from ..api import CompiledModel, compile as kiln_compile, is_artifact, load as load_artifact

        if not isinstance(tensor_parallel_size, int) or isinstance(tensor_parallel_size, bool) or \
                tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be a positive int, got {tensor_parallel_size!r}")
        kv_cache_config = kv_cache_config or KvCacheConfig()
        if isinstance(model, CompiledModel):
            self.model = model
        elif is_artifact(model):
            self.model = load_artifact(model)
        else:
            self.model = kiln_compile(model, target=target, quant=quant_config, dtype=dtype,
                                      tokens_per_block=kv_cache_config.tokens_per_block or 16,
                                      trust_remote_code=trust_remote_code)
        self.tokenizer = None if skip_tokenizer_init else tokenizer if tokenizer is not None and not isinstance(
            tokenizer, str) else self._load_tokenizer(tokenizer)
        config = self.model.config
        graph, executable, self.parallel = self.model.graph, None, None
        if tensor_parallel_size > 1:  # one process per rank; this one is rank 0 and drives them all
            from .distributed import launch

            self.parallel = launch(self.model, tensor_parallel_size)
            graph, executable = self.parallel.graph, self.parallel.executable
        try:
            self.engine = Engine(graph, executable if executable is not None else self.model.executable(),
                                 tokenizer=self.tokenizer, kv_cache_config=kv_cache_config, build_config=build_config,
                                 max_positions=config.get("max_positions"),
                                 eos_token_ids=config.get("eos_token_ids", ()), device=self.model.device)
        except BaseException:
            self.close()
            raise
        self._ids = itertools.count()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._futures: dict[str, RequestFuture] = {}
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def close(self) -> None:
        """Stop the tensor-parallel ranks, if any (also done at interpreter exit)."""
        if self.parallel is not None:
            self.parallel.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _load_tokenizer(self, name: str | None) -> Any:
        from ..frontends.hf import tokenizer_for

        tokenizer = tokenizer_for(name) if name is not None else self.model.tokenizer()
        if tokenizer is None:
            raise ValueError("this model has no tokenizer: pass tokenizer=... or skip_tokenizer_init=True and "
                             "give prompts as token ids")
        return tokenizer

    # -- requests -----------------------------------------------------------------------------------

    def _prepare(self, prompt: Prompt, params: SamplingParams | None) -> tuple[str | None, list[int], SamplingParams]:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("a text prompt needs a tokenizer (skip_tokenizer_init=True): give token ids")
            if not prompt:
                raise RequestError("the prompt is empty")
            return prompt, list(self.tokenizer(prompt)["input_ids"]), params
        ids = list(prompt)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise RequestError("a prompt is a string or a list of token ids (ints)")
        return None, ids, params

    def generate_async(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
                       streaming: bool = False) -> RequestFuture:
        """Submit one request; bad input raises here, for this request alone."""
        text, ids, params = self._prepare(prompt, sampling_params)
        request_id = str(next(self._ids))
        future = RequestFuture(self, request_id, streaming)
        if params.use_beam_search:
            threading.Thread(target=self._beam_request, args=(future, text, ids, params), daemon=True).start()
            return future
        done = threading.Event()
        error: list[BaseException] = []
        self._inbox.put(("add", request_id, ids, params, text, future, done, error))
        self._ensure_thread()
        done.wait()
        if error:
            raise error[0]
        return future

    def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> RequestOutput | list[RequestOutput]:
        """Generate for one prompt (returns one output) or many (returns a list, in order)."""
        single = isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int))
        batch = [prompts] if single else list(prompts)
        params = sampling_params if isinstance(sampling_params, Sequence) else [sampling_params] * len(batch)
        if len(params) != len(batch):
            raise ValueError(f"{len(params)} sampling params for {len(batch)} prompts")
        for i, (p, sp) in enumerate(zip(batch, params)):  # validate all before starting any
            try:
                self._prepare(p, sp)
            except RequestError as e:
                raise RequestError(f"prompt {i}: {e}") from None
        futures = [self.generate_async(p, sp) for p, sp in zip(batch, params)]
        outputs = [f.result() for f in tqdm(futures, desc="generating", disable=not use_tqdm or len(futures) < 2)]
        return outputs[0] if single else outputs

    def _beam_request(self, future: RequestFuture, text: str | None, ids: list[int], params: SamplingParams) -> None:
        """Beam search runs on the engine thread between steps, over the same paged pool."""
        from .engine import CompletionOutput
        from .hf_model import beam_search

        try:
            eos = {params.end_id} if params.end_id is not None else set() if params.ignore_eos else \
                set(self.engine.eos_token_ids)
            found = self.call_in_engine(lambda engine: beam_search(engine, ids, params, eos | set(params.stop_token_ids or ())))
            outputs = []
            for i, (score, tokens) in enumerate(found.best(params.n)):
                text_out = self.tokenizer.decode(tokens, skip_special_tokens=params.skip_special_tokens) \
                    if self.tokenizer is not None else ""
                reason = "stop" if tokens and tokens[-1] in eos else "length"
                outputs.append(CompletionOutput(i, text_out, tokens, cumulative_logprob=score, finish_reason=reason))
            future._update(RequestOutput(future.request_id, text, ids, outputs, finished=True))
        except Exception as e:  # handed to whoever waits on the future
            future._fail(e)

    def call_in_engine(self, fn: Any) -> Any:
        """Run fn(engine) on the engine thread, between steps, and return its result."""
        done, box = threading.Event(), []
        self._inbox.put(("call", fn, done, box))
        self._ensure_thread()
        done.wait()
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def _abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._ensure_thread()

    # -- the engine thread ----------------------------------------------------------------------------

    def _ensure_thread(self) -> None:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="kiln-engine", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            try:
                command = self._inbox.get(timeout=None if not self.engine.has_work else 0)
            except queue.Empty:
                command = None
            if command is not None:
                self._handle(command)
                continue
            try:
                self.engine.step()
            except Exception as e:  # a failing step fails the requests in it, not the process
                for future in list(self._futures.values()):
                    future._fail(e)
                    self.engine.abort(future.request_id)
                self._futures.clear()

    def _handle(self, command: tuple) -> None:
        if command[0] == "add":
            _, request_id, ids, params, text, future, done, error = command
            try:
                self.engine.add_request(request_id, ids, params, prompt=text, stream=future.streaming,
                                        on_update=lambda out, f=future: self._deliver(f, out))
                self._futures[request_id] = future
            except (RequestError, ValueError) as e:
                error.append(e)
            done.set()
        elif command[0] == "abort":
            self.engine.abort(command[1])
        elif command[0] == "call":
            _, fn, done, box = command
            try:
                box.append(fn(self.engine))
            except Exception as e:  # handed back to the caller's thread
                box.append(e)
            done.set()

    def _deliver(self, future: RequestFuture, output: RequestOutput) -> None:
        if future.streaming or output.finished:
            future._update(output)
        if output.finished:
            self._futures.pop(future.request_id, None)

