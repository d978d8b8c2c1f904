"""The onnx backend: any graph, at any point of a pipeline, as an ONNX model in standard ops, and
that model run by onnxruntime as a compile target.

    export(graph, "model.onnx")                          # checked with onnx.checker (full_check)
    exe = compile(serving_graph)                         # exe(*inputs, *caches) -> [logits]

- Lowering: `LOWERINGS` maps an op name to a function that emits the ONNX nodes computing it,
  following the op's torch reference (the same dtypes and rounding order: softmax in f32,
  Q/DQ computed in f32). A lowering may decline (return NotImplemented) and a table layered on
  top (`backends.trt`) may replace any entry; no op is special-cased anywhere else.
- Symbolic dims become dim_params of the graph's inputs and outputs (`T`, `B`, `B+1`); inside the
  graph a dim is read off the input that binds it (`Shape(tokens)[0]`), so one model serves
  every token count. A reshape with one symbolic dim writes it as -1, a static shape for TensorRT.
- Weights are initializers, stored in an external data file when the model would come near
  protobuf's 2 GB limit (`external_data`); each is read, written and dropped one at a time, and
  only those the exported nodes still use are written.
- Quantization follows ONNX/TensorRT explicit quantization: `QuantizeLinear`/`DequantizeLinear`
  (opset 21), FP8 e4m3 per tensor, INT8 per channel (`axis`), INT4 weights in blocks
  (`block_size`); INT4 initializers are packed two per byte, low nibble first.
- A serving graph's KV pool is an input and an output: `llm.paged_attention` is lowered to a
  ScatterND of the step's K/V into each layer's cache, a Gather of each token's history through
  its sequence's block table, and a masked softmax; the updated caches are outputs named
  `<cache>.out`, which the executable copies back into the runtime's tensors.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import sympy
import torch
from onnx import TensorProto
from onnx_graphsurgeon.ir.tensor import LazyValues
from tqdm.auto import tqdm

from ..ir.graph import Graph, Op, Value
from ..ir.interpreter import load_param
from ..ir.ops.quant import pack_i4
from ..ir.types import Dim, DType, TensorType, _to_expr

__all__ = ["DEFAULT_OPSET", "EXTERNAL_DATA_BYTES", "LOWERINGS", "ExportedModel", "OnnxExecutable",
           "OnnxExportError", "WeightWriter", "compile", "export", "lowering", "state_output_name"]

DEFAULT_OPSET = 21
"""QuantizeLinear/DequantizeLinear with block_size and INT4 need 21; TensorRT 10 parses it."""
IR_VERSION = 10
"""The ONNX IR version of opset 21, which onnxruntime and TensorRT's parser both read."""
EXTERNAL_DATA_BYTES = 1 << 30
"""Weights above this many bytes in all go to an external data file (protobuf stops at 2 GB)."""
INLINE_BYTES = 1024
"""In an external-data model, initializers smaller than this stay inside the model file."""
_INT64_MAX = (1 << 63) - 1

ONNX_DTYPES = {
    DType.f32: TensorProto.FLOAT, DType.f16: TensorProto.FLOAT16, DType.bf16: TensorProto.BFLOAT16,
    DType.f8e4m3: TensorProto.FLOAT8E4M3FN, DType.f8e5m2: TensorProto.FLOAT8E5M2, DType.i64: TensorProto.INT64,
    DType.i32: TensorProto.INT32, DType.i8: TensorProto.INT8, DType.u8: TensorProto.UINT8,
    DType.i4: TensorProto.INT4, DType.bool: TensorProto.BOOL,
}
"""IR element type -> ONNX TensorProto data type."""


class OnnxExportError(ValueError):
    """A graph kiln cannot write as ONNX; the message names the op and what to do."""


def state_output_name(input_name: str) -> str:
    """The output that carries an input updated in place (a KV cache) after the step."""
    return f"{input_name}.out"


# -- tensors as TensorProtos ----------------------------------------------------------------------

def _raw_bytes(tensor: torch.Tensor, dtype: DType) -> bytes:
    """The little-endian bytes ONNX stores for `tensor` as `dtype` (INT4: two per byte, low nibble first)."""
    t = tensor.detach().cpu().contiguous()
    if dtype is DType.i4:
        flat = t.reshape(-1).to(torch.int8)
        if flat.numel() % 2:
            flat = torch.cat([flat, flat.new_zeros(1)])
        return pack_i4(flat).numpy().tobytes()
    if t.dtype != dtype.torch:
        t = t.to(dtype.torch)
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def tensor_proto(name: str, tensor: torch.Tensor, dtype: DType) -> TensorProto:
    """An initializer holding `tensor` (any IR dtype, bf16/fp8/int4 included) in the model file."""
    proto = TensorProto(name=name, data_type=ONNX_DTYPES[dtype], dims=list(tensor.shape))
    proto.raw_data = _raw_bytes(tensor, dtype)
    return proto


@dataclass
class WeightWriter:
    """Writes initializers: inside the model, or appended to one external data file next to it
    (aligned, one tensor in memory at a time). Several models in one folder may share it; a
    tensor written once under a name is not written again."""

    folder: Path
    data_file: str | None = None        # None: every initializer inside the model
    progress: bool = True
    _written: dict[str, tuple[int, int]] = field(default_factory=dict)
    _bar: Any = None

    def proto(self, name: str, load: Callable[[], torch.Tensor], dtype: DType, shape: Sequence[int],
              nbytes: int) -> TensorProto:
        if self.data_file is None or nbytes < INLINE_BYTES:
            return tensor_proto(name, load(), dtype)
        if name not in self._written:
            raw = _raw_bytes(load(), dtype)
            path = self.folder / self.data_file
            with open(path, "ab") as f:
                offset = f.seek(0, os.SEEK_END)
                pad = -offset % 4096
                f.write(b"\0" * pad)
                f.write(raw)
            self._written[name] = (offset + pad, len(raw))
        offset, length = self._written[name]
        t = TensorProto(name=name, data_type=ONNX_DTYPES[dtype], dims=list(shape), data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.data_file), ("offset", str(offset)), ("length", str(length))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        return t


# -- the emitter ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ParamUse:
    """A parameter as an exported initializer: its value, and a transform applied on write."""

    value: Value
    transform: str | None = None          # None, "T" (2-D transpose), or a key of PARAM_TRANSFORMS
    dtype: DType | None = None            # the initializer's dtype, if the transform changes it
    shape: tuple[int, ...] | None = None  # likewise for the shape


PARAM_TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "T": lambda t: t.transpose(0, 1).contiguous(),
}
"""Named weight layouts a lowering may ask for; backends add theirs (the AWQ repacking)."""


Lowering = Callable[..., Any]
LOWERINGS: dict[str, Lowering] = {}
"""IR op name -> fn(emitter, op, *operand_tensors) returning the result tensor(s) or NotImplemented."""


