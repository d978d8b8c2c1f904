"""The cuda backend: a serving graph run by kiln's Triton kernels, with decode steps replayed from
CUDA graphs.

- Lowering: `LOWERINGS` maps an op name to the kernel call that implements it; every other op runs
  its registry reference, which is already a torch op. A lowering may decline (return NotImplemented)
  for a form its kernel does not take (f32 matmuls stay in cuBLAS without TF32, a sliding window goes
  to the reference), so the table never changes what a graph computes.
- Buffers: ops run in graph order over a slot list; a slot is released after its last reader, so the
  caching allocator hands the same memory to later activations (`plan_slots`).
- Weights go to the device one tensor at a time, straight from safetensors (and derived weights such
  as merged q/k/v are computed there), never as a host copy of the whole model.
- Decode steps (one new token per sequence) are captured once per (batch bucket, context bucket) and
  replayed; a batch is padded to the next bucket with rows that write nothing (slot -1) and read one
  token. A step that prefills one prompt of up to PREFILL_BUCKETS[-1] tokens (a lone request's time to
  first token) is captured the same way, its tokens padded at the end. Other steps run eagerly.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..ir.graph import Graph
from ..ir.interpreter import load_param
from ..ir.storage import DerivedStorage, SafetensorsStorage, Storage, TensorStorage
from ..ir.types import DType
from ..passes.kv_cache import SERVING_INPUTS
from . import StepInfo
from .all_reduce import AllReduce
from .transfer import copy_into, to_device

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512)
"""Decode batch sizes captured as CUDA graphs (on first use); a batch pads to the next one."""
PREFILL_BUCKETS = (16, 32, 64, 128, 256, 512)
"""Prompt lengths of lone prefill steps captured as CUDA graphs; a prompt pads to the next one."""
MIN_CONTEXT_BUCKET = 256
"""Captured graphs are keyed by the step's longest context rounded up to a power of two from here."""


# -- the lowering table ---------------------------------------------------------------------------

@dataclass
class StepContext:
    """What lowerings may know about the step beyond its tensors (host-side, so no device sync)."""

    step: StepInfo
    rope_tables: "RopeTables"
    all_reduce: AllReduce


Lowering = Callable[..., Any]
LOWERINGS: dict[str, Lowering] = {}


def lowering(name: str) -> Callable[[Lowering], Lowering]:
    """Register `fn(ctx, *operands, **attrs)` as the kernel form of op `name`."""
    def register(fn: Lowering) -> Lowering:
        LOWERINGS[name] = fn
        return fn
    return register


def _half(t: torch.Tensor) -> bool:
    return t.dtype in (torch.bfloat16, torch.float16)


