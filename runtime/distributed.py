"""Tensor parallelism at run time: one process per rank in one torch.distributed group (NCCL on
GPUs, gloo on CPU). This process is rank 0; it keeps the scheduler and its Engine calls rank 0's
executable like any other. Every step that executable sends each worker, in one message down a
pipe, the step's inputs (tokens, positions, slot mapping, block tables, context lens, query starts,
logits rows), the size of the KV pool and the step's shape; then each rank runs its own shard of the
serving graph on its own KV pool. The logits come back on every rank through the graph's
all-gather. Calls (loading, measuring) go over a gloo group.

    tp = launch(kiln.compile(model), tensor_parallel_size=2)   # starts ranks 1.. and loads every shard
    engine = Engine(tp.graph, tp.executable, ...)                # rank 0's graph, caches and scheduler
    tp.close()

A rank that raises or dies ends the job: rank 0 raises `RankError` naming the rank and its error
(a watchdog follows the worker processes; collectives have a timeout), and the other ranks are
stopped. Workers exit when rank 0's process goes away.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import math
import multiprocessing as mp
import multiprocessing.connection
import os
import shutil
import signal
import tempfile
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as torch_dist

from ..ir.storage import (
    FILE_READS,
    SafetensorsSliceStorage,
    SafetensorsStorage,
    Storage,
)
from ..passes.kv_cache import SERVING_INPUTS

CALL, STEP, STOP = 1, 2, 3
STEP_FIELDS = 4
HEADER = 4 + 2 * len(SERVING_INPUTS) + STEP_FIELDS
"""A step's header: command, payload length, KV pool blocks, each input's shape (two dims, -1 if absent),
then rank 0's StepInfo (zeros: none), so that every rank makes the same choices (which CUDA graph to
replay or capture) and their collectives stay matched, then whether the tokens follow by broadcast."""
IDLE_TIMEOUT = datetime.timedelta(days=3650)
"""Workers wait for rank 0's next command as long as the server lives."""


class RankError(RuntimeError):
    """A rank of a tensor-parallel job raised or died; the job is over."""


@dataclass
class RankState:
    """What one rank keeps between commands: where it runs, and its model once loaded."""

    rank: int
    world_size: int
    device: str
    model: Any = None                 # the rank's CompiledModel
    executable: Any = None
    caches: list[torch.Tensor] = field(default_factory=list)

    def release_device(self) -> None:
        """Drop what holds the communicators (captured graphs with collectives, symmetric buffers) so
        that aborting them does not wait on it; the rank serves nothing after this."""
        if self.executable is not None and self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
            release = getattr(self.executable, "release", None)
            if release is not None:
                release()
            self.executable = None
            self.caches = []
            import gc

            gc.collect()
            torch.cuda.empty_cache()


# -- a model every rank can rebuild -----------------------------------------------------------------