def lowering(*names: str) -> Callable[[Lowering], Lowering]:
    """Register `fn` as the standard-op lowering of the ops `names`."""
    def register(fn: Lowering) -> Lowering:
        for name in names:
            LOWERINGS[name] = fn
        return fn
    return register


class Emitter:
    """Lowers one IR graph into an onnx-graphsurgeon graph, op by op through a lowering table."""

    def __init__(self, graph: Graph, tables: Sequence[Mapping[str, Lowering]], *, opset: int = DEFAULT_OPSET,
                 domains: Sequence[tuple[str, int]] = (), params: Mapping[str, torch.Tensor] | None = None):
        self.ir = graph
        self.tables = tables
        self.opset_imports = [onnx.helper.make_opsetid("", opset), *(onnx.helper.make_opsetid(d, v) for d, v in domains)]
        self.g = gs.Graph(name=graph.name, opset=opset, producer_name="kiln", import_domains=self.opset_imports)
        self.tensors: dict[int, gs.Tensor] = {}
        self.param_uses: dict[str, ParamUse] = {}
        self.param_data = dict(params or {})
        self.notes: list[str] = []
        self._placeholders: dict[str, gs.Variable] = {}
        self._consts: dict[Any, gs.Constant] = {}
        self._dims: dict[Dim, gs.Tensor] = {}
        self._created: set[int] = set()
        self._hint = "x"
        self._counter = itertools.count()
        self.op: Op | None = None
        self.binding: dict[str, tuple[gs.Variable, int]] = {}
        for v in graph.inputs:
            var = gs.Variable(v.name, dtype=ONNX_DTYPES[v.type.dtype], shape=[d for d in v.type.shape])
            self.g.inputs.append(var)
            self.tensors[id(v)] = var
            for axis, d in enumerate(v.type.shape):
                if isinstance(d, str) and d.isidentifier():
                    self.binding.setdefault(d, (var, axis))
        self.inputs = {id(v): self.tensors[id(v)] for v in graph.inputs}

    # -- values ------------------------------------------------------------------------------------

    def value(self, v: Value) -> gs.Tensor:
        """The tensor of an IR value (parameters become initializers once the graph is final)."""
        if id(v) not in self.tensors:
            if not v.is_param:
                raise OnnxExportError(f"{v.ref} is used before it is defined (verify the graph)")
            self.tensors[id(v)] = self.param(v)
        return self.tensors[id(v)]

    def param(self, v: Value, transform: str | None = None, *, dtype: DType | None = None,
              shape: Sequence[int] | None = None) -> gs.Variable:
        """A parameter as an initializer, optionally written in another layout (`transform`)."""
        name = v.name if transform is None else f"{v.name}.{transform}"
        if name not in self._placeholders:
            if v.storage is None and v.name not in self.param_data:
                raise OnnxExportError(f"parameter {v.ref} has no data to export: load the model's weights "
                                      f"or pass params={{'{v.name}': tensor}}")
            use = ParamUse(v, transform, dtype, tuple(shape) if shape is not None else None)
            self.param_uses[name] = use
            out_dtype = dtype or v.type.dtype
            self._placeholders[name] = gs.Variable(name, dtype=ONNX_DTYPES[out_dtype])
        return self._placeholders[name]

    def load_param(self, use: ParamUse) -> torch.Tensor:
        v = use.value
        t = self.param_data[v.name] if v.name in self.param_data else load_param(v, "cpu")
        return t if use.transform is None else PARAM_TRANSFORMS[use.transform](t)

    def only_linear_weight(self, v: Value) -> bool:
        """Whether every use of `v` is as the weight of an llm.linear (it may then be stored transposed)."""
        users = self.ir.users(v)
        return bool(users) and v not in self.ir.outputs and all(
            u.name == "llm.linear" and u.operands[1] is v and v not in (u.operands[0], *u.operands[2:]) for u in users)

    # -- nodes and constants -----------------------------------------------------------------------

    def fresh(self, hint: str | None = None) -> str:
        return f"{hint or self._hint}~{next(self._counter)}"

    def node(self, op_type: str, *inputs: gs.Tensor | None, outputs: int = 1, domain: str | None = None,
             dtype: DType | None = None, **attrs: Any) -> Any:
        """Add one node; returns its output (or the list of its outputs when outputs > 1)."""
        outs = [gs.Variable(self.fresh(), dtype=ONNX_DTYPES[dtype] if dtype is not None and i == 0 else None)
                for i in range(outputs)]
        ins = [gs.Variable.empty() if t is None else t for t in inputs]
        while ins and isinstance(ins[-1], gs.Variable) and ins[-1].name == "":
            ins.pop()  # trailing optional inputs are left out
        attrs = {k: v for k, v in attrs.items() if v is not None}
        # gs.Node wires the tensors both ways; Graph.layer would rescan every tensor for each node
        self.g.nodes.append(gs.Node(op_type, outs[0].name, attrs, ins, outs, domain=domain))
        self._created.update(id(o) for o in outs)
        return outs[0] if outputs == 1 else outs

    def const(self, value: Any, dtype: DType, shape: Sequence[int] | None = None) -> gs.Constant:
        """A small constant initializer: a scalar (shape None), a splat or a list of values."""
        values = torch.tensor(value, dtype=torch.float64 if dtype.is_float else torch.int64)
        if shape is not None:
            values = values.expand(tuple(shape)) if values.dim() == 0 else values.reshape(tuple(shape))
        key = (dtype, tuple(values.shape), tuple(values.reshape(-1).tolist()))
        if key not in self._consts:
            name = f"const~{len(self._consts)}"
            t = values.to(dtype.torch) if dtype is not DType.i4 else values.to(torch.int8)
            self._consts[key] = gs.Constant(name, LazyValues(tensor_proto(name, t, dtype)))
        return self._consts[key]

    def i64(self, values: Sequence[int]) -> gs.Constant:
        return self.const(list(values), DType.i64, (len(values),))

    def cast(self, x: gs.Tensor, src: DType, dst: DType) -> gs.Tensor:
        return x if src is dst else self.node("Cast", x, to=ONNX_DTYPES[dst], dtype=dst)

    # -- symbolic dims -----------------------------------------------------------------------------

    def dim(self, d: Dim) -> gs.Tensor:
        """A dim as an int64 tensor of shape [1], computed from the inputs that bind its symbols."""
        if isinstance(d, int):
            return self.i64([d])
        if d not in self._dims:
            if d in self.binding:
                var, axis = self.binding[d]
                self._dims[d] = self.node("Shape", var, start=axis, end=axis + 1, dtype=DType.i64)
            else:
                self._dims[d] = self._expr(_to_expr(d), d)
        return self._dims[d]

    def _expr(self, e: sympy.Expr, text: str) -> gs.Tensor:
        if e.is_Integer:
            return self.i64([int(e)])
        if e.is_Symbol:
            if e.name not in self.binding:
                raise OnnxExportError(f"symbolic dim {e.name} (in {text}) is not the size of any input's axis, so "
                                      f"the exported model could not compute it")
            return self.dim(e.name)
        if (e.is_Add or e.is_Mul) and e.args:
            parts = [self._expr(a, text) for a in e.args]
            out = parts[0]
            for p in parts[1:]:
                out = self.node("Add" if e.is_Add else "Mul", out, p, dtype=DType.i64)
            return out
        if e.is_Pow and e.exp.is_Integer and int(e.exp) > 0:
            base = self._expr(e.base, text)
            out = base
            for _ in range(int(e.exp) - 1):
                out = self.node("Mul", out, base, dtype=DType.i64)
            return out
        raise OnnxExportError(f"symbolic dim {text} is not a polynomial in the inputs' dims")

    def scalar_dim(self, d: Dim) -> gs.Tensor:
        """A dim as an int64 scalar (Range takes scalars)."""
        if isinstance(d, int):
            return self.const(d, DType.i64)
        return self.node("Squeeze", self.dim(d), self.i64([0]), dtype=DType.i64)

    def shape(self, dims: Sequence[Dim], *, infer_one: bool = False) -> gs.Tensor:
        """A shape as an int64 tensor; with `infer_one` (Reshape) a single symbolic dim is written as -1."""
        symbolic = [d for d in dims if not isinstance(d, int)]
        if not symbolic:
            return self.i64([int(d) for d in dims])
        if infer_one and len(symbolic) == 1:
            return self.i64([-1 if not isinstance(d, int) else d for d in dims])
        return self.node("Concat", *[self.dim(d) for d in dims], axis=0, dtype=DType.i64)

    # -- the graph ---------------------------------------------------------------------------------

    def lower(self, progress: bool = False) -> None:
        for op in tqdm(self.ir.ops, desc="lowering to ONNX", unit="op", disable=not progress, leave=False):
            self.lower_op(op)
        self._outputs()

    def lower_op(self, op: Op) -> None:
        self.op, self._hint = op, op.results[0].name
        self._created = set()
        where = f"{op.name} at {op.results[0].ref}" + (f" ({op.loc})" if op.loc else "")
        operands = [self.value(v) for v in op.operands]
        result: Any = NotImplemented
        for table in self.tables:
            fn = table.get(op.name)
            if fn is not None:
                try:
                    result = fn(self, op, *operands)
                except OnnxExportError as e:
                    raise OnnxExportError(f"{where}: {e}") from None
                if result is not NotImplemented:
                    break
        if result is NotImplemented:
            raise OnnxExportError(f"{where}: there is no ONNX lowering of {op.name}; add one to "
                                  f"kiln.backends.onnx.LOWERINGS (@lowering({op.name!r}))")
        results = result if isinstance(result, (tuple, list)) else (result,)
        if len(results) != len(op.results):
            raise AssertionError(f"the lowering of {op.name} returned {len(results)} tensors for {len(op.results)} "
                                 f"results")
        for r, t in zip(op.results, results):
            if id(t) in self._created and isinstance(t, gs.Variable) and t.name.startswith(f"{self._hint}~"):
                t.name = r.name if r.name not in self.ir.params else f"%{r.name}"
                t.dtype = ONNX_DTYPES[r.type.dtype]
            self.tensors[id(r)] = t

    def update(self, v: Value, tensor: gs.Tensor) -> None:
        """An op wrote `v` in place (a KV cache): later readers, and the state outputs, see `tensor`."""
        self.tensors[id(v)] = tensor

    def _outputs(self) -> None:
        used: set[int] = set()
        for i, v in enumerate(self.ir.outputs):
            t = self.value(v)
            if not isinstance(t, gs.Variable) or not t.inputs or id(t) in used:  # an input, weight or repeat
                self._hint = f"output.{i}"
                t = self.node("Identity", t)
                t.name = f"output.{i}"
            used.add(id(t))
            t.dtype, t.shape = ONNX_DTYPES[v.type.dtype], [d for d in v.type.shape]
            self.g.outputs.append(t)
        for v in self.ir.inputs:
            t = self.tensors[id(v)]
            if t is not self.inputs[id(v)]:
                t.name = state_output_name(v.name)
                t.dtype, t.shape = ONNX_DTYPES[v.type.dtype], [d for d in v.type.shape]
                self.g.outputs.append(t)