@lowering("llm.linear")
def _linear(ctx: StepContext, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> Any:
    if not (_half(x) and w.dtype == x.dtype):
        return NotImplemented  # f32 stays exact in cuBLAS; other forms have their own ops
    from ..kernels import linear

    y = linear(x if x.stride(-1) == 1 else x.contiguous(), w)
    return y if bias is None else y.add_(bias)


@lowering("quant.linear_fp8")
def _linear_fp8(ctx: StepContext, x, wq, x_scale, w_scale, *, out_dtype: DType) -> Any:
    from ..kernels import linear_fp8

    return linear_fp8(x if x.stride(-1) == 1 else x.contiguous(), wq, x_scale, w_scale, out_dtype.torch)


@lowering("quant.quantize_rows")
def _quantize_rows(ctx: StepContext, x, *, dtype: DType, eps: float, bound: float) -> Any:
    from ..kernels import quantize_rows
    from ..kernels.hardware import interpreting

    if dtype is not DType.f8e4m3 or interpreting():
        # int8 rows: the reference's ops. The interpreter's fp8 and bf16 casts do not round as a GPU does
        # (tests/kernels/test_quantize.py checks the kernel against Triton's own casts there)
        return NotImplemented

    return quantize_rows(x, dtype.torch, eps, bound)


@lowering("quant.quantize")
def _quantize(ctx: StepContext, x, scale, zero_point=None, *, dtype: DType, axis: int | None = None,
              group_size: int | None = None) -> Any:
    from ..ir.ops.quant import qmax
    from ..kernels import quantize_tensor
    from ..kernels.hardware import interpreting

    if dtype is not DType.f8e4m3 or zero_point is not None or scale.numel() != 1 or interpreting():
        return NotImplemented  # int8, per-channel and group scales: the reference's ops (as quantize_rows)
    return quantize_tensor(x, scale, dtype.torch, qmax(dtype))


@lowering("quant.linear_w8a16")
def _linear_w8a16(ctx: StepContext, x, wq, w_scale) -> Any:
    if not _half(x):
        return NotImplemented
    from ..kernels import linear_w8a16

    return linear_w8a16(x if x.stride(-1) == 1 else x.contiguous(), wq, w_scale)


@lowering("quant.linear_awq")
def _linear_awq(ctx: StepContext, x, qweight, qzeros, scales) -> Any:
    from ..kernels import AwqKPacked, linear_awq, linear_awq_kpacked

    x = x if x.stride(-1) == 1 else x.contiguous()
    if isinstance(qweight, AwqKPacked):  # repacked at load (_awq_kpacked): qzeros and scales live in it
        return linear_awq_kpacked(x, qweight)
    if not _half(x) or scales.dtype != x.dtype:
        return NotImplemented
    return linear_awq(x, qweight, qzeros, scales)


WEIGHT_FORMS: dict[str, Callable[..., list[Any] | None]] = {}
"""op name -> `fn(op, *weights)`: the op's weight operands (all but the first) in the form its kernel
streams best, made once at load; None keeps them as stored. The op's lowering then takes that form."""


def weight_form(name: str) -> Callable[[Callable[..., list[Any] | None]], Callable[..., list[Any] | None]]:
    """Register `fn(op, *weights) -> new weights or None` for op `name`."""
    def register(fn: Callable[..., list[Any] | None]) -> Callable[..., list[Any] | None]:
        WEIGHT_FORMS[name] = fn
        return fn
    return register


@weight_form("quant.linear_awq")
def _awq_kpacked(op: Any, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> list[Any] | None:
    """AutoAWQ's words run along N; the kernels stream words along K (kernels/gemm_woq.py's K-packed form)."""
    if op.operands[0].type.dtype.torch not in (torch.bfloat16, torch.float16) or scales.dtype != \
            op.operands[0].type.dtype.torch:
        return None  # the lowering declines these and the reference reads AutoAWQ's layout
    from ..kernels import awq_kpack

    return [awq_kpack(qweight, qzeros, scales), None, None]


@lowering("llm.rms_norm")
def _rms_norm(ctx: StepContext, x: torch.Tensor, w: torch.Tensor, *, eps: float) -> Any:
    from ..kernels import rms_norm

    return rms_norm(x.contiguous(), w, eps)


@lowering("llm.add_rms_norm")
def _add_rms_norm(ctx: StepContext, x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, *, eps: float) -> Any:
    from ..kernels import rms_norm

    return rms_norm(x.contiguous(), w, eps, residual=residual.contiguous())


@lowering("llm.silu_mul")
def _silu_mul(ctx: StepContext, gate: torch.Tensor, up: torch.Tensor) -> Any:
    """The kernel reads [gate | up] rows: the halves of the merged gate/up linear's output."""
    n = gate.shape[-1]
    if gate.stride() != up.stride() or up.data_ptr() != gate.data_ptr() + n * gate.element_size() \
            or gate.stride(-1) != 1 or gate.stride(-2) != 2 * n:
        return NotImplemented
    from ..kernels import silu_mul

    gate_up = torch.as_strided(gate, (*gate.shape[:-1], 2 * n), gate.stride())
    return silu_mul(gate_up.reshape(-1, 2 * n)).view(gate.shape)


@lowering("llm.paged_attention")
def _paged_attention(ctx: StepContext, q, k, v, k_cache, v_cache, slot_mapping, block_tables, context_lens,
                     query_start, positions=None, inv_freq=None, *, scale: float | None, window: int | None,
                     rope_scale: float = 1.0, k_scale: float | None = None, v_scale: float | None = None) -> Any:
    if window is not None or q.shape[-1] & (q.shape[-1] - 1):
        return NotImplemented  # sliding windows and head dims that are not powers of two: the reference
    from ..kernels import paged_decode_attention, paged_prefill_attention, rope_kv_write

    cos, sin = ctx.rope_tables.get(inv_freq, rope_scale, ctx.step.max_context_len, q.device, q.shape[-1])
    if positions is None:  # no rope fused in: rotate by position 0 (cos 1, sin 0), an exact copy
        positions = torch.zeros(slot_mapping.shape, dtype=torch.int32, device=slot_mapping.device)
    ks, vs = k_scale or 1.0, v_scale or 1.0
    q = rope_kv_write(*(t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v)), positions, cos, sin,
                      k_cache, v_cache, slot_mapping, ks, vs)  # strided heads (slices of q/k/v) are read in place
    step = ctx.step
    if step.num_tokens == step.num_seqs:
        return paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, step.max_context_len, scale,
                                      ks, vs)
    return paged_prefill_attention(q, k_cache, v_cache, block_tables, context_lens, query_start,
                                   step.max_query_len, scale, ks, vs)