@dataclass
class PortableGraph:
    """A graph in a form another process can rebuild without tracing: its text and its parameters'
    storage trees, whose leaves are safetensors files (tensors held in memory are written once to
    `spill_dir`), so that a rank reads only its slices. `fields`: a compiled model's other facts."""

    text: str
    storages: dict[str, Storage]
    fields: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, graph: Any, spill_dir: str, **fields: Any) -> PortableGraph:
        from safetensors.torch import save_file

        from ..ir.printer import print_graph

        spill: dict[str, torch.Tensor] = {}
        path = os.path.join(spill_dir, "weights.safetensors")
        done: dict[int, Storage] = {}

        def portable(s: Storage) -> Storage:
            if id(s) in done:
                return done[id(s)]
            if isinstance(s, (SafetensorsStorage, SafetensorsSliceStorage)):
                out = s
            elif dataclasses.is_dataclass(s) and _children(s):
                out = dataclasses.replace(s, **{k: portable(v) if isinstance(v, Storage) else [portable(x) for x in v]
                                                for k, v in _children(s).items()})
            else:  # in memory (or read by code another process cannot share): written to the spill file
                key = f"t{len(spill)}"
                spill[key] = s.load().contiguous()
                out = SafetensorsStorage(path, key, s.type)
            done[id(s)] = out
            return out

        storages = {name: portable(p.storage) for name, p in graph.params.items() if p.storage is not None}
        if spill:
            save_file(spill, path)
        return cls(print_graph(graph, locs=True), storages, fields)

    @classmethod
    def of_model(cls, model: Any, spill_dir: str) -> PortableGraph:
        skip = ("graph", "stateless", "tokenizer_source", "device")  # a rank needs neither trace nor tokenizer
        return cls.of(model.graph, spill_dir, **{f.name: getattr(model, f.name) for f in dataclasses.fields(model)
                                                 if f.init and f.name not in skip})

    def graph(self) -> Any:
        """The graph again, its parameters mapped lazily."""
        from ..ir.parser import parse

        graph = parse(self.text)
        for name, storage in self.storages.items():
            graph.params[name].storage = storage
        return graph

    def model(self, device: str) -> Any:
        """The compiled model again (of_model), on `device`."""
        from ..api import CompiledModel

        return CompiledModel(self.graph(), device=device, **self.fields)


def _children(s: Storage) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(s):
        v = getattr(s, f.name)
        if isinstance(v, Storage) or (isinstance(v, (list, tuple)) and v and all(isinstance(x, Storage) for x in v)):
            out[f.name] = v
    return out


# -- ranks: this process and its workers --------------------------------------------------------------

def _device_of(device: str, rank: int) -> str:
    return f"cuda:{rank}" if device.startswith("cuda") else "cpu"