# -- export ---------------------------------------------------------------------------------------

@dataclass
class ExportedModel:
    """An ONNX file kiln wrote, with what a runtime needs to call it like the IR graph."""

    path: Path
    inputs: list[str]                      # the IR graph's inputs, in order
    outputs: list[str]                     # the IR graph's outputs, then the state outputs
    state: dict[str, str]                  # state output -> the input it updates in place
    external_data: str | None              # the data file's name in the model's folder, if any
    notes: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, graph: Graph, path: Path) -> ExportedModel:
        """A model kiln wrote earlier for `graph` (its inputs, outputs and state read off the file)."""
        model = onnx.load(str(path), load_external_data=False)
        outputs = [o.name for o in model.graph.output]
        inputs = [v.name for v in graph.inputs]
        if [i.name for i in model.graph.input] != inputs:
            raise ValueError(f"{path} takes inputs {[i.name for i in model.graph.input]}, not the graph's {inputs}: "
                             f"export it again")
        state = {state_output_name(n): n for n in inputs if state_output_name(n) in outputs}
        data = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
        return cls(path, inputs, outputs, state, next(iter(data), None))


def export(graph: Graph, path: str | os.PathLike, *, tables: Sequence[Mapping[str, Lowering]] = (LOWERINGS,),
           external_data: bool | None = None, weights: WeightWriter | None = None,
           params: Mapping[str, torch.Tensor] | None = None, opset: int = DEFAULT_OPSET,
           domains: Sequence[tuple[str, int]] = (), check: bool = True, progress: bool = True) -> ExportedModel:
    """Write `graph` as an ONNX model at `path` and check it with onnx.checker (full_check).

    external_data: True writes weights to `<name>.data` next to the model, False keeps them
    inside, None decides by size (EXTERNAL_DATA_BYTES). `params` supplies data for parameters
    without storage. `tables` are lowering tables tried in order (a backend's own first)."""
    path = Path(path)
    if path.suffix != ".onnx":
        raise OnnxExportError(f"{path}: an ONNX model's file name should end in .onnx")
    if opset < DEFAULT_OPSET:
        raise OnnxExportError(f"opset {opset} is too old: kiln's Q/DQ lowering needs opset {DEFAULT_OPSET} or later")
    path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet_graphsurgeon():
        return _export(graph, path, tables, external_data, weights, params, opset, domains, check, progress)


@contextlib.contextmanager
def _quiet_graphsurgeon():
    """onnx-graphsurgeon warns that numpy has no FP8/INT4 types; kiln writes those bytes itself."""
    logger = gs.logger.G_LOGGER
    before, logger.severity = logger.severity, logger.ERROR
    try:
        yield
    finally:
        logger.severity = before