@lowering("dist.all_reduce")
def _all_reduce(ctx: StepContext, x: torch.Tensor, *, reduce: str) -> Any:
    return ctx.all_reduce(x, reduce)


@dataclass
class RopeTables:
    """cos/sin per position for each (inv_freq, scale), grown to the longest context seen.

    A grown table does not free the one it replaces: graphs captured before read the old one by address
    (a freed table is memory the allocator hands to others, or gives back)."""

    tables: dict[tuple[int, float], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    replaced: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def get(self, inv_freq: torch.Tensor | None, scale: float, length: int, device: torch.device,
            head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (id(inv_freq), scale) if inv_freq is not None else (0, 1.0)
        have = self.tables.get(key)
        if have is None or have[0].shape[0] < length:
            from ..kernels import rope_cache

            size = max(MIN_CONTEXT_BUCKET, 1 << (max(length, 1) - 1).bit_length())
            freq = inv_freq if inv_freq is not None else torch.zeros(head_dim // 2, device=device)
            cos, sin = rope_cache(size, head_dim, 0.0, device=device, inv_freq=freq.to(device))
            if have is not None:
                self.replaced.append(have)
            have = self.tables[key] = ((cos * scale).contiguous(), (sin * scale).contiguous())
        return have


# -- weights --------------------------------------------------------------------------------------

def load_to_device(storage: Storage, device: torch.device) -> torch.Tensor:
    """A parameter's stored tensor made on `device`: safetensors read straight there, derived
    weights computed there from their sources."""
    if isinstance(storage, SafetensorsStorage) and device.type == "cuda":
        from safetensors import safe_open

        with safe_open(storage.path, framework="pt", device=str(device)) as f:
            return f.get_tensor(storage.key)
    if isinstance(storage, DerivedStorage):
        from ..ir.registry import get_op

        args = [load_to_device(s, device) for s in storage.inputs]
        return get_op(storage.op_name).run_reference(*args, **storage.attrs)[storage.result_index]
    if isinstance(storage, TensorStorage):
        return storage.tensor.to(device)
    return storage.load().to(device)


def load_weights(graph: Graph, device: torch.device, progress: bool = True) -> dict[str, torch.Tensor]:
    """Every parameter the graph reads, on the device, with a progress bar in bytes."""
    from tqdm.auto import tqdm

    used = {v.name: v for op in graph.ops for v in op.operands if v.is_param}
    used.update({v.name: v for v in graph.outputs if v.is_param})
    total = sum(v.type.nbytes({}) for v in used.values())
    out: dict[str, torch.Tensor] = {}
    by_storage: dict[int, torch.Tensor] = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"loading weights to {device}", disable=not progress,
              leave=False) as bar:
        for v in used.values():
            key = id(v.storage)
            if key not in by_storage:
                t = load_to_device(v.storage, device) if v.storage is not None else load_param(v, device)
                if v.type.dtype is DType.i4 and t.dtype == torch.uint8:
                    from ..ir.ops.quant import unpack_i4

                    t = unpack_i4(t)
                by_storage[key] = t.contiguous()  # the kernels index weights densely (a derived view may be strided)
            out[v.name] = by_storage[key]
            bar.update(v.type.nbytes({}))
    return out


# -- the program ----------------------------------------------------------------------------------

@dataclass
class _Instr:
    """One op bound to slots: its implementation, operand and result slots, and slots it frees."""

    fn: Callable[..., Any]
    reference: Callable[..., Any]
    args: tuple[int, ...]
    attrs: dict[str, Any]
    results: tuple[int, ...]
    free: tuple[int, ...]
    text: str


def _reference(opdef) -> Callable[..., Any]:
    return lambda ctx, *args, **attrs: opdef.run_reference(*args, **attrs)


def _symbolic(opdef: Any, attrs: dict[str, Any]) -> bool:
    """Whether a shape or dim attribute names a symbolic dim (known only per step)."""
    return any(isinstance(a, str) or isinstance(a, (tuple, list)) and any(isinstance(d, str) for d in a)
               for k, a in attrs.items() if opdef.attrs[k].kind.name.split(" ")[0] in ("Shape", "Dim"))


def _symbolic_reshape(attrs: dict[str, Any]) -> dict[str, Any] | None:
    """A reshape whose one symbolic dim can be left to torch (-1); None if it has more."""
    shape = attrs["shape"]
    symbolic = [i for i, d in enumerate(shape) if isinstance(d, str)]
    if len(symbolic) != 1 or -1 in shape:
        return None
    return {**attrs, "shape": tuple(-1 if isinstance(d, str) else d for d in shape)}


def plan_slots(graph: Graph) -> tuple[dict[int, int], list[tuple[int, ...]]]:
    """Value -> slot, and per op the slots whose last reader it is (released right after it)."""
    slots: dict[int, int] = {}
    for v in [*graph.inputs, *graph.params.values()]:
        slots[id(v)] = len(slots)
    for op in graph.ops:
        for r in op.results:
            slots[id(r)] = len(slots)
    last: dict[int, int] = {}
    for i, op in enumerate(graph.ops):
        for v in op.operands:
            last[id(v)] = i
    keep = {id(v) for v in graph.outputs} | {id(v) for v in graph.params.values()} | {id(v) for v in graph.inputs}
    frees: list[list[int]] = [[] for _ in graph.ops]
    for vid, i in last.items():
        if vid not in keep:
            frees[i].append(slots[vid])
    for i, op in enumerate(graph.ops):  # results nobody reads die at once
        frees[i].extend(slots[id(r)] for r in op.results if not graph.users(r) and id(r) not in keep)
    return slots, [tuple(f) for f in frees]


def _tensors(w: Any) -> list[torch.Tensor]:
    """The tensors a weight is held in: itself, or a kernel form's fields (kernels.AwqKPacked)."""
    if isinstance(w, torch.Tensor):
        return [w]
    if dataclasses.is_dataclass(w):
        return [v for f in dataclasses.fields(w) if isinstance(v := getattr(w, f.name), torch.Tensor)]
    return []


class CudaExecutable:
    """A serving graph bound to kernels and device weights; call it as the engine calls any backend.

    It takes its metadata inputs on the host (`host_inputs`) and the step's shape (`step=`) so that
    nothing waits on the device to learn the batch; decode steps replay CUDA graphs."""

    host_inputs = True

    def __init__(self, graph: Graph, device: torch.device, *, cuda_graphs: bool = True, progress: bool = True):
        names = [v.name for v in graph.inputs]
        if names[: len(SERVING_INPUTS)] != list(SERVING_INPUTS):
            raise ValueError("the cuda backend runs serving graphs (compile with the 'cuda' pipeline)")
        self.graph, self.device = graph, device
        self.params = load_weights(graph, device, progress)
        slots, frees = plan_slots(graph)
        self.num_slots = len(slots)
        self.input_slots = [slots[id(v)] for v in graph.inputs]
        self.output_slots = [slots[id(v)] for v in graph.outputs]
        self.template: list[Any] = [None] * len(slots)
        for v in graph.params.values():
            if v.name in self.params:
                self.template[slots[id(v)]] = self.params[v.name]
        self.program: list[_Instr] = []
        constant = {id(v) for v in graph.params.values()}
        for op, free in zip(graph.ops, frees):
            if (op.opdef.is_pure and all(id(v) in constant for v in op.operands)
                    and (op.operands or not _symbolic(op.opdef, op.attrs))):
                # weights-only arithmetic (a cast of rope frequencies, a reshape) and splat constants: computed
                # once, here, on the device (a host scalar read in a step would be a copy CUDA graphs refuse)
                outs = op.opdef.run_reference(*(self.template[slots[id(v)]] for v in op.operands), **op.attrs)
                for r, t in zip(op.results, outs):
                    self.template[slots[id(r)]] = t.to(device) if isinstance(t, torch.Tensor) else t
                    constant.add(id(r))
                continue
            attrs = dict(op.attrs)
            if op.name == "core.reshape" and any(isinstance(d, str) for d in attrs["shape"]):
                attrs = _symbolic_reshape(attrs) or attrs
            if _symbolic(op.opdef, attrs):
                raise ValueError(f"the cuda backend cannot bind the symbolic attributes of {op.name} ({attrs})")
            ref = _reference(op.opdef)
            self.program.append(_Instr(LOWERINGS.get(op.name, ref), ref, tuple(slots[id(v)] for v in op.operands),
                                       attrs, tuple(slots[id(r)] for r in op.results), free, op.name))
        self._reform_weights(graph, slots)
        self.rope_tables = RopeTables()
        has_collectives = any(op.name == "dist.all_reduce" for op in graph.ops)
        self.all_reduce = AllReduce.for_job(device) if has_collectives else AllReduce(1)
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        self.graphs: dict[StepInfo, _CapturedStep] = {}
        self._graph_pool = None
        self._graph_caches: tuple = ()  # the KV pool the graphs were captured on (addresses, shapes, dtypes)
        self.stats = {"eager_steps": 0, "graph_steps": 0, "captures": 0, "capture_s": 0.0, "pools": 0}
        self.released = False

    @property
    def weight_bytes(self) -> int:
        """Device bytes of the weights in their kernels' forms (and of what was computed from them at load); a
        tensor two parameters share counts once."""
        tensors = [t for w in self.template for t in _tensors(w)]
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())

    def _reform_weights(self, graph: Graph, slots: dict[int, int]) -> None:
        """Weights in their kernels' forms (WEIGHT_FORMS); the stored forms are let go."""
        for op in graph.ops:
            fn = WEIGHT_FORMS.get(op.name)
            weights = op.operands[1:]
            if fn is None or not weights or not all(v.is_param and v.name in self.params for v in weights):
                continue
            new = fn(op, *(self.params[v.name] for v in weights))
            for v, t in zip(weights, new or ()):
                self.template[slots[id(v)]] = t
                if t is None:
                    del self.params[v.name]
                else:
                    self.params[v.name] = t

    # -- running ----------------------------------------------------------------------------------

    def run_program(self, inputs: Sequence[torch.Tensor], step: StepInfo) -> list[torch.Tensor]:
        ctx = StepContext(step, self.rope_tables, self.all_reduce)
        env = list(self.template)
        for s, t in zip(self.input_slots, inputs):
            env[s] = t
        with torch.no_grad():
            for ins in self.program:
                args = [env[a] for a in ins.args]
                out = ins.fn(ctx, *args, **ins.attrs)
                if out is NotImplemented:
                    out = ins.reference(ctx, *args, **ins.attrs)
                if isinstance(out, tuple):
                    for s, t in zip(ins.results, out):
                        env[s] = t
                else:
                    env[ins.results[0]] = out
                for s in ins.free:
                    env[s] = None
        return [env[s] for s in self.output_slots]

    def __call__(self, *inputs: torch.Tensor, step: StepInfo | None = None) -> list[torch.Tensor]:
        if self.released:
            raise RuntimeError("this executable was released (its tensor-parallel job was closed): compile again")
        meta, caches = inputs[: len(SERVING_INPUTS)], inputs[len(SERVING_INPUTS):]
        step = step or StepInfo.of(*meta[:6])
        shape = self._captured_shape(step, meta) if self.cuda_graphs else None
        if shape is not None:
            captured = self._captured(shape, caches)
            if captured is not None:
                self.stats["graph_steps"] += 1
                return [captured.replay(meta, step)]
        self.stats["eager_steps"] += 1
        meta = [to_device(t, self.device) for t in meta]
        return self.run_program([*meta, *caches], step)

    def capture_decode(self, caches: Sequence[torch.Tensor], max_batch_size: int, progress: bool = True) -> int:
        """Capture the decode graphs of every batch bucket up to max_batch_size, at the shortest context
        bucket, before serving: a bucket first met under load would otherwise stall that step by its
        capture (two eager runs, ~0.1 s at 512 rows of the 8B shape). Longer contexts capture on first use."""
        if not self.cuda_graphs:
            return 0
        from tqdm.auto import tqdm

        top = next((b for b in BATCH_BUCKETS if b >= max_batch_size), BATCH_BUCKETS[-1])
        shapes = [StepInfo(b, b, 1, MIN_CONTEXT_BUCKET) for b in BATCH_BUCKETS if b <= top]
        for shape in tqdm(shapes, desc="capturing decode graphs", unit="graph", disable=not progress, leave=False):
            if self._captured(shape, caches) is None:
                break  # capture failed (said once); steps run eagerly
        return len(self.graphs)

    def release(self) -> None:
        """Drop the captured graphs and the all-reduce's buffers (they hold the process group's
        communicators) before the group is left; the executable runs nothing after this."""
        self.graphs.clear()
        self._graph_pool = None
        self.all_reduce = None
        self.released = True

    # -- CUDA graphs ------------------------------------------------------------------------------

    def _captured_shape(self, step: StepInfo, meta: Sequence[torch.Tensor]) -> "StepInfo | None":
        """The padded step a captured graph runs for this one, or None to run it eagerly."""
        if step.is_decode and step.num_seqs <= BATCH_BUCKETS[-1]:
            batch = next(b for b in BATCH_BUCKETS if b >= step.num_seqs)
            return StepInfo(batch, batch, 1, _context_bucket(step.max_context_len))
        if step.num_seqs == 1 and step.num_tokens <= PREFILL_BUCKETS[-1] and len(meta[6]) == 1:
            tokens = next(b for b in PREFILL_BUCKETS if b >= step.num_tokens)
            return StepInfo(1, tokens, tokens, _context_bucket(step.max_context_len))
        return None

    def _captured(self, shape: StepInfo, caches: Sequence[torch.Tensor]) -> "_CapturedStep | None":
        pool = tuple((c.data_ptr(), tuple(c.shape), c.dtype) for c in caches)
        if pool != self._graph_caches:  # a graph reads and writes the pool it was captured on: a new pool starts over
            failed = self.graphs.get(("failed",))  # type: ignore[call-overload]
            self.graphs = {} if failed is None else {("failed",): failed}  # type: ignore[dict-item]
            self._graph_pool = None  # the dropped graphs' memory pool goes with them
            self._graph_caches = pool
            self.stats["pools"] += 1
        captured = self.graphs.get(shape)
        if captured is None:
            if self.graphs.get(("failed",)) is not None:
                return None
            t0 = time.perf_counter()
            try:
                captured = _CapturedStep.capture(self, shape, caches)
            except Exception as e:  # an op that cannot be captured (a host sync): stay eager, say why once
                import warnings

                warnings.warn(f"kiln cuda backend: steps run eagerly, CUDA-graph capture failed: "
                              f"{type(e).__name__}: {e}")
                self.graphs[("failed",)] = e  # type: ignore[index]
                return None
            self.graphs[shape] = captured
            self.stats["captures"] += 1
            self.stats["capture_s"] += time.perf_counter() - t0
        return captured


def _context_bucket(length: int) -> int:
    return max(MIN_CONTEXT_BUCKET, 1 << (length - 1).bit_length())


@dataclass(frozen=True)
class _MetaLayout:
    """Where a captured step's metadata inputs lie in one byte buffer (8-byte ones first, so every view is
    aligned): a step fills a pinned copy on the host and moves it in one copy, not one per input."""

    fields: tuple[tuple[int, torch.dtype, tuple[int, ...], int], ...]  # (input index, dtype, shape, byte offset)
    nbytes: int

    @classmethod
    def of(cls, specs: Sequence[tuple[int, torch.dtype, tuple[int, ...]]]) -> "_MetaLayout":
        fields, at = [], 0
        for index, dtype, shape in sorted(specs, key=lambda f: -f[1].itemsize):
            fields.append((index, dtype, shape, at))
            at += math.prod(shape) * dtype.itemsize
        return cls(tuple(fields), at)

    def views(self, buffer: torch.Tensor) -> dict[int, torch.Tensor]:
        return {i: buffer[at: at + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
                for i, dtype, shape, at in self.fields}


@dataclass
class _CapturedStep:
    """One captured step shape: the static metadata buffers it reads, the logits buffer it writes.

    Padding rows write nothing (slot -1). A padded decode row is a sequence of its own that reads one
    token of block 0; a prefill's padding tokens follow the prompt's and belong to no sequence (the
    prompt's query range ends before them), so attention neither reads them nor writes their rows, and
    what the token-wise ops compute for them stays in their own rows."""

    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]   # tokens, positions, slots, block_tables, context_lens, query_start, logits_indices
    layout: _MetaLayout          # of inputs[1:], which are views of `packed`
    packed: torch.Tensor
    logits: torch.Tensor
    shape: StepInfo

    @classmethod
    def capture(cls, exe: CudaExecutable, shape: StepInfo, caches: Sequence[torch.Tensor]) -> "_CapturedStep":
        dev = exe.device
        n, t = shape.num_seqs, shape.num_tokens
        block = caches[0].shape[1]
        rows = n if shape.is_decode else 1
        i32, i64 = torch.int32, torch.int64
        layout = _MetaLayout.of([(1, i32, (t,)), (2, i64, (t,)), (3, i32, (n, -(-shape.max_context_len // block))),
                                 (4, i32, (rows,)), (5, i32, (rows + 1,)), (6, i64, (rows,))])
        host = torch.empty(layout.nbytes, dtype=torch.uint8)
        cls._fill(layout.views(host), shape, shape, None)  # a valid step of the bucket's shape for the warm-up runs
        packed = host.to(dev)
        views = layout.views(packed)
        inputs = [torch.zeros(t, dtype=i32, device=dev), *(views[i] for i in range(1, 7))]
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile every kernel for these shapes; rope tables grow here, not in capture
                exe.run_program([*inputs, *caches], shape)
        torch.cuda.current_stream(dev).wait_stream(stream)
        if exe._graph_pool is None:
            exe._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: NCCL's watchdog thread may query events while this thread captures
        with torch.cuda.graph(graph, pool=exe._graph_pool, capture_error_mode="thread_local"):
            logits = exe.run_program([*inputs, *caches], shape)[0]
        return cls(graph, inputs, layout, packed, logits, shape)

    @staticmethod
    def _fill(h: dict[int, torch.Tensor], shape: StepInfo, step: StepInfo, meta: Sequence[torch.Tensor] | None) -> None:
        """The bucket's metadata for `step` (None: an empty one) into the host views `h`: padding tokens
        write nowhere (slot -1), padded decode rows read one token of block 0."""
        n, t = step.num_seqs, step.num_tokens
        positions, slots, tables, lens, starts, rows = (h[i].numpy() for i in range(1, 7))
        positions[:], slots[:], tables[:] = 0, -1, 0
        if meta is not None:
            positions[:t], slots[:t] = meta[1].numpy(), meta[2].numpy()
            width = min(meta[3].shape[1], tables.shape[1])  # columns past the context bucket are never read
            tables[:n, :width] = meta[3].numpy()[:, :width]
        if shape.is_decode:
            lens[:] = 1
            if meta is not None:
                lens[:n] = meta[4].numpy()
            starts[:] = np.arange(len(starts))
            rows[:] = np.arange(len(rows))
        else:  # one prompt of t tokens: its query range and its last token's logits row
            lens[:] = meta[4].numpy() if meta is not None else shape.num_tokens
            starts[:] = (0, t)
            rows[:] = t - 1

    def replay(self, meta: Sequence[torch.Tensor], step: StepInfo) -> torch.Tensor:
        host = torch.empty(self.layout.nbytes, dtype=torch.uint8, pin_memory=True)
        # the engine's metadata is on the host already; the tokens may be on the GPU (the last step's samples)
        self._fill(self.layout.views(host), self.shape, step, [meta[0], *(m.cpu() for m in meta[1:])])
        copy_into(self.inputs[0][: step.num_tokens], meta[0])
        copy_into(self.packed, host)
        self.graph.replay()
        return self.logits[: step.num_seqs]


def compile(graph: Graph, *, device: str | torch.device = "cuda", cuda_graphs: bool = True,
            progress: bool = True) -> CudaExecutable:
    """Bind a serving graph to kernels on `device` (a CUDA device; "cpu" runs the same lowering
    under the Triton interpreter, for tests)."""
    return CudaExecutable(graph, torch.device(device), cuda_graphs=cuda_graphs, progress=progress)


__all__ = ["BATCH_BUCKETS", "CudaExecutable", "LOWERINGS", "compile", "load_weights", "lowering", "plan_slots"]