class Ranks:
    """This process as rank 0 and `world_size - 1` worker processes in one process group, with a
    watchdog on the workers. `call` runs a function on every rank; `step` hands a serving step
    to every worker's step handler."""

    def __init__(self, world_size: int, *, device: str = "cpu", collective_timeout_s: float = 300.0,
                 start_timeout_s: float = 600.0):
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"tensor_parallel_size must be a positive int, got {world_size!r}")
        if torch_dist.is_initialized():
            raise RuntimeError("a torch.distributed process group is already initialised in this process; kiln's "
                               "tensor-parallel runtime starts its own: destroy that one first")
        if device.startswith("cuda") and torch.cuda.device_count() < world_size:
            raise ValueError(f"tensor_parallel_size={world_size} needs {world_size} GPUs; this machine has "
                             f"{torch.cuda.device_count()}")
        self.world_size, self.device = world_size, device
        self.backend = "nccl" if device.startswith("cuda") else "gloo"
        self.state = RankState(0, world_size, _device_of(device, 0))
        self._lock = threading.RLock()
        self._failure: RankError | None = None
        self._worker_errors: dict[int, str] = {}
        self._died = threading.Event()
        self._closed = False
        timeout = datetime.timedelta(seconds=collective_timeout_s)
        store = torch_dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                                    timeout=datetime.timedelta(seconds=start_timeout_s))
        ctx = mp.get_context("spawn")
        self._procs, self._status, self._lifelines, self._commands = [], [], [], []
        for rank in range(1, world_size):
            status_parent, status_child = ctx.Pipe(duplex=False)
            life_child, life_parent = ctx.Pipe(duplex=False)
            commands_child, commands_parent = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_worker_main, name=f"kiln-tp-rank{rank}", daemon=True,
                               args=(rank, world_size, store.port, self.backend, _device_of(device, rank),
                                     collective_timeout_s, status_child, life_child, commands_child))
            proc.start()
            for child in (status_child, life_child, commands_child):
                child.close()
            self._procs.append(proc)
            self._status.append(status_parent)
            self._lifelines.append(life_parent)
            self._commands.append(commands_parent)
        _LIVE.add(self)
        try:
            self._await_workers(start_timeout_s)
            torch_dist.init_process_group(self.backend, store=store, rank=0, world_size=world_size, timeout=timeout)
            self.control = torch_dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        except BaseException:
            self._kill_workers()
            if torch_dist.is_initialized():
                with contextlib.suppress(Exception):
                    torch_dist.destroy_process_group()
            _LIVE.discard(self)
            raise
        self._watchdog = threading.Thread(target=self._watch, name="kiln-tp-watchdog", daemon=True)
        self._watchdog.start()

    def _await_workers(self, timeout: float) -> None:
        """Wait for every worker's hello: a worker that fails to start fails here, not in a collective."""
        waiting = dict(enumerate(self._status, start=1))
        deadline = time.monotonic() + timeout
        while waiting:
            sentinels = {self._procs[r - 1].sentinel: r for r in waiting}
            ready = mp.connection.wait([*waiting.values(), *sentinels], timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise RankError(f"ranks {sorted(waiting)} did not start within {timeout:.0f} s")
            for r, conn in list(waiting.items()):
                try:
                    msg = conn.recv() if conn in ready else None
                except EOFError:  # it died: its sentinel says how
                    continue
                if msg is not None and msg[0] == "hello":
                    del waiting[r]
                elif msg is not None and msg[0] == "error":
                    raise RankError(f"rank {r} failed while starting: {msg[1]}")
            for s, r in sentinels.items():
                if s in ready and r in waiting:
                    self._procs[r - 1].join(5.0)
                    raise RankError(f"rank {r} {_exit_reason(self._procs[r - 1].exitcode)} while starting (see its "
                                    f"output above). Worker processes import the main script: if one started this "
                                    f"job, guard its top level with `if __name__ == '__main__':`")

    # -- the watchdog -----------------------------------------------------------------------------

    def _watch(self) -> None:
        live = {p.sentinel: r for r, p in enumerate(self._procs, start=1)}
        conns = {c: r for r, c in enumerate(self._status, start=1)}
        while live and not self._closed:
            ready = mp.connection.wait([*live, *conns], timeout=0.5)
            for c in [c for c in ready if c in conns]:
                self._read_status(c, conns)
            for s in [s for s in ready if s in live]:
                r = live.pop(s)
                c = self._status[r - 1]
                if c in conns:
                    self._read_status(c, conns)
                if not self._closed:
                    self._procs[r - 1].join(1.0)
                    self._worker_errors.setdefault(r, _exit_reason(self._procs[r - 1].exitcode))
                    self._died.set()
                    self._abort_collectives()

    def _read_status(self, conn: Any, conns: dict) -> None:
        try:
            while conn.poll():
                msg = conn.recv()
                if msg[0] == "error":
                    self._worker_errors[conns[conn]] = msg[1]
                    self._died.set()
        except (EOFError, OSError):
            conns.pop(conn, None)

    def _abort_collectives(self) -> None:
        """NCCL does not notice a dead peer: abort its communicators so a waiting collective returns.
        (gloo fails at once when a peer's connection closes.)"""
        abort = getattr(torch_dist.distributed_c10d, "_abort_process_group", None)
        if self.backend == "nccl" and abort is not None:
            with contextlib.suppress(Exception):  # best effort: the error raised names the dead rank either way
                abort()

    # -- commands ---------------------------------------------------------------------------------

    def check(self) -> None:
        """Raise the job's failure, if a rank has failed or the job was closed."""
        if self._failure is not None:
            raise RankError(str(self._failure))
        if self._closed:
            raise RankError("the tensor-parallel job is closed")
        if self._died.is_set():
            raise self.fail(None)

    def fail(self, error: BaseException | None, grace_s: float = 5.0) -> RankError:
        """End the job after `error` on rank 0 (None: a worker died): the error to raise names the
        rank that failed first. A collective that failed because a peer died waits briefly for the
        watchdog to say which one."""
        with self._lock:
            if self._failure is None:
                if error is not None and not self._worker_errors:
                    self._died.wait(grace_s if _is_collective_error(error) else 0.0)
                if self._worker_errors:
                    r = min(self._worker_errors)
                    message = f"tensor-parallel rank {r} of {self.world_size} failed: {self._worker_errors[r]}"
                else:
                    message = f"tensor-parallel rank 0 of {self.world_size} failed: {type(error).__name__}: {error}"
                self._failure = RankError(message + "; the job has stopped (start a new one)")
                self._shutdown(graceful=False)
            return RankError(str(self._failure))

    def _send(self, header: Sequence[int], payload: torch.Tensor | None = None) -> None:
        """One message per worker down its command pipe (a step's latency is this plus the worker's wake-up;
        a collective over gloo cost several times more)."""
        h = torch.tensor(list(header) + [0] * (HEADER - len(header)), dtype=torch.int64)
        message = (h if payload is None else torch.cat([h, payload])).numpy().tobytes()
        for conn in self._commands:
            conn.send_bytes(message)

    def call(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """fn(state, *args) on every rank (fn importable by workers); returns every rank's result."""
        with self._lock:
            self.check()
            try:
                self._send([CALL])
                torch_dist.broadcast_object_list([(fn, args)], 0, group=self.control)
                try:
                    mine: tuple[bool, Any] = (True, fn(self.state, *args))
                except Exception as e:  # noqa: BLE001  (reported to the caller, as a worker's is)
                    mine = (False, f"{type(e).__name__}: {e}")
                    local = e
                results: list[Any] = [None] * self.world_size
                torch_dist.gather_object(mine, results, dst=0, group=self.control)
            except Exception as e:
                raise self.fail(e) from e
            failed = [(r, res[1]) for r, res in enumerate(results) if not res[0]]
            if failed:
                r, why = failed[0]
                raise RankError(f"rank {r} of {self.world_size}: {why}") from (local if r == 0 else None)
            return [res[1] for res in results]

    def step(self, header: Sequence[int], payload: torch.Tensor) -> None:
        """Hand one step to the workers (each runs its state's step handler)."""
        with self._lock:
            self.check()
            try:
                self._send([STEP, payload.numel(), *header], payload)
            except Exception as e:
                raise self.fail(e) from e

    # -- ending -----------------------------------------------------------------------------------

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the workers and leave the process group; safe to call twice."""
        if not self._lock.acquire(timeout=timeout_s):  # a step is stuck: end it from under it
            self._kill_workers()
            self._lock.acquire()
        try:
            self._shutdown(graceful=self._failure is None, timeout_s=timeout_s)
        finally:
            self._lock.release()

    def _shutdown(self, graceful: bool, timeout_s: float = 10.0) -> None:
        if self._closed:
            return
        self._closed = True
        if graceful:
            try:
                self._send([STOP])
            except Exception:  # noqa: BLE001  (a worker already gone: it is stopped below either way)
                graceful = False
        deadline = time.monotonic() + (timeout_s if graceful else 0.0)
        for p in self._procs:
            p.join(max(0.0, deadline - time.monotonic()))
        self._kill_workers()
        if torch_dist.is_initialized():
            if self._failure is None and not self._died.is_set():  # a dead peer can leave a kernel spinning: no sync
                with contextlib.suppress(Exception):  # a device already broken: leave the group all the same
                    self.state.release_device()
            # a failed job's error is raised now; its group is aborted behind it (that can take long)
            _leave_group(self.backend, timeout_s=30.0 if self._failure is None else None)
        for c in [*self._status, *self._lifelines, *self._commands]:
            c.close()
        _LIVE.discard(self)

    def _kill_workers(self) -> None:
        for p in self._procs:
            if p.is_alive():
                p.kill()
        for p in self._procs:
            p.join(5.0)

    @property
    def pids(self) -> list[int]:
        """The worker processes, rank 1 first."""
        return [p.pid for p in self._procs]


_LIVE: weakref.WeakSet[Ranks] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for ranks in list(_LIVE):
        ranks.close(timeout_s=5.0)


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        return f"was killed by {name}"
    return f"exited with code {code}"


def _is_collective_error(error: BaseException) -> bool:
    """A collective or a worker's pipe that failed, maybe because a peer died (gloo says so in a RuntimeError;
    a step sent to a worker that has just died breaks its pipe before the watchdog sees it go)."""
    return isinstance(error, (torch_dist.DistBackendError, BrokenPipeError, ConnectionResetError, EOFError)) or (
        isinstance(error, RuntimeError) and "gloo" in str(error))


def _worker_main(rank: int, world_size: int, port: int, backend: str, device: str, timeout_s: float,
                 status: Any, lifeline: Any, commands: Any) -> None:
    """A worker rank: join the group, then run rank 0's commands until STOP."""
    threading.Thread(target=_exit_with_parent, args=(lifeline,), daemon=True).start()
    try:
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        else:  # ranks share the CPU
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        status.send(("hello",))
        store = torch_dist.TCPStore("127.0.0.1", port, world_size, is_master=False,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        torch_dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                      timeout=datetime.timedelta(seconds=timeout_s))
        control = torch_dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        state = RankState(rank, world_size, device)
        while True:
            message = torch.frombuffer(bytearray(commands.recv_bytes()), dtype=torch.int64)
            header, payload = message[:HEADER], message[HEADER:]
            command = int(header[0])
            if command == STOP:
                break
            if command == CALL:
                box: list[Any] = [None]
                torch_dist.broadcast_object_list(box, 0, group=control)
                fn, args = box[0]
                try:
                    result: tuple[bool, Any] = (True, fn(state, *args))
                except Exception as e:  # noqa: BLE001  (sent to rank 0, which raises it)
                    result = (False, f"{type(e).__name__}: {e}")
                torch_dist.gather_object(result, None, dst=0, group=control)
            elif command == STEP:
                _run_step(state, header[2:].tolist(), payload)
        if backend == "nccl":  # exiting frees the communicators; rank 0 aborts its own once the peers are gone
            torch.cuda.synchronize()
            os._exit(0)
        _leave_group(backend)
    except BaseException as e:  # noqa: BLE001  (whatever ends a worker is reported to rank 0)
        try:
            status.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        finally:
            os._exit(1)


def _leave_group(backend: str, timeout_s: float | None = 30.0) -> None:
    """Leave the process group without waiting on peers. NCCL's communicators are aborted, once the
    workers have exited (destroying them is collective and hangs once a peer has gone; aborting them
    while a peer still holds them was seen to hang both); gloo's group is destroyed. timeout_s None:
    NCCL's abort runs on in the background."""
    abort = getattr(torch_dist.distributed_c10d, "_abort_process_group", None)

    def leave() -> None:
        with contextlib.suppress(Exception):  # a group already broken by a dead peer
            if backend == "nccl" and abort is not None:
                abort()
            if torch_dist.is_initialized():
                torch_dist.destroy_process_group()

    if backend != "nccl":
        return leave()
    worker = threading.Thread(target=leave, name="kiln-leave-nccl", daemon=True)
    worker.start()
    if timeout_s is None:
        return
    worker.join(timeout_s)
    if worker.is_alive():
        import warnings

        warnings.warn(f"kiln: NCCL did not shut down within {timeout_s:.0f} s; its process group is left open, "
                      f"so this process cannot start another tensor-parallel job (start a new process)")


def _exit_with_parent(lifeline: Any) -> None:
    try:
        lifeline.recv()
    except (EOFError, OSError):
        pass
    os._exit(3)  # rank 0's process is gone (or closed the lifeline): nobody will send another command


# -- serving --------------------------------------------------------------------------------------

def _load_shard(state: RankState, source: PortableGraph, tp: int) -> dict[str, Any]:
    """Build this rank's shard of the model and its executable, and read its weights now."""
    before = FILE_READS.bytes
    state.model = source.model(state.device).shard(tp, state.rank)
    state.executable = state.model.executable()
    if hasattr(state.executable, "load_params"):
        state.executable.load_params()
    graph = state.model.graph
    caches = graph.inputs[len(SERVING_INPUTS):]
    return {"bytes_read": FILE_READS.bytes - before,
            "weight_bytes": sum(p.type.nbytes() for p in graph.params.values()),
            "kv_heads": caches[0].type.shape[2] if caches else 0}


def _pack(inputs: Sequence[torch.Tensor], num_blocks: int) -> tuple[list[int], torch.Tensor]:
    shapes: list[int] = []
    for t in inputs:
        shapes += [*t.shape, *[-1] * (2 - t.dim())]
    payload = torch.cat([t.reshape(-1).to(device="cpu", dtype=torch.int64) for t in inputs])
    return [num_blocks, *shapes], payload


def _unpack(header: list[int], payload: torch.Tensor, types: Sequence[Any]) -> list[torch.Tensor]:
    out, at = [], 0
    for i, t in enumerate(types):
        shape = [d for d in header[1 + 2 * i: 3 + 2 * i] if d >= 0]
        n = math.prod(shape)
        out.append(payload[at: at + n].reshape(shape).to(t.dtype.torch))
        at += n
    return out


def _call(executable: Any, meta: list[torch.Tensor], caches: list[torch.Tensor], device: str,
          step: Any = None) -> list[torch.Tensor]:
    """Run an executable on host metadata, as it takes its inputs (see Engine._run)."""
    if getattr(executable, "host_inputs", False):
        from ..backends import StepInfo

        return executable(*meta, *caches, step=step or StepInfo.of(*meta[:6]))
    return executable(*[m.to(device) for m in meta], *caches)


def _pool(state: RankState, num_blocks: int) -> list[torch.Tensor]:
    """A worker's KV caches: rank 0 sized the pool, every rank keeps as many blocks of its own heads."""
    if not state.caches or state.caches[0].shape[0] != num_blocks:
        state.caches = [torch.empty((num_blocks, *c.type.shape[1:]), dtype=c.type.dtype.torch, device=state.device)
                        for c in state.model.graph.inputs[len(SERVING_INPUTS):]]
    return state.caches


def _capture_decode(state: RankState, num_blocks: int, max_batch_size: int, progress: bool) -> int:
    """Every rank captures the same decode graphs in the same order, so their collectives match."""
    caches = state.caches if state.rank == 0 else _pool(state, num_blocks)  # rank 0: the Engine's, lent for this call
    return state.executable.capture_decode(caches, max_batch_size, progress and state.rank == 0)


def _run_step(state: RankState, header: list[int], payload: torch.Tensor) -> None:
    graph = state.model.graph
    num_blocks = header[0]
    _pool(state, num_blocks)
    meta = _unpack(header, payload, [v.type for v in graph.inputs[: len(SERVING_INPUTS)]])
    fields = header[1 + 2 * len(SERVING_INPUTS):][:STEP_FIELDS + 1]
    if fields[STEP_FIELDS]:  # rank 0's tokens are still on its GPU: they come by broadcast, in stream order
        tokens = torch.empty(meta[0].shape, dtype=torch.int32, device=state.device)
        torch_dist.broadcast(tokens, src=0)
        meta[0] = tokens.to(meta[0].dtype)
    from ..backends import StepInfo

    _call(state.executable, meta, state.caches, state.device,
          StepInfo(*fields[:STEP_FIELDS]) if fields[0] > 0 else None)


class DistributedExecutable:
    """Rank 0's executable of a tensor-parallel model, called by the Engine like any backend's:
    it hands the step to every rank, then runs rank 0's shard on the Engine's caches."""

    host_inputs = True  # the metadata is broadcast from the host; the local executable moves it

    def __init__(self, ranks: Ranks):
        self.ranks = ranks
        self.local = ranks.state.executable
        self.device = ranks.state.device

    def check_health(self) -> None:
        """Raise `RankError` if a rank has failed (the Engine polls it while it waits on the device)."""
        self.ranks.check()

    def __call__(self, *inputs: torch.Tensor, step: Any = None) -> list[torch.Tensor]:
        n = len(SERVING_INPUTS)
        tokens = inputs[0]
        # Tokens the last step left on the GPU go to the workers by an NCCL broadcast queued behind that
        # step: no rank waits for them on the host, so every rank's next step is queued early.
        follow = tokens.is_cuda and self.ranks.backend == "nccl"
        meta, caches = [t.cpu() for t in inputs[1:n]], list(inputs[n:])
        meta.insert(0, torch.zeros(tokens.shape, dtype=tokens.dtype) if follow else tokens.cpu())
        header, payload = _pack(meta, caches[0].shape[0] if caches else 0)
        if step is None and getattr(self.local, "host_inputs", False):
            from ..backends import StepInfo

            step = StepInfo.of(*meta[:6])
        header += [*(dataclasses.astuple(step) if step is not None else (0,) * STEP_FIELDS), int(follow)]
        with self.ranks._lock:
            self.ranks.step(header, payload)
            try:
                if follow:
                    meta[0] = tokens.to(torch.int32)
                    torch_dist.broadcast(meta[0], src=0)
                return _call(self.local, meta, caches, self.device, step)
            except Exception as e:
                raise self.ranks.fail(e) from e

    @property
    def capture_decode(self) -> Callable[..., int]:
        """The decode graphs captured on every rank at once (rank 0 alone would run the captures'
        collectives without its peers); AttributeError where the local backend captures nothing."""
        if not hasattr(self.local, "capture_decode"):
            raise AttributeError("capture_decode")
        return self._capture_decode

    def _capture_decode(self, caches: Sequence[torch.Tensor], max_batch_size: int, progress: bool = True) -> int:
        state = self.ranks.state
        state.caches = list(caches)  # rank 0's share of the call reads the Engine's pool
        try:
            return self.ranks.call(_capture_decode, caches[0].shape[0], max_batch_size, progress)[0]
        finally:
            state.caches = []

    def __getattr__(self, name: str) -> Any:  # what the local backend's executable offers (stats, ...)
        if name in ("ranks", "local"):
            raise AttributeError(name)
        return getattr(self.local, name)


@dataclass
class TensorParallelModel:
    """A model served by `tensor_parallel_size` ranks: rank 0's serving graph (what the Engine
    sizes its KV pool from), its executable, and what each rank loaded."""

    graph: Any
    executable: DistributedExecutable
    ranks: Ranks
    loaded: list[dict[str, Any]]        # per rank: bytes_read (from weight files), weight_bytes, kv_heads
    spill_dir: str | None = None

    def __post_init__(self) -> None:  # the spilled weights go with the job, at close or at exit
        self._remove_spill = weakref.finalize(self, shutil.rmtree, self.spill_dir or "", ignore_errors=True)

    @property
    def tensor_parallel_size(self) -> int:
        return self.ranks.world_size

    def all_reduce_seconds(self, nbytes: int, iters: int = 32, dtype: torch.dtype = torch.bfloat16) -> float:
        """The time of one all-reduce of `nbytes` as the executables run it (their own route, replayed
        from a CUDA graph on GPUs; median over ranks): with the graph's all-reduce count it gives the
        collectives' share of a step."""
        times = self.ranks.call(_time_all_reduce, nbytes, iters, dtype)
        return sorted(times)[len(times) // 2]

    def memory(self) -> list[dict[str, float]]:
        """Per rank: GiB allocated now and at the peak on its device (zeros on CPU)."""
        return self.ranks.call(_memory)

    def close(self) -> None:
        """Stop every rank; the model cannot run after this."""
        self.ranks.close()
        self._remove_spill()

    def __enter__(self) -> TensorParallelModel:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _time_all_reduce(state: RankState, nbytes: int, iters: int, dtype: torch.dtype) -> float:
    x = torch.ones(max(1, nbytes // torch.empty((), dtype=dtype).element_size()), dtype=dtype, device=state.device)
    reduce = getattr(state.executable, "all_reduce", None)
    if reduce is None:
        def reduce(t: torch.Tensor) -> torch.Tensor:
            torch_dist.all_reduce(t)
            return t
    if not state.device.startswith("cuda"):
        reduce(x)
        start = time.perf_counter()
        for _ in range(iters):
            reduce(x)
        return (time.perf_counter() - start) / iters
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        reduce(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        for _ in range(iters):
            reduce(x)
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def _memory(state: RankState) -> dict[str, float]:
    if not state.device.startswith("cuda"):
        return {"allocated_gib": 0.0, "peak_gib": 0.0}
    return {"allocated_gib": torch.cuda.memory_allocated(state.device) / 2**30,
            "peak_gib": torch.cuda.max_memory_allocated(state.device) / 2**30}


def launch(model: Any, tensor_parallel_size: int, *, collective_timeout_s: float = 300.0,
           start_timeout_s: float = 600.0) -> TensorParallelModel:
    """Start `tensor_parallel_size` ranks for a compiled (unsharded) model: this process is rank 0,
    every rank builds and loads only its shard. `kiln bench --tp N` and `LLM(...,
    tensor_parallel_size=N)` start here."""
    spill_dir = tempfile.mkdtemp(prefix="kiln-tp-")
    ranks = None
    try:
        source = PortableGraph.of_model(model, spill_dir)
        ranks = Ranks(tensor_parallel_size, device=model.device, collective_timeout_s=collective_timeout_s,
                      start_timeout_s=start_timeout_s)
        loaded = ranks.call(_load_shard, source, tensor_parallel_size)
    except BaseException:
        if ranks is not None:
            ranks.close()
        shutil.rmtree(spill_dir, ignore_errors=True)
        raise
    return TensorParallelModel(ranks.state.model.graph, DistributedExecutable(ranks), ranks, loaded, spill_dir)


def run_shard(state: RankState, source: PortableGraph, inputs: Sequence[torch.Tensor],
               then: str) -> list[torch.Tensor]:
    from ..backends import reference
    from ..passes.tensor_parallel import shard

    graph = source.graph()
    shard(graph, tp=state.world_size, rank=state.rank)
    if then:
        from ..passes.manager import run_pipeline

        run_pipeline(graph, then)
    inputs = [_fit(t, v.type) for v, t in zip(graph.inputs, inputs)]
    return [t.cpu() for t in reference.run(graph, *inputs, device=state.device)]


def _fit(t: torch.Tensor, want: Any) -> torch.Tensor:
    shape = [d if isinstance(d, int) else n for d, n in zip(want.shape, t.shape)]
    return t if list(t.shape) == shape else torch.zeros(shape, dtype=t.dtype)


def run_sharded(ranks: Ranks, graph: Any, *inputs: torch.Tensor, then: str = "") -> list[list[torch.Tensor]]:
    """Shard `graph` for every rank (then run the pipeline `then`) and run each shard on the
    reference backend in its rank's process: every rank's outputs, to check a sharded graph's
    numerics. An input the sharding resized (a KV cache) is given as zeros of the rank's shape."""
    spill_dir = tempfile.mkdtemp(prefix="kiln-tp-")
    try:
        return ranks.call(run_shard, PortableGraph.of(graph, spill_dir), [t.cpu() for t in inputs], then)
    finally:
        shutil.rmtree(spill_dir, ignore_errors=True)