def _export(graph, path, tables, external_data, weights, params, opset, domains, check, progress) -> ExportedModel:
    e = Emitter(graph, tables, opset=opset, domains=domains, params=params)
    e.lower(progress)
    e.g.cleanup(remove_unused_graph_inputs=False).toposort()
    used = {t.name for t in e.g.tensors().values()}
    uses = {name: use for name, use in e.param_uses.items() if name in used}
    total = sum(_param_type(use).nbytes() for use in uses.values())
    if weights is None:
        external = total > EXTERNAL_DATA_BYTES if external_data is None else external_data
        weights = WeightWriter(path.parent, f"{path.name}.data" if external else None, progress)
        if external:
            (path.parent / weights.data_file).unlink(missing_ok=True)
    with tqdm(total=total, desc=f"writing {path.name} weights", unit="B", unit_scale=True,
              disable=not progress, leave=False) as bar:
        for name, use in uses.items():
            t = _param_type(use)
            proto = weights.proto(name, lambda use=use: e.load_param(use), t.dtype, t.concrete({}), t.nbytes())
            e._placeholders[name].to_constant(LazyValues(proto))
            bar.update(t.nbytes())
    model = gs.export_onnx(e.g, do_type_check=True, opset_imports=e.opset_imports)
    model.ir_version = IR_VERSION
    model.producer_version = _kiln_version()
    onnx.save_model(model, str(path))
    if check:
        onnx.checker.check_model(str(path), full_check=True)
    state = {state_output_name(v.name): v.name for v in graph.inputs
             if any(o.name == state_output_name(v.name) for o in e.g.outputs)}
    return ExportedModel(path, [v.name for v in graph.inputs], [o.name for o in e.g.outputs], state,
                         weights.data_file, e.notes)


def _param_type(use: ParamUse) -> TensorType:
    t = use.value.type
    return TensorType(use.dtype or t.dtype, use.shape if use.shape is not None else t.shape)


def _kiln_version() -> str:
    from .. import __version__

    return __version__


# -- lowerings: core ------------------------------------------------------------------------------

_BINARY = {"core.add": "Add", "core.sub": "Sub", "core.mul": "Mul", "core.div": "Div", "core.pow": "Pow",
           "core.maximum": "Max", "core.minimum": "Min", "core.eq": "Equal", "core.lt": "Less",
           "core.le": "LessOrEqual", "core.gt": "Greater", "core.ge": "GreaterOrEqual", "core.logical_and": "And",
           "core.logical_or": "Or"}
_UNARY = {"core.neg": "Neg", "core.abs": "Abs", "core.exp": "Exp", "core.log": "Log", "core.sqrt": "Sqrt",
          "core.reciprocal": "Reciprocal", "core.tanh": "Tanh", "core.sigmoid": "Sigmoid", "core.relu": "Relu",
          "core.erf": "Erf", "core.sin": "Sin", "core.cos": "Cos", "core.floor": "Floor", "core.round": "Round",
          "core.logical_not": "Not", "core.isnan": "IsNaN"}
_REDUCE = {"core.sum": "ReduceSum", "core.mean": "ReduceMean", "core.amax": "ReduceMax", "core.amin": "ReduceMin"}


def _binary(onnx_op: str) -> Lowering:
    return lambda e, op, a, b: e.node(onnx_op, a, b)


def _unary(onnx_op: str) -> Lowering:
    return lambda e, op, x: e.node(onnx_op, x)


for _name, _onnx_op in _BINARY.items():
    LOWERINGS[_name] = _binary(_onnx_op)
for _name, _onnx_op in _UNARY.items():
    LOWERINGS[_name] = _unary(_onnx_op)


@lowering("core.ne")
def _ne(e: Emitter, op: Op, a, b):
    return e.node("Not", e.node("Equal", a, b))


@lowering("core.rsqrt")
def _rsqrt(e: Emitter, op: Op, x):
    return e.node("Reciprocal", e.node("Sqrt", x))


@lowering("core.silu")
def _silu(e: Emitter, op: Op, x):
    return e.node("Mul", x, e.node("Sigmoid", x))


@lowering("core.gelu")
def _gelu(e: Emitter, op: Op, x):
    return e.node("Gelu", x, approximate=op.attrs["approximate"])


@lowering("core.clamp")
def _clamp(e: Emitter, op: Op, x):
    dtype = op.operands[0].type.dtype
    bound = {k: None if op.attrs[k] is None else e.const(op.attrs[k], dtype) for k in ("min", "max")}
    return e.node("Clip", x, bound["min"], bound["max"])


@lowering("core.cast")
def _cast(e: Emitter, op: Op, x):
    return e.node("Cast", x, to=ONNX_DTYPES[op.attrs["dtype"]])


@lowering("core.where")
def _where(e: Emitter, op: Op, cond, a, b):
    return e.node("Where", cond, a, b)


@lowering("core.constant")
def _constant(e: Emitter, op: Op):
    t = op.results[0].type
    value = op.attrs["value"]
    if t.is_static and t.numel() <= 1024:
        return e.const(value, t.dtype, t.shape)
    return e.node("ConstantOfShape", e.shape(t.shape),
                  value=tensor_proto("value", torch.tensor([value]).to(t.dtype.torch), t.dtype))


@lowering("core.arange")
def _arange(e: Emitter, op: Op):
    dtype = op.attrs["dtype"]
    if dtype not in (DType.i64, DType.i32, DType.f32):
        raise OnnxExportError(f"ONNX Range has no {dtype} form; make the ramp in i64 and cast it")
    end = e.cast(e.scalar_dim(op.attrs["end"]), DType.i64, dtype)
    return e.node("Range", e.const(op.attrs["start"], dtype), end, e.const(op.attrs["step"], dtype))


@lowering("core.dims")
def _dims(e: Emitter, op: Op):
    return e.cast(e.shape(op.attrs["dims"]), DType.i64, op.attrs["dtype"])


@lowering("core.reshape")
def _reshape(e: Emitter, op: Op, x):
    shape = op.results[0].type.shape
    zero = any(d == 0 for d in shape)
    return e.node("Reshape", x, e.shape(shape, infer_one=not zero), allowzero=1 if zero else None)


@lowering("core.permute")
def _permute(e: Emitter, op: Op, x):
    return e.node("Transpose", x, perm=list(op.attrs["dims"]))


@lowering("core.expand")
def _expand(e: Emitter, op: Op, x):
    return e.node("Expand", x, e.shape(op.results[0].type.shape))


@lowering("core.slice")
def _slice(e: Emitter, op: Op, x):
    a = op.attrs
    bound = lambda d, default: e.i64([default]) if d is None else e.dim(d) if isinstance(d, str) else e.i64([d])
    return e.node("Slice", x, bound(a["start"], 0), bound(a["end"], _INT64_MAX), e.i64([a["dim"]]),
                  e.i64([a["step"]]))


@lowering("core.concat")
def _concat(e: Emitter, op: Op, *xs):
    return e.node("Concat", *xs, axis=op.attrs["dim"])


@lowering("core.gather")
def _gather(e: Emitter, op: Op, x, indices):
    return e.node("Gather", x, indices, axis=op.attrs["dim"])


@lowering("core.gather_elements")
def _gather_elements(e: Emitter, op: Op, x, indices):
    return e.node("GatherElements", x, indices, axis=op.attrs["dim"])


@lowering("core.gather_nd")
def _gather_nd(e: Emitter, op: Op, x, indices):
    return e.node("GatherND", x, e.cast(indices, op.operands[1].type.dtype, DType.i64))


@lowering("core.matmul")
def _matmul(e: Emitter, op: Op, a, b):
    return e.node("MatMul", a, b)


def _reduce(onnx_op: str) -> Lowering:
    def lower(e: Emitter, op: Op, x):
        dims = op.attrs["dims"]
        return e.node(onnx_op, x, e.i64(dims) if dims else None, keepdims=int(op.attrs["keepdim"]))
    return lower


for _name, _onnx_op in _REDUCE.items():
    LOWERINGS[_name] = _reduce(_onnx_op)


@lowering("core.argmax")
def _argmax(e: Emitter, op: Op, x):
    return e.node("ArgMax", x, axis=op.attrs["dim"], keepdims=int(op.attrs["keepdim"]), select_last_index=0)


def _softmax(onnx_op: str) -> Lowering:
    def lower(e: Emitter, op: Op, x):
        dtype = op.operands[0].type.dtype
        y = e.node(onnx_op, e.cast(x, dtype, DType.f32), axis=op.attrs["dim"], dtype=DType.f32)
        return e.cast(y, DType.f32, dtype)
    return lower


LOWERINGS["core.softmax"] = _softmax("Softmax")
LOWERINGS["core.log_softmax"] = _softmax("LogSoftmax")


@lowering("core.tril", "core.triu")
def _trilu(e: Emitter, op: Op, x):
    return e.node("Trilu", x, e.const(op.attrs["k"], DType.i64), upper=int(op.name == "core.triu"))


@lowering("core.cumsum")
def _cumsum(e: Emitter, op: Op, x):
    return e.node("CumSum", x, e.const(op.attrs["dim"], DType.i64))


# -- lowerings: llm -------------------------------------------------------------------------------

@lowering("llm.linear")
def _linear(e: Emitter, op: Op, x, w, bias=None):
    weight = op.operands[1]
    if weight.is_param and e.only_linear_weight(weight):
        wt = e.param(weight, "T", shape=weight.type.shape[::-1])
    else:
        wt = e.node("Transpose", w, perm=[1, 0])
    y = e.node("MatMul", x, wt)
    return y if bias is None else e.node("Add", y, bias)


@lowering("llm.embedding")
def _embedding(e: Emitter, op: Op, weight, ids):
    return e.node("Gather", weight, ids, axis=0)


def rms_norm(e: Emitter, x, weight, dtype: DType, eps: float):
    """weight * (x / rms(x)) with the norm computed in f32 and rounded to x's dtype first, as the reference."""
    xf = e.cast(x, dtype, DType.f32)
    ms = e.node("ReduceMean", e.node("Mul", xf, xf), e.i64([-1]), keepdims=1)
    inv = e.node("Reciprocal", e.node("Sqrt", e.node("Add", ms, e.const(eps, DType.f32))))
    return e.node("Mul", weight, e.cast(e.node("Mul", xf, inv), DType.f32, dtype))


@lowering("llm.rms_norm")
def _rms_norm(e: Emitter, op: Op, x, weight):
    return rms_norm(e, x, weight, op.operands[0].type.dtype, op.attrs["eps"])


@lowering("llm.add_rms_norm")
def _add_rms_norm(e: Emitter, op: Op, x, residual, weight):
    h = e.node("Add", x, residual)
    return rms_norm(e, h, weight, op.operands[0].type.dtype, op.attrs["eps"]), h


@lowering("llm.layer_norm")
def _layer_norm(e: Emitter, op: Op, x, weight=None, bias=None):
    t = op.operands[0].type
    if weight is None:
        weight = e.const(1.0, t.dtype, (t.shape[-1],))
    return e.node("LayerNormalization", x, weight, bias, axis=-1, epsilon=op.attrs["eps"])


@lowering("llm.silu_mul")
def _silu_mul(e: Emitter, op: Op, gate, up):
    return e.node("Mul", e.node("Mul", gate, e.node("Sigmoid", gate)), up)


def rope(e: Emitter, x, positions, inv_freq, t: TensorType, inv_freq_dtype: DType, positions_dtype: DType, *,
         rotary_dim: int | None, interleaved: bool, scale: float):
    """Rotary embedding of x [*P, heads, D] at `positions` [*P], as llm.rope computes it."""
    d = t.shape[-1]
    rd = d if rotary_dim is None else rotary_dim
    pos = e.node("Unsqueeze", e.cast(positions, positions_dtype, DType.f32), e.i64([-1]))
    freqs = e.node("Mul", pos, e.cast(inv_freq, inv_freq_dtype, DType.f32))             # [*P, rd/2]
    if interleaved:
        pair = e.node("Unsqueeze", freqs, e.i64([-1]))
        emb = _flatten_last2(e, e.node("Concat", pair, pair, axis=-1), rd)
    else:
        emb = e.node("Concat", freqs, freqs, axis=-1)

    def table(fn: str):
        y = e.node(fn, emb)
        y = y if scale == 1.0 else e.node("Mul", y, e.const(scale, DType.f32))
        return e.node("Unsqueeze", e.cast(y, DType.f32, t.dtype), e.i64([-2]))            # [*P, 1, rd]

    cos, sin = table("Cos"), table("Sin")
    last = e.i64([-1])
    rot = x if rd == d else e.node("Slice", x, e.i64([0]), e.i64([rd]), last)
    if interleaved:
        shape = e.node("Concat", e.node("Shape", rot, end=-1), e.i64([rd // 2, 2]), axis=0)
        pairs = e.node("Reshape", rot, shape)
        first = e.node("Slice", pairs, e.i64([0]), e.i64([1]), last)
        second = e.node("Slice", pairs, e.i64([1]), e.i64([2]), last)
        rotated = e.node("Reshape", e.node("Concat", e.node("Neg", second), first, axis=-1), e.node("Shape", rot))
    else:
        lo = e.node("Slice", rot, e.i64([0]), e.i64([rd // 2]), last)
        hi = e.node("Slice", rot, e.i64([rd // 2]), e.i64([rd]), last)
        rotated = e.node("Concat", e.node("Neg", hi), lo, axis=-1)
    out = e.node("Add", e.node("Mul", rot, cos), e.node("Mul", rotated, sin))
    if rd == d:
        return out
    return e.node("Concat", out, e.node("Slice", x, e.i64([rd]), e.i64([_INT64_MAX]), last), axis=-1)


def _flatten_last2(e: Emitter, x, width: int):
    shape = e.node("Concat", e.node("Shape", x, end=-2), e.i64([width]), axis=0)
    return e.node("Reshape", x, shape)


@lowering("llm.rope")
def _rope(e: Emitter, op: Op, x, positions, inv_freq):
    a = op.attrs
    return rope(e, x, positions, inv_freq, op.operands[0].type, op.operands[2].type.dtype, op.operands[1].type.dtype,
                rotary_dim=a["rotary_dim"], interleaved=a["interleaved"], scale=a["scale"])


def _group(q: TensorType, k: TensorType) -> int:
    hq, hkv = q.shape[1], k.shape[1]
    if not isinstance(hq, int) or not isinstance(hkv, int):
        raise OnnxExportError(f"head counts must be static to export grouped attention, got q {q}, k {k}")
    return hq // hkv


def _repeat_heads(e: Emitter, x, t: TensorType, group: int):
    """[B, Hkv, S, D] -> [B, Hkv*group, S, D], each head repeated `group` times (repeat_interleave)."""
    if group == 1:
        return x
    b, h, s, d = t.shape
    x5 = e.node("Unsqueeze", x, e.i64([2]))
    x5 = e.node("Expand", x5, e.shape([b, h, group, s, d]))
    return e.node("Reshape", x5, e.shape([b, h * group, s, d], infer_one=True))


@lowering("llm.attention")
def _attention(e: Emitter, op: Op, q, k, v, mask=None):
    qt, kt, vt = (o.type for o in op.operands[:3])
    group = _group(qt, kt)
    f32 = DType.f32
    qf, kf, vf = e.cast(q, qt.dtype, f32), e.cast(k, kt.dtype, f32), e.cast(v, vt.dtype, f32)
    kf, vf = _repeat_heads(e, kf, kt, group), _repeat_heads(e, vf, vt, group)
    scale = op.attrs["scale"] if op.attrs["scale"] is not None else qt.shape[-1] ** -0.5
    scores = e.node("Mul", e.node("MatMul", qf, e.node("Transpose", kf, perm=[0, 1, 3, 2])), e.const(scale, f32))
    neg_inf = e.const(-math.inf, f32)
    if op.attrs["causal"]:
        s, skv = qt.shape[2], kt.shape[2]
        rows = e.node("Unsqueeze", e.node("Range", e.const(0, DType.i64), e.scalar_dim(s), e.const(1, DType.i64)),
                      e.i64([1]))
        cols = e.node("Range", e.const(0, DType.i64), e.scalar_dim(skv), e.const(1, DType.i64))
        last = rows if skv == s else e.node("Add", rows, e.node("Sub", e.dim(skv), e.dim(s)))   # i + Skv - S
        keep = e.node("LessOrEqual", cols, last)
        if op.attrs["window"] is not None:
            keep = e.node("And", keep, e.node("Greater", cols, e.node("Sub", last, e.const(op.attrs["window"],
                                                                                             DType.i64))))
        scores = e.node("Where", keep, scores, neg_inf)
    if mask is not None:
        mt = op.operands[3].type
        scores = e.node("Where", mask, scores, neg_inf) if mt.dtype is DType.bool else \
            e.node("Add", scores, e.cast(mask, mt.dtype, f32))
    probs = _softmax_nan_to_zero(e, scores)
    return e.cast(e.node("MatMul", probs, vf), f32, qt.dtype)


def _softmax_nan_to_zero(e: Emitter, scores):
    """Softmax over the last axis; a fully masked row attends to nothing (zeros), as the reference."""
    probs = e.node("Softmax", scores, axis=-1)
    return e.node("Where", e.node("IsNaN", probs), e.const(0.0, DType.f32), probs)


@lowering("llm.paged_attention")
def _paged_attention(e: Emitter, op: Op, q, k, v, k_cache, v_cache, slot_mapping, block_tables, context_lens,
                     query_start, positions=None, inv_freq=None):
    """Write the step's K/V into the caches (ScatterND at the live slots), then let each token attend
    to its sequence's first `position + 1` cached tokens, gathered through the block table."""
    qt, kt = op.operands[0].type, op.operands[1].type
    ct = op.operands[3].type
    f32, i64 = DType.f32, DType.i64
    if positions is not None:
        pt, ft = op.operands[9].type, op.operands[10].type
        q = rope(e, q, positions, inv_freq, qt, ft.dtype, pt.dtype, rotary_dim=None, interleaved=False,
                 scale=op.attrs["rope_scale"])
        k = rope(e, k, positions, inv_freq, kt, ft.dtype, pt.dtype, rotary_dim=None, interleaved=False,
                 scale=op.attrs["rope_scale"])
    _, heads, dim = qt.shape
    kv_heads = ct.shape[2]
    group = _group(TensorType(qt.dtype, (1, heads)), TensorType(kt.dtype, (1, kv_heads)))
    # 1. the live rows (slot >= 0) of k and v into the flattened caches
    live = e.node("Squeeze", e.node("NonZero", e.node("GreaterOrEqual", slot_mapping, e.const(0, i64))), e.i64([0]))
    slots = e.node("Unsqueeze", e.node("Gather", slot_mapping, live, axis=0), e.i64([1]))         # [L, 1]
    cache_rows = e.i64([-1, kv_heads, dim])
    caches = []
    for cache, new, cache_value in ((k_cache, k, op.operands[3]), (v_cache, v, op.operands[4])):
        flat = e.node("Reshape", cache, cache_rows)
        written = e.node("ScatterND", flat, slots, e.node("Gather", new, live, axis=0))
        caches.append(e.node("Reshape", written, e.node("Shape", cache), dtype=ct.dtype))
        e.update(cache_value, caches[-1])
    # 2. each token's sequence, and its position in that sequence's context
    tokens = e.node("Range", e.const(0, i64), e.scalar_dim(qt.shape[0]), e.const(1, i64))                # [T]
    starts = e.cast(query_start, DType.i32, i64)
    ends = e.node("Slice", starts, e.i64([1]), e.i64([_INT64_MAX]), e.i64([0]))                          # [B]
    after = e.node("LessOrEqual", e.node("Unsqueeze", ends, e.i64([0])), e.node("Unsqueeze", tokens, e.i64([1])))
    seq = e.node("ReduceSum", e.cast(after, DType.bool, i64), e.i64([1]), keepdims=0)                  # [T]
    last_seq = e.node("Sub", e.node("Shape", context_lens), e.i64([1]))
    seq = e.node("Min", seq, last_seq)                     # tokens past query_start[B] (none in practice)
    valid = e.node("Less", tokens, e.node("Slice", starts, e.i64([-1]), e.i64([_INT64_MAX]), e.i64([0])))
    pos = e.node("Add", e.node("Sub", e.node("Gather", e.cast(context_lens, DType.i32, i64), seq, axis=0),
                               e.node("Gather", ends, seq, axis=0)), tokens)                           # [T]
    # 3. every token's history: its sequence's blocks, flattened to [T, S, Hkv, D]
    blocks = e.node("Gather", block_tables, seq, axis=0)                                                # [T, MB]
    history = e.node("Concat", e.dim(qt.shape[0]), e.i64([-1, kv_heads, dim]), axis=0)
    keys = e.node("Reshape", e.node("Gather", caches[0], blocks, axis=0), history)
    values = e.node("Reshape", e.node("Gather", caches[1], blocks, axis=0), history)
    length = e.node("Squeeze", e.node("Shape", keys, start=1, end=2), e.i64([0]))
    j = e.node("Unsqueeze", e.node("Range", e.const(0, i64), length, e.const(1, i64)), e.i64([0]))   # [1, S]
    p = e.node("Unsqueeze", pos, e.i64([1]))                                                            # [T, 1]
    keep = e.node("LessOrEqual", j, p)
    if op.attrs["window"] is not None:
        keep = e.node("And", keep, e.node("Greater", j, e.node("Sub", p, e.const(op.attrs["window"], i64))))
    # unread slots may hold anything (the pool is not cleared): zero them so 0 * garbage is not NaN
    values = e.node("Where", e.node("Unsqueeze", keep, e.i64([2, 3])), e.cast(values, ct.dtype, f32),
                    e.const(0.0, f32))
    # 4. attention with the query heads of one KV head side by side: [T, Hkv, G, D] x [T, Hkv, D, S]
    qg = e.node("Reshape", e.cast(q, qt.dtype, f32), e.i64([-1, kv_heads, group, dim]))
    kT = e.node("Transpose", e.cast(keys, ct.dtype, f32), perm=[0, 2, 3, 1])
    scale = op.attrs["scale"] if op.attrs["scale"] is not None else dim ** -0.5
    scores = e.node("Mul", e.node("MatMul", qg, kT), e.const(scale, f32))                              # [T,Hkv,G,S]
    scores = e.node("Where", e.node("Unsqueeze", keep, e.i64([1, 2])), scores, e.const(-math.inf, f32))
    probs = _softmax_nan_to_zero(e, scores)
    out = e.node("MatMul", probs, e.node("Transpose", values, perm=[0, 2, 1, 3]))                      # [T,Hkv,G,D]
    out = e.node("Reshape", out, e.i64([-1, heads, dim]))
    out = e.node("Where", e.node("Unsqueeze", valid, e.i64([1, 2])), out, e.const(0.0, f32))
    return e.cast(out, f32, qt.dtype)


# -- lowerings: quant -----------------------------------------------------------------------------

def qdq_axis(op: Op, x: TensorType) -> dict[str, int | None]:
    """ONNX's axis and block_size for kiln's (axis, group_size): per tensor, per channel or blocked."""
    axis, group = op.attrs["axis"], op.attrs["group_size"]
    return {"axis": None if axis is None else axis % x.rank, "block_size": group}


@lowering("quant.quantize")
def _quantize(e: Emitter, op: Op, x, scale, zero_point=None):
    xt, st = op.operands[0].type, op.operands[1].type
    dtype = op.attrs["dtype"]
    if zero_point is not None and dtype in (DType.f8e4m3, DType.f8e5m2):
        raise OnnxExportError("an FP8 quantize takes no zero point")
    if zero_point is not None:
        zero_point = e.cast(zero_point, op.operands[2].type.dtype, dtype)
    # computed in f32 like the reference; ONNX wants x and its scale in one type
    return e.node("QuantizeLinear", e.cast(x, xt.dtype, DType.f32), e.cast(scale, st.dtype, DType.f32), zero_point,
                  output_dtype=None if zero_point is not None else ONNX_DTYPES[dtype], **qdq_axis(op, xt))


@lowering("quant.quantize_rows")
def _quantize_rows(e: Emitter, op: Op, x):
    dt, dtype = op.operands[0].type.dtype, op.attrs["dtype"]
    amax = e.node("ReduceMax", e.node("Abs", x), e.i64([1]), keepdims=0)
    scale = e.node("Div", e.node("Clip", amax, e.const(op.attrs["eps"], dt), None), e.const(op.attrs["bound"], dt))
    q = e.node("QuantizeLinear", e.cast(x, dt, DType.f32), e.cast(scale, dt, DType.f32), output_dtype=ONNX_DTYPES[dtype],
               axis=0)
    return q, scale


@lowering("quant.dequantize")
def _dequantize(e: Emitter, op: Op, q, scale, zero_point=None):
    qt, st = op.operands[0].type, op.operands[1].type
    if zero_point is not None:
        zero_point = e.cast(zero_point, op.operands[2].type.dtype, qt.dtype)
    y = e.node("DequantizeLinear", q, e.cast(scale, st.dtype, DType.f32), zero_point, dtype=DType.f32,
               **qdq_axis(op, qt))
    return e.cast(y, DType.f32, st.dtype)


def _rows(e: Emitter, x, t: TensorType):
    """x [..., K] as [M, K]."""
    return x if t.rank == 2 else e.node("Reshape", x, e.i64([-1, t.shape[-1]]))


def _scaled(e: Emitter, acc, x_scale, xs: TensorType, w_scale, ws: TensorType):
    """acc [M, N] * x_scale (scalar or per row) * w_scale (scalar or per column), in f32."""
    xs_f = e.cast(x_scale, xs.dtype, DType.f32)
    if xs.rank:
        xs_f = e.node("Reshape", xs_f, e.i64([-1, 1]))
    return e.node("Mul", e.node("Mul", acc, xs_f), e.cast(w_scale, ws.dtype, DType.f32))


def _unrows(e: Emitter, y, op: Op):
    out = op.results[0].type
    return y if out.rank == 2 else e.node("Reshape", y, e.shape(out.shape, infer_one=True))


@lowering("quant.linear_fp8", "quant.linear_int8")
def _linear_w8a8(e: Emitter, op: Op, x, wq, x_scale, w_scale):
    xt, xs, ws = op.operands[0].type, op.operands[2].type, op.operands[3].type
    rows = _rows(e, x, xt)
    if op.name == "quant.linear_int8":   # exact int32 sums, as the reference's
        acc = e.node("Cast", e.node("MatMulInteger", rows, e.node("Transpose", wq, perm=[1, 0])), to=TensorProto.FLOAT)
    else:                                # products of e4m3 values are exact in f32
        acc = e.node("MatMul", e.cast(rows, xt.dtype, DType.f32),
                     e.node("Transpose", e.cast(wq, DType.f8e4m3, DType.f32), perm=[1, 0]))
    y = e.cast(_scaled(e, acc, x_scale, xs, w_scale, ws), DType.f32, op.attrs["out_dtype"])
    return _unrows(e, y, op)


@lowering("quant.linear_w8a16")
def _linear_w8a16(e: Emitter, op: Op, x, wq, w_scale):
    xt, st = op.operands[0].type, op.operands[2].type
    acc = e.node("MatMul", e.cast(x, xt.dtype, DType.f32), e.node("Transpose", e.cast(wq, DType.i8, DType.f32),
                                                                  perm=[1, 0]))
    return e.cast(e.node("Mul", acc, e.cast(w_scale, st.dtype, DType.f32)), DType.f32, xt.dtype)


@lowering("quant.embedding")
def _quantized_embedding(e: Emitter, op: Op, table, scale, ids):
    tt, st = op.operands[0].type, op.operands[1].type
    rows = e.cast(e.node("Gather", table, ids, axis=0), tt.dtype, DType.f32)
    scales = e.node("Unsqueeze", e.node("Gather", e.cast(scale, st.dtype, DType.f32), ids, axis=0), e.i64([-1]))
    return e.cast(e.node("Mul", rows, scales), DType.f32, st.dtype)


_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _awq_unpack(e: Emitter, packed, rows_cols: tuple[Dim, Dim]):
    """AutoAWQ int32 [R, C/8] -> f32 [R, C] of unsigned nibbles, columns in order."""
    words = e.node("Unsqueeze", e.node("Cast", packed, to=TensorProto.UINT32), e.i64([-1]))
    shifts = e.const([4 * i for i in range(8)], DType.i64, (8,))
    nibbles = e.node("BitwiseAnd", e.node("BitShift", words, e.node("Cast", shifts, to=TensorProto.UINT32),
                                          direction="RIGHT"), e.node("Cast", e.const(15, DType.i64), to=TensorProto.UINT32))
    columns = e.node("Gather", nibbles, e.i64([_AWQ_ORDER.index(c) for c in range(8)]), axis=-1)
    return e.node("Cast", e.node("Reshape", columns, e.i64(list(rows_cols))), to=TensorProto.FLOAT)


@lowering("quant.linear_awq")
def _linear_awq(e: Emitter, op: Op, x, qweight, qzeros, scales):
    xt, st = op.operands[0].type, op.operands[3].type
    k, (groups, n) = op.operands[1].type.shape[0], st.shape
    group = k // groups
    q = _awq_unpack(e, qweight, (k, n))
    z = _awq_unpack(e, qzeros, (groups, n))
    repeat = lambda t: e.node("Reshape", e.node("Expand", e.node("Unsqueeze", t, e.i64([1])), e.i64([groups, group, n])),
                              e.i64([k, n]))
    w = e.node("Mul", e.node("Sub", q, repeat(z)), repeat(e.cast(scales, st.dtype, DType.f32)))
    w = e.cast(e.cast(w, DType.f32, xt.dtype), xt.dtype, DType.f32)        # rounded to x's dtype, as the reference
    return e.cast(e.node("MatMul", e.cast(x, xt.dtype, DType.f32), w), DType.f32, xt.dtype)


NOT_EXPORTABLE = {
    "dist.all_reduce": "collectives have no ONNX op: export one rank's graph before tensor-parallel sharding",
    "dist.all_gather": "collectives have no ONNX op: export one rank's graph before tensor-parallel sharding",
}
"""Ops with no ONNX form, and why; exporting them is an error that says so."""


def _not_exportable(e: Emitter, op: Op, *xs):
    raise OnnxExportError(NOT_EXPORTABLE[op.name])


for _name in NOT_EXPORTABLE:
    LOWERINGS[_name] = _not_exportable


# -- onnxruntime as a target ----------------------------------------------------------------------

class OnnxExecutable:
    """An exported model run by onnxruntime, called like the IR graph: `exe(*inputs)` returns the
    graph's outputs, and inputs the graph updates in place (KV caches) are updated in place."""

    def __init__(self, model: ExportedModel, *, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        # onnxruntime would otherwise fuse Q/DQ + MatMul into its own integer kernels, which quantize
        # activations that the graph leaves in float: run what the graph says
        options.add_session_config_entry("session.disable_quant_qdq", "1")
        if threads is not None:
            options.intra_op_num_threads = threads
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

        try:
            self.session = ort.InferenceSession(str(model.path), options, providers=["CPUExecutionProvider"])
        except (ort_errors.Fail, ort_errors.InvalidGraph, ort_errors.NotImplemented, ort_errors.InvalidArgument) as e:
            raise RuntimeError(f"onnxruntime cannot run {model.path}: {e}. Its CPU provider has no kernels for "
                               f"some types (bf16 MatMul among them): compile the model in f32") from None
        self.model = model
        self._inputs = model.inputs
        self._outputs = [o.name for o in self.session.get_outputs()]
        self._state = [(self._outputs.index(out), model.inputs.index(inp)) for out, inp in model.state.items()]
        self._results = [i for i, name in enumerate(self._outputs) if name not in model.state]

    def __call__(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        if len(inputs) != len(self._inputs):
            raise ValueError(f"the model takes {len(self._inputs)} inputs ({', '.join(self._inputs)}), "
                             f"got {len(inputs)}")
        feeds = {name: _to_numpy(t, name) for name, t in zip(self._inputs, inputs)}
        outs = self.session.run(self._outputs, feeds)
        for out_index, in_index in self._state:
            inputs[in_index].copy_(torch.from_numpy(outs[out_index]))
        return [torch.from_numpy(outs[i]) for i in self._results]


def _to_numpy(t: torch.Tensor, name: str) -> np.ndarray:
    if t.device.type != "cpu":
        raise ValueError(f"input {name} is on {t.device}; the onnx target runs onnxruntime on the CPU")
    if t.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        raise ValueError(f"input {name} is {t.dtype}, which numpy cannot hold; compile the model in f32")
    return t.detach().contiguous().numpy()


MODEL_FILE = "model.onnx"


def build(graph: Graph, *, output_dir: str | os.PathLike | None = None, progress: bool = True,
          **_: Any) -> dict[str, Any]:
    """At compile time: write output_dir/model.onnx when a folder is given (else the executable
    writes a temporary one when first asked)."""
    if output_dir is None:
        return {}
    path = Path(output_dir) / MODEL_FILE
    export(graph, path, progress=progress)
    return {"path": str(path)}


def compile(graph: Graph, *, device: str = "cpu", path: str | os.PathLike | None = None,
            external_data: bool | None = None, progress: bool = False, **_: Any) -> OnnxExecutable:
    """The model at `path` (written there first if absent; a temporary folder without a path) in onnxruntime."""
    if str(device) != "cpu":
        raise ValueError(f"target='onnx' runs onnxruntime's CPU provider; device={device!r} is not supported "
                         f"(compile with device='cpu', or use target='cuda' on the GPU)")
    if path is not None and Path(path).is_file():
        return OnnxExecutable(ExportedModel.of(graph, Path(path)))
    if path is None:
        path = Path(tempfile.mkdtemp(prefix="kiln-onnx-")) / MODEL_FILE
    return OnnxExecutable(export(graph, path, external_data=external_data, progress=progress))
