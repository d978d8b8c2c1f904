"""ONNX models into kiln's IR, through onnx-graphsurgeon.

Every ONNX op goes through one table, `ONNX_OPS`: op type -> a small function that emits IR ops
with a `Builder`. Shape arithmetic (Shape -> Gather -> Unsqueeze -> Concat -> Reshape, Slice
bounds, Equal/Where on shapes) never reaches the IR: each ONNX tensor is either an IR value or
known contents, whose int elements may be sympy expressions in the symbolic dims of the inputs,
so `Reshape` becomes `core.reshape {shape=[1,T,4,16]}`. Symbolic dims are taken as generic
(`T == 1` is false), as the exporter's trace assumed. Initializers become parameters whose data
is read lazily (external data is memory-mapped on first load); scalars become `core.constant`.

Fusions done here, where the pattern is unambiguous: MatMul with a constant 2-D weight (plus an
Add of a constant bias) -> `llm.linear` with the weight in [out, in] layout (transposed lazily);
Gather of a constant table by runtime ids -> `llm.embedding`; opset 23's `Attention` and
`RMSNormalization` -> `llm.attention` and `llm.rms_norm`. Attention written out in MatMul/Softmax
(opset < 23) is left to the fuse-attention pass.
"""

from __future__ import annotations

import ast
import math
import mmap
import operator
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import sympy
import torch
from tqdm import tqdm

try:
    import onnx
    import onnx_graphsurgeon as gs
    from onnx import TensorProto, numpy_helper
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("kiln.frontends.onnx needs the onnx and onnx-graphsurgeon packages: "
                      "pip install onnx onnx-graphsurgeon") from e

from ..ir.builder import Builder
from ..ir.graph import SIMPLE_NAME, Graph, Value
from ..ir.registry import OpError
from ..ir.storage import DerivedStorage, Storage, TensorStorage
from ..ir.types import DType, Dim, TensorType, _to_expr, canonical_dim, dim_div, dim_product

__all__ = ["load_onnx", "OnnxImportError", "OnnxStorage", "ONNX_OPS"]


class OnnxImportError(ValueError):
    """An ONNX file kiln cannot read or an op it cannot import; the message names the file and node."""


_DTYPES = {
    TensorProto.FLOAT: DType.f32, TensorProto.FLOAT16: DType.f16, TensorProto.BFLOAT16: DType.bf16,
    TensorProto.DOUBLE: DType.f32,  # the IR has no f64: doubles (shape arithmetic, mostly) compute in f32
    TensorProto.FLOAT8E4M3FN: DType.f8e4m3, TensorProto.FLOAT8E5M2: DType.f8e5m2,
    TensorProto.INT64: DType.i64, TensorProto.INT32: DType.i32, TensorProto.INT8: DType.i8,
    TensorProto.UINT8: DType.u8, TensorProto.BOOL: DType.bool,
}
_NP = {DType.f32: np.float32, DType.f16: np.float16, DType.bf16: np.float32, DType.i64: np.int64,
       DType.i32: np.int32, DType.i8: np.int8, DType.u8: np.uint8, DType.bool: np.bool_}
_FOLD_LIMIT = 4096  # known contents above this many elements stay in the IR (they are data, not shapes)


def _dtype(code: int, what: str) -> DType:
    if code not in _DTYPES:
        raise OnnxImportError(f"{what} has ONNX element type {TensorProto.DataType.Name(code)}, "
                              f"which kiln's IR cannot hold")
    return _DTYPES[code]


# --- lazily read initializers ---------------------------------------------------------------

@dataclass(eq=False)
class OnnxStorage(Storage):
    """One ONNX initializer: a byte range of an external data file, memory-mapped on load, or the
    tensor embedded in the model; nothing is read before `load`."""

    type: TensorType
    name: str
    path: str | None = None               # external data file
    offset: int = 0
    proto: Any = field(default=None, repr=False)  # embedded TensorProto
    double: bool = False                  # stored as f64, held as f32

    def load(self) -> torch.Tensor:
        shape = self.type.concrete({})
        numel = math.prod(shape)
        stored = torch.float64 if self.double else self.type.dtype.torch
        if self.path is not None:
            if numel == 0:
                return torch.empty(shape, dtype=self.type.dtype.torch)
            with open(self.path, "rb") as f:  # ACCESS_COPY: writable for torch, pages read on touch
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            t = torch.frombuffer(mm, dtype=stored, count=numel, offset=self.offset)
        elif self.proto.raw_data:
            t = torch.frombuffer(bytearray(self.proto.raw_data), dtype=stored) if numel else torch.empty(0)
        else:
            a = numpy_helper.to_array(self.proto)
            if self.type.dtype is DType.bf16:  # typed-field bf16 arrives as uint16 bit patterns or ml_dtypes
                a = a.view(np.uint16).astype(np.int16)
                t = torch.from_numpy(a.copy()).view(torch.bfloat16)
            else:
                t = torch.from_numpy(np.ascontiguousarray(a).copy())
        return t.reshape(shape).to(self.type.dtype.torch)

    def describe(self) -> str:
        if self.path is not None:
            return f"onnx external data {os.path.basename(self.path)}@{self.offset}:{self.name}"
        return f"onnx initializer {self.name}"


def _storage(proto: Any, model_dir: str, model_path: str) -> OnnxStorage:
    dtype = _dtype(proto.data_type, f"initializer {proto.name!r}")
    t = TensorType(dtype, tuple(int(d) for d in proto.dims))
    double = proto.data_type == TensorProto.DOUBLE
    if proto.data_location != TensorProto.EXTERNAL:
        return OnnxStorage(t, proto.name, proto=proto, double=double)
    info = {e.key: e.value for e in proto.external_data}
    path = os.path.join(model_dir, info.get("location", ""))
    offset, nbytes = int(info.get("offset", 0)), int(info.get("length", 0)) or t.nbytes() * (2 if double else 1)
    if not os.path.isfile(path):
        raise OnnxImportError(f"{model_path}: initializer {proto.name!r} keeps its data in {path}, "
                              f"which does not exist (copy the external data file next to the model)")
    if os.path.getsize(path) < offset + nbytes:
        raise OnnxImportError(f"{model_path}: external data file {path} is truncated: initializer "
                              f"{proto.name!r} needs bytes {offset}..{offset + nbytes}, the file has "
                              f"{os.path.getsize(path)}")
    return OnnxStorage(t, proto.name, path=path, offset=offset, double=double)


# --- what the importer knows about one ONNX tensor -------------------------------------------

@dataclass(eq=False)
class OnnxTensor:
    """One ONNX tensor: an IR value, known contents (numbers, or sympy expressions in symbolic
    dims for shape arithmetic), or a lazily read constant; `type` is its type in the IR."""

    name: str
    type: TensorType
    value: Value | None = None
    data: np.ndarray | None = None
    storage: Storage | None = None


def _expr(d: Dim) -> Any:
    return d if isinstance(d, int) else _to_expr(d)


def _to_dim(e: Any) -> Dim:
    """A known int element (int or sympy expression) as an IR dim."""
    if isinstance(e, (int, np.integer)):
        return int(e)
    if isinstance(e, sympy.Basic) and e.is_Integer:
        return int(e)
    if isinstance(e, sympy.Expr) and _is_dim_expr(e):
        return canonical_dim(str(e).replace(" ", ""))
    raise OnnxImportError(f"{e} is not a whole number or a polynomial in the symbolic dims")


def _is_dim_expr(e: sympy.Expr) -> bool:
    syms = e.free_symbols
    return bool(syms) and e.is_polynomial(*syms) and all(c.is_Integer for c in sympy.Poly(e, *syms).coeffs())


def _settle(a: np.ndarray, dtype: DType) -> np.ndarray:
    """Decide sympy relations and numbers in folded contents; raise TypeError where undecidable."""
    if a.dtype != object:
        return a.astype(_NP.get(dtype, a.dtype), copy=False)
    out, symbolic = np.empty(a.shape, dtype=object), False
    for i, e in np.ndenumerate(a):
        if isinstance(e, sympy.Basic):
            if isinstance(e, (sympy.logic.boolalg.BooleanAtom, sympy.core.relational.Relational)):
                e = bool(e)  # TypeError when undecidable: the node then runs in the IR
            elif e.is_number:
                e = int(e) if e.is_Integer else float(e)
            elif _is_dim_expr(e) and not dtype.is_float and dtype is not DType.bool:
                symbolic = True
            else:
                raise TypeError(f"{e} is not a dim")
        out[i] = e
    return out if symbolic else out.astype(_NP[dtype])


def _dims_array(shape: Sequence[Dim]) -> np.ndarray:
    a = np.empty(len(shape), dtype=object)
    a[:] = [_expr(d) for d in shape]
    return _settle(a, DType.i64)


# --- the importer ----------------------------------------------------------------------------

class _Importer:
    def __init__(self, path: str, model: Any, dtype: DType | None):
        self.path, self.dtype = path, dtype
        self.model_dir = os.path.dirname(os.path.abspath(path))
        self.graph_outputs: set[str] = set()
        self.b = Builder()
        self.graph: Graph = self.b.graph
        self.tensors: dict[str, OnnxTensor] = {}
        self.params: dict[Storage, Value] = {}
        self.storage_names: dict[Storage, str] = {}  # initializer storage -> its ONNX name
        self.claimed: set[int] = set()               # ids of nodes a fusion has already imported
        self.transposed: dict[tuple[Storage, tuple[int, ...]], DerivedStorage] = {}
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)

    # -- dtypes -----------------------------------------------------------------------------------

    def float_type(self, d: DType) -> DType:
        """With `dtype=`, every float tensor of the model computes in that type."""
        return self.dtype if self.dtype is not None and d in (DType.f32, DType.f16, DType.bf16) else d

    def onnx_type(self, code: int, what: str) -> DType:
        return self.float_type(_dtype(code, what))

    # -- tensors ----------------------------------------------------------------------------------

    def bind_value(self, name: str, v: Value) -> OnnxTensor:
        t = self.tensors[name] = OnnxTensor(name, v.type, value=v)
        return t

    def data_tensor(self, data: np.ndarray, dtype: DType, name: str = "") -> OnnxTensor:
        return OnnxTensor(name, TensorType(dtype, data.shape), data=data)

    def known(self, t: OnnxTensor | None) -> np.ndarray | None:
        """The tensor's contents if known at import time (small int constants are read for this)."""
        if t is None:
            return None
        if t.data is None and self._foldable(t):
            x = t.storage.load()
            t.data = (x.float() if x.dtype == torch.bfloat16 else x).numpy()
        return t.data

    def _foldable(self, t: OnnxTensor) -> bool:
        if t.data is not None:
            return True
        if t.storage is None or not t.type.is_static:
            return False
        n = t.type.numel()
        return n == 1 or (not t.type.dtype.is_float and n <= _FOLD_LIMIT)

    def const(self, t: OnnxTensor | None, what: str) -> np.ndarray:
        a = self.known(t)
        if a is None:
            raise OnnxImportError(f"{what} must be known when the model is imported (it is computed "
                                  f"from runtime data here)")
        return a

    def dims(self, t: OnnxTensor, what: str) -> list[Dim]:
        return [_to_dim(e) for e in self.const(t, what).reshape(-1).tolist()]

    def ints(self, t: OnnxTensor | None, what: str) -> list[int]:
        return [int(e) for e in self.const(t, what).reshape(-1).tolist()]

    def scalar(self, t: OnnxTensor | None, what: str) -> Any:
        a = self.const(t, what)
        if a.size != 1:
            raise OnnxImportError(f"{what} must be a single value, got shape {list(a.shape)}")
        e = a.reshape(-1)[0]
        return e.item() if isinstance(e, np.generic) else e

    def fold(self, fn: Callable[..., Any], *ts: OnnxTensor | None, dtype: DType | None = None) -> OnnxTensor | None:
        """Compute the result at import time when every operand is known; else None."""
        if not all(t is not None and self._foldable(t) for t in ts):
            return None
        datas = [self.known(t) for t in ts]
        dtype = dtype or ts[0].type.dtype
        try:
            with np.errstate(all="ignore"):
                out = _settle(np.asarray(fn(*datas)), dtype)
        except (TypeError, ValueError, ZeroDivisionError, OverflowError, IndexError, AttributeError):
            return None
        if out.size > _FOLD_LIMIT:
            return None
        return self.data_tensor(out, dtype)

    def value(self, t: OnnxTensor) -> Value:
        """The tensor as an IR value, made on first use for constants."""
        if t.value is not None:
            return t.value
        if t.storage is not None and t.type.numel() != 1:
            t.value = self.param(t.name, t.storage, t.type.dtype)
            return t.value
        data = self.known(t)
        flat = data.reshape(-1)
        if data.dtype == object:  # symbolic dims reaching data
            v = self.b.core.dims(dims=[_to_dim(e) for e in flat], dtype=t.type.dtype)
            t.value = v if data.ndim == 1 else self.b.core.reshape(v, shape=data.shape)
        elif flat.size and (flat == flat[0]).all():  # a splat (NaNs never compare equal, so never one)
            t.value = self.b.core.constant(value=flat[0].item(), dtype=t.type.dtype, shape=data.shape)
        else:
            tensor = torch.from_numpy(np.ascontiguousarray(data)).to(t.type.dtype.torch)
            t.value = self.param(t.name or "const", TensorStorage(tensor), t.type.dtype)
        return t.value

    def param(self, name: str, storage: Storage, dtype: DType) -> Value:
        """A parameter for a lazily read constant (one per storage), cast lazily for `dtype=`."""
        if storage not in self.params:
            typed = storage if storage.type.dtype == dtype else DerivedStorage(
                "core.cast", [storage], {"dtype": dtype}, storage.type.with_dtype(dtype))
            unique, i = name, 1
            while unique in self.graph.params:
                unique, i = f"{name}.{i}", i + 1
            self.params[storage] = self.b.param(unique, storage=typed)
        return self.params[storage]

    def permuted(self, t: OnnxTensor, perm: Sequence[int]) -> OnnxTensor:
        """A constant transposed lazily: weights stay unread, transposes of transposes cancel."""
        s, name = t.storage, t.name
        if isinstance(s, DerivedStorage) and s.op_name == "core.permute":
            perm = [s.attrs["dims"][p] for p in perm]
            s = s.inputs[0]
            name = self.storage_names.get(s, name)
        if list(perm) == list(range(len(perm))):
            return OnnxTensor(name, t.type.with_shape(s.type.shape), storage=s)
        key = (s, tuple(perm))  # one derived storage per transpose, so tied uses share a parameter
        if key not in self.transposed:
            shape = [s.type.shape[p] for p in perm]
            self.transposed[key] = DerivedStorage("core.permute", [s], {"dims": key[1]}, s.type.with_shape(shape))
        derived = self.transposed[key]
        return OnnxTensor(name, t.type.with_shape(derived.type.shape), storage=derived)

    def claim(self, node: Any, result: OnnxTensor) -> None:
        """A fusion imported `node` too: bind its output and skip it."""
        self.claimed.add(id(node))
        self.tensors[node.outputs[0].name] = _named(result, node.outputs[0].name)

    def emit(self, name: str, *operands: OnnxTensor | Value, **attrs: Any) -> OnnxTensor:
        vals = [o if isinstance(o, Value) else self.value(o) for o in operands]
        v = self.b.op(name, *vals, **attrs)
        return OnnxTensor("", v.type, value=v)

    def cast(self, t: OnnxTensor, dtype: DType) -> OnnxTensor:
        return t if t.type.dtype == dtype else self.emit("core.cast", t, dtype=dtype)

    def reshape(self, t: OnnxTensor, shape: Sequence[Dim]) -> OnnxTensor:
        shape = tuple(canonical_dim(d) for d in shape)
        if t.type.shape == shape:
            return t
        return self.fold(lambda a: a.reshape([int(d) for d in shape]), t) or self.emit("core.reshape", t, shape=shape)


# --- the lowering table ----------------------------------------------------------------------
# Each entry: (importer, gs node, *input tensors (None for an omitted optional input)) ->
# output tensor(s). Entries fold known operands first, so shape arithmetic never reaches the IR.

Lowering = Callable[..., "OnnxTensor | Sequence[OnnxTensor | None]"]


def _axis(axis: int, rank: int) -> int:
    if not -rank <= axis < max(rank, 1):
        raise OnnxImportError(f"axis {axis} is out of range for rank {rank}")
    return axis % rank if rank else 0


def _np_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """ONNX Div: true division of floats, truncation of ints (dims are non-negative, so floor)."""
    if a.dtype.kind == "f" or b.dtype.kind == "f":
        return np.true_divide(a, b)
    if a.dtype == object or b.dtype == object:
        return np.vectorize(operator.floordiv, otypes=[object])(a, b)
    return np.trunc(np.true_divide(a, b)).astype(np.result_type(a, b))


def _binary(ir: str, fn: Callable) -> Lowering:
    def lower(cx: _Importer, node, a: OnnxTensor, b: OnnxTensor) -> OnnxTensor:
        out = cx.fold(fn, a, b)
        if out is not None:
            return out
        if ir == "core.div" and not a.type.dtype.is_float:  # ONNX int Div truncates; exact below 2**24
            q = cx.emit("core.div", cx.cast(a, DType.f32), cx.cast(b, DType.f32))
            return cx.emit("core.cast", q, dtype=a.type.dtype)
        if ir == "core.pow" and b.type.dtype != a.type.dtype:  # the exponent may have its own type
            b = cx.cast(b, a.type.dtype)
        return cx.emit(ir, a, b)
    return lower


def _compare(ir: str, fn: Callable) -> Lowering:
    def lower(cx: _Importer, node, a: OnnxTensor, b: OnnxTensor) -> OnnxTensor:
        return cx.fold(fn, a, b, dtype=DType.bool) or cx.emit(ir, a, b)
    return lower


def _unary(ir: str, fn: Callable | None) -> Lowering:
    def lower(cx: _Importer, node, x: OnnxTensor) -> OnnxTensor:
        out = cx.fold(fn, x, dtype=DType.bool if ir in ("core.isnan", "core.logical_not") else None) if fn else None
        return out or cx.emit(ir, x)
    return lower


def _variadic(ir: str, fn: Callable) -> Lowering:
    def lower(cx: _Importer, node, *xs: OnnxTensor) -> OnnxTensor:
        out = xs[0]
        for x in xs[1:]:
            out = cx.fold(fn, out, x) or cx.emit(ir, out, x)
        return out
    return lower


def _identity(cx: _Importer, node, x: OnnxTensor, *_) -> OnnxTensor:
    return x


def _constant(cx: _Importer, node) -> OnnxTensor:
    (key, v), = node.attrs.items()
    if key == "value":
        if isinstance(v, gs.Constant) and hasattr(v._values, "tensor"):  # unread TensorProto
            s = _storage(v._values.tensor, cx.model_dir, cx.path)
            return OnnxTensor(node.outputs[0].name, s.type.with_dtype(cx.float_type(s.type.dtype)), storage=s)
        a = np.asarray(v.values if isinstance(v, gs.Constant) else v)
    elif key in ("value_float", "value_floats"):
        a = np.asarray(v, dtype=np.float32)
    elif key in ("value_int", "value_ints"):
        a = np.asarray(v, dtype=np.int64)
    else:
        raise OnnxImportError(f"Constant with attribute {key} is not supported")
    dtype = cx.float_type(DType.f32) if a.dtype.kind == "f" else {
        "b": DType.bool, "i": DType.i64 if a.dtype.itemsize == 8 else DType.i32, "u": DType.u8}[a.dtype.kind]
    return OnnxTensor(node.outputs[0].name, TensorType(dtype, a.shape), data=a)


def _shape(cx: _Importer, node, x: OnnxTensor) -> OnnxTensor:
    shape = x.type.shape
    start, end = node.attrs.get("start", 0), node.attrs.get("end", len(shape))
    return cx.data_tensor(_dims_array(shape[start:end]), DType.i64)


def _size(cx: _Importer, node, x: OnnxTensor) -> OnnxTensor:
    return cx.data_tensor(_dims_array([dim_product(x.type.shape)]).reshape(()), DType.i64)


def _cast(cx: _Importer, node, x: OnnxTensor) -> OnnxTensor:
    to = cx.onnx_type(node.attrs["to"], f"Cast {node.name!r}")

    def convert(a):
        if a.dtype == object:
            if to is DType.bool:
                return a != 0
            return a
        return a.astype(_NP[to])
    return cx.fold(convert, x, dtype=to) or cx.cast(x, to)


def _cast_like(cx: _Importer, node, x: OnnxTensor, like: OnnxTensor) -> OnnxTensor:
    return cx.fold(lambda a: a.astype(_NP[like.type.dtype]), x, dtype=like.type.dtype) or cx.cast(x, like.type.dtype)


def _reshape(cx: _Importer, node, x: OnnxTensor, shape: OnnxTensor) -> OnnxTensor:
    dims = cx.dims(shape, "the target shape of Reshape")
    if not node.attrs.get("allowzero", 0):
        dims = [x.type.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    if -1 in dims:
        rest = dim_product([d for d in dims if d != -1])
        dims = [dim_div(dim_product(x.type.shape), rest) if d == -1 else d for d in dims]
    return cx.reshape(x, dims)


def _axes(cx: _Importer, node, axes: OnnxTensor | None, what: str) -> list[int] | None:
    if "axes" in node.attrs:
        return list(node.attrs["axes"])
    return None if axes is None else cx.ints(axes, f"the axes of {what}")


def _unsqueeze(cx: _Importer, node, x: OnnxTensor, axes: OnnxTensor | None = None) -> OnnxTensor:
    ax = _axes(cx, node, axes, "Unsqueeze")
    rank = x.type.rank + len(ax)
    ax = sorted(_axis(a, rank) for a in ax)
    shape = list(x.type.shape)
    for a in ax:
        shape.insert(a, 1)
    return cx.reshape(x, shape)


def _squeeze(cx: _Importer, node, x: OnnxTensor, axes: OnnxTensor | None = None) -> OnnxTensor:
    ax = _axes(cx, node, axes, "Squeeze")
    ax = {i for i, d in enumerate(x.type.shape) if d == 1} if ax is None else {_axis(a, x.type.rank) for a in ax}
    return cx.reshape(x, [d for i, d in enumerate(x.type.shape) if i not in ax])


def _flatten(cx: _Importer, node, x: OnnxTensor) -> OnnxTensor:
    a = node.attrs.get("axis", 1)
    a = a + x.type.rank if a < 0 else a
    return cx.reshape(x, [dim_product(x.type.shape[:a]), dim_product(x.type.shape[a:])])


def _transpose(cx: _Importer, node, x: OnnxTensor) -> OnnxTensor:
    perm = list(node.attrs.get("perm", range(x.type.rank - 1, -1, -1)))
    if x.storage is not None and x.value is None and x.type.numel() > 1:
        return cx.permuted(x, perm)
    if perm == list(range(x.type.rank)):
        return x
    return cx.fold(lambda a: a.transpose(perm), x) or cx.emit("core.permute", x, dims=perm)


def _concat(cx: _Importer, node, *xs: OnnxTensor) -> OnnxTensor:
    axis = node.attrs["axis"]
    rank = xs[0].type.rank
    xs = [x for x in xs if x.type.shape[_axis(axis, rank)] != 0] or list(xs[:1])
    out = cx.fold(lambda *a: np.concatenate(a, axis=axis), *xs)
    if out is not None:
        return out
    return xs[0] if len(xs) == 1 else cx.emit("core.concat", *xs, dim=axis)


def _gather(cx: _Importer, node, x: OnnxTensor, idx: OnnxTensor) -> OnnxTensor:
    axis = _axis(node.attrs.get("axis", 0), x.type.rank)
    out = cx.fold(lambda a, i: np.take(a, i, axis=axis), x, idx)
    if out is not None:
        return out
    index = cx.known(idx)
    if x.storage is not None and x.type.rank == 2 and axis == 0 and index is None:
        return cx.emit("llm.embedding", x, idx)
    size = x.type.shape[axis]
    if index is not None and index.ndim == 0:  # one row: a slice, which passes read as a view
        i = int(index)
        i = i + size if i < 0 and isinstance(size, int) else i
        row = cx.emit("core.slice", x, dim=axis, start=i, end=i + 1 if i != -1 else None)
        return cx.reshape(row, [d for k, d in enumerate(row.type.shape) if k != axis])
    if index is not None and isinstance(size, int):
        idx = cx.data_tensor(np.where(index < 0, index + size, index).astype(np.int64), DType.i64)
    return cx.emit("core.gather", x, idx, dim=axis)


def _slice(cx: _Importer, node, x: OnnxTensor, starts=None, ends=None, axes=None, steps=None) -> OnnxTensor:
    if cx.opset < 10:
        st, en, ax = node.attrs["starts"], node.attrs["ends"], node.attrs.get("axes")
        sp = [1] * len(st)
    else:
        st, en = cx.dims(starts, "the starts of Slice"), cx.dims(ends, "the ends of Slice")
        ax = None if axes is None else cx.ints(axes, "the axes of Slice")
        sp = [1] * len(st) if steps is None else cx.ints(steps, "the steps of Slice")
    ax = list(range(len(st))) if ax is None else [_axis(a, x.type.rank) for a in ax]

    def take(a):
        index = [slice(None)] * a.ndim
        for s, e, d, p in zip(st, en, ax, sp):
            index[d] = slice(int(s), int(e), p)
        return a[tuple(index)]
    out = cx.fold(take, x)
    if out is not None:
        return out
    for s, e, d, p in zip(st, en, ax, sp):
        if p <= 0:
            raise OnnxImportError(f"Slice with step {p} is not supported (only positive steps)")
        size = x.type.shape[d]
        if e == size or isinstance(e, int) and (e >= 2**31 or isinstance(size, int) and e >= size):
            e = None  # to the end
        if s == 0 and p == 1 and e is None:
            continue
        x = cx.emit("core.slice", x, dim=d, start=s, end=e, step=p)
    return x


def _broadcast(a: Sequence[Dim], b: Sequence[Dim]) -> list[Dim]:
    n = max(len(a), len(b))
    a, b = [1] * (n - len(a)) + list(a), [1] * (n - len(b)) + list(b)
    return [y if x == 1 else x for x, y in zip(a, b)]


def _expand(cx: _Importer, node, x: OnnxTensor, shape: OnnxTensor) -> OnnxTensor:
    out = _broadcast(x.type.shape, cx.dims(shape, "the shape of Expand"))
    folded = cx.fold(lambda a: np.broadcast_to(a, [int(d) for d in out]).copy(), x)
    if folded is not None:
        return folded
    data = cx.known(x) if x.value is None else None
    if data is not None and data.dtype != object and data.size == 1:
        return cx.emit("core.constant", value=data.reshape(-1)[0].item(), dtype=x.type.dtype, shape=out)
    return x if tuple(out) == x.type.shape else cx.emit("core.expand", x, shape=out)


def _constant_of_shape(cx: _Importer, node, shape: OnnxTensor) -> OnnxTensor:
    v = node.attrs.get("value")
    a = np.asarray(v.values if isinstance(v, gs.Constant) else (0.0 if v is None else v)).reshape(-1)
    dtype = cx.float_type(DType.f32) if a.dtype.kind == "f" else {"b": DType.bool, "u": DType.u8}.get(
        a.dtype.kind, DType.i64 if a.dtype.itemsize == 8 else DType.i32)
    dims = cx.dims(shape, "the shape of ConstantOfShape")
    if all(isinstance(d, int) for d in dims) and math.prod(dims) <= _FOLD_LIMIT:
        return cx.data_tensor(np.full(dims, a[0], dtype=a.dtype), dtype)
    return cx.emit("core.constant", value=a[0].item(), dtype=dtype, shape=dims)


def _range(cx: _Importer, node, start: OnnxTensor, limit: OnnxTensor, delta: OnnxTensor) -> OnnxTensor:
    out = cx.fold(lambda s, l, d: np.arange(s.item(), l.item(), d.item(), dtype=s.dtype), start, limit, delta)
    if out is not None:
        return out
    s, l, d = (cx.scalar(t, "the bounds of Range") for t in (start, limit, delta))
    if not (isinstance(s, int) and isinstance(d, int)):
        raise OnnxImportError(f"Range from {s} by {d} to {l}: a symbolic Range needs an int start and step")
    return cx.emit("core.arange", end=_to_dim(l), start=s, step=d, dtype=start.type.dtype)


def _where(cx: _Importer, node, c: OnnxTensor, a: OnnxTensor, b: OnnxTensor) -> OnnxTensor:
    return cx.fold(np.where, c, a, b, dtype=a.type.dtype) or cx.emit("core.where", c, a, b)


def _matmul(cx: _Importer, node, a: OnnxTensor, b: OnnxTensor) -> OnnxTensor:
    if b.storage is not None and b.type.rank == 2 and a.type.rank >= 1:
        w = cx.permuted(b, (1, 0))  # [out, in], as llm.linear and HF checkpoints hold it
        add, bias = _bias_of(cx, node, w.type.shape[0])
        if add is None:
            return cx.emit("llm.linear", a, w)
        out = cx.emit("llm.linear", a, w, bias)
        cx.claim(add, out)
        return out  # the MatMul's own output has no other use
    if a.type.rank < 2 or b.type.rank < 2:  # ONNX MatMul promotes vectors like numpy
        av = cx.reshape(a, [1, *a.type.shape]) if a.type.rank == 1 else a
        bv = cx.reshape(b, [*b.type.shape, 1]) if b.type.rank == 1 else b
        out = cx.emit("core.matmul", av, bv)
        shape = list(out.type.shape)
        if b.type.rank == 1:
            shape.pop(-1)
        if a.type.rank == 1:
            shape.pop(-2 if b.type.rank > 1 else -1)
        return cx.reshape(out, shape)
    return cx.emit("core.matmul", a, b)


def _bias_of(cx: _Importer, node, out_features: Dim) -> tuple[Any, OnnxTensor | None]:
    """The Add of a constant [out] bias right after a MatMul (its only use), which joins the llm.linear."""
    y = node.outputs[0]
    if len(y.outputs) != 1 or y.name in cx.graph_outputs or y.outputs[0].op != "Add":
        return None, None
    add = y.outputs[0]
    other = [cx.tensors.get(t.name) for t in add.inputs if t is not y]
    if len(other) != 1 or other[0] is None or other[0].storage is None or other[0].type.shape != (out_features,):
        return None, None
    return add, other[0]


def _gemm(cx: _Importer, node, a: OnnxTensor, b: OnnxTensor, c: OnnxTensor | None = None) -> OnnxTensor:
    at = node.attrs
    if at.get("alpha", 1.0) != 1.0 or at.get("beta", 1.0) != 1.0 or at.get("transA", 0):
        raise OnnxImportError("Gemm with alpha, beta != 1 or transA is not supported")
    if at.get("transB", 0):
        w = b
    else:
        w = cx.permuted(b, (1, 0)) if b.storage is not None else cx.emit("core.permute", b, dims=(1, 0))
    if c is not None and c.type.shape == (w.type.shape[0],):
        return cx.emit("llm.linear", a, w, c)
    out = cx.emit("llm.linear", a, w)
    return out if c is None else cx.emit("core.add", out, c)


def _softmax(ir: str) -> Lowering:
    def lower(cx: _Importer, node, x: OnnxTensor) -> OnnxTensor:
        axis = node.attrs.get("axis", -1 if cx.opset >= 13 else 1)
        if cx.opset < 13 and _axis(axis, x.type.rank) != x.type.rank - 1:
            raise OnnxImportError(f"{node.op} before opset 13 over axis {axis} (not the last) is not supported")
        return cx.emit(ir, x, dim=axis)
    return lower


def _reduce(ir: str, fn: Callable) -> Lowering:
    def lower(cx: _Importer, node, x: OnnxTensor, axes: OnnxTensor | None = None) -> OnnxTensor:
        ax = _axes(cx, node, axes, node.op)
        keep = bool(node.attrs.get("keepdims", 1))
        if not ax:
            if node.attrs.get("noop_with_empty_axes", 0):
                return x
            ax = list(range(x.type.rank))
        out = cx.fold(lambda a: fn(a, axis=tuple(ax), keepdims=keep), x)
        return out or cx.emit(ir, x, dims=ax, keepdim=keep)
    return lower


def _split(cx: _Importer, node, x: OnnxTensor, split: OnnxTensor | None = None) -> list[OnnxTensor]:
    axis = _axis(node.attrs.get("axis", 0), x.type.rank)
    n = len(node.outputs)
    sizes = node.attrs.get("split") or (cx.ints(split, "the sizes of Split") if split is not None else None)
    if sizes is None:
        size = x.type.shape[axis]
        if not isinstance(size, int):
            raise OnnxImportError(f"Split of a symbolic dim {size} needs explicit sizes")
        chunk = -(-size // n)
        sizes = [min(chunk, size - i * chunk) for i in range(n)]
    outs, start = [], 0
    for s in sizes:
        outs.append(cx.fold(lambda a, s=s, st=start: np.take(a, range(st, st + s), axis=axis), x)
                    or cx.emit("core.slice", x, dim=axis, start=start, end=start + s))
        start += s
    return outs


def _trilu(cx: _Importer, node, x: OnnxTensor, k: OnnxTensor | None = None) -> OnnxTensor:
    kk = 0 if k is None else int(cx.scalar(k, "k of Trilu"))
    upper = node.attrs.get("upper", 1)
    out = cx.fold(lambda a: (np.triu if upper else np.tril)(a, kk), x)
    return out or cx.emit("core.triu" if upper else "core.tril", x, k=kk)


def _cumsum(cx: _Importer, node, x: OnnxTensor, axis: OnnxTensor) -> OnnxTensor:
    a = int(cx.scalar(axis, "the axis of CumSum"))
    if node.attrs.get("reverse", 0):
        raise OnnxImportError("CumSum with reverse=1 is not supported")
    out = cx.emit("core.cumsum", x, dim=a)
    return cx.emit("core.sub", out, x) if node.attrs.get("exclusive", 0) else out


def _gather_nd(cx: _Importer, node, x: OnnxTensor, idx: OnnxTensor) -> OnnxTensor:
    if node.attrs.get("batch_dims", 0):
        raise OnnxImportError("GatherND with batch_dims != 0 is not supported")
    return cx.emit("core.gather_nd", x, idx)


def _gather_elements(cx: _Importer, node, x: OnnxTensor, idx: OnnxTensor) -> OnnxTensor:
    return cx.emit("core.gather_elements", x, idx, dim=node.attrs.get("axis", 0))


def _rms_norm(cx: _Importer, node, x: OnnxTensor, scale: OnnxTensor) -> OnnxTensor:
    axis = _axis(node.attrs.get("axis", -1), x.type.rank)
    eps = float(node.attrs.get("epsilon", 1e-5))
    if axis == x.type.rank - 1 and scale.type.shape == x.type.shape[-1:]:
        return cx.emit("llm.rms_norm", x, scale, eps=eps)
    xf = cx.cast(x, DType.f32)  # stash_type f32, over several trailing axes: written out
    ms = cx.emit("core.mean", cx.emit("core.mul", xf, xf), dims=list(range(axis, x.type.rank)), keepdim=True)
    eps_t = cx.emit("core.constant", value=eps, dtype=DType.f32)
    normed = cx.cast(cx.emit("core.mul", xf, cx.emit("core.rsqrt", cx.emit("core.add", ms, eps_t))), x.type.dtype)
    return cx.emit("core.mul", normed, scale)


def _layer_norm(cx: _Importer, node, x: OnnxTensor, scale: OnnxTensor, bias: OnnxTensor | None = None) -> OnnxTensor:
    if _axis(node.attrs.get("axis", -1), x.type.rank) != x.type.rank - 1:
        raise OnnxImportError("LayerNormalization over more than the last axis is not supported")
    if any(o.name for o in node.outputs[1:]):
        raise OnnxImportError("LayerNormalization's Mean and InvStdDev outputs are not supported")
    eps = float(node.attrs.get("epsilon", 1e-5))
    return cx.emit("llm.layer_norm", x, scale, *([bias] if bias is not None else []), eps=eps)


def _gelu(cx: _Importer, node, x: OnnxTensor) -> OnnxTensor:
    return cx.emit("core.gelu", x, approximate=node.attrs.get("approximate", "none"))


def _attention(cx: _Importer, node, q: OnnxTensor, k: OnnxTensor, v: OnnxTensor, mask: OnnxTensor | None = None,
               past_k: OnnxTensor | None = None, past_v: OnnxTensor | None = None) -> list[OnnxTensor | None]:
    at = node.attrs
    if at.get("softcap", 0.0):
        raise OnnxImportError("Attention with softcap is not supported")
    if len(node.outputs) > 3 and node.outputs[3].name:
        raise OnnxImportError("Attention's qk_matmul_output is not supported")
    three_d = q.type.rank == 3

    def heads(t: OnnxTensor, n: int) -> OnnxTensor:
        b, s, hidden = t.type.shape
        return cx.emit("core.permute", cx.reshape(t, [b, s, n, dim_div(hidden, n)]), dims=(0, 2, 1, 3))
    if three_d:
        q, k, v = heads(q, at["q_num_heads"]), heads(k, at["kv_num_heads"]), heads(v, at["kv_num_heads"])
    new_len, s = k.type.shape[2], q.type.shape[2]
    if past_k is not None:
        k, v = cx.emit("core.concat", past_k, k, dim=2), cx.emit("core.concat", past_v, v, dim=2)
    causal = bool(at.get("is_causal", 0))
    if causal and new_len != s:  # ONNX aligns the causal frontier to the past length, not to the end
        past = past_k.type.shape[2] if past_k is not None else 0
        rows = cx.emit("core.reshape", cx.emit("core.arange", end=s), shape=[s, 1])
        cols = cx.emit("core.reshape", cx.emit("core.arange", end=k.type.shape[2]), shape=[1, k.type.shape[2]])
        shifted = cx.emit("core.add", rows, cx.value(cx.data_tensor(_dims_array([past]), DType.i64)))
        keep = cx.emit("core.le", cols, shifted)
        if mask is None:
            mask = keep
        elif mask.type.dtype is DType.bool:
            mask = cx.emit("core.logical_and", mask, keep)
        else:
            ninf = cx.emit("core.constant", value=float("-inf"), dtype=mask.type.dtype)
            mask = cx.emit("core.where", keep, mask, ninf)
        causal = False
    scale = at.get("scale")
    args = [q, k, v] + ([mask] if mask is not None else [])
    y = cx.emit("llm.attention", *args, causal=causal, scale=None if scale is None else float(scale))
    if three_d:
        b, h, sq, d = y.type.shape
        y = cx.reshape(cx.emit("core.permute", y, dims=(0, 2, 1, 3)), [b, sq, dim_product([h, d])])
    return [y, k if past_k is not None else None, v if past_k is not None else None]


def _rotary(cx: _Importer, node, x: OnnxTensor, cos: OnnxTensor, sin: OnnxTensor,
            pos: OnnxTensor | None = None) -> OnnxTensor:
    """Opset 23 RotaryEmbedding, written out in core ops (cos/sin come as data, not as positions
    and frequencies, so llm.rope does not apply; a rope pass can match the pattern)."""
    at = node.attrs
    x4 = x
    if x.type.rank == 3:
        b, s, hidden = x.type.shape
        n = at["num_heads"]
        x4 = cx.reshape(x, [b, s, n, dim_div(hidden, n)])
    head_axis = 1 if x.type.rank == 4 else 2
    d = x4.type.shape[-1]
    rd = at.get("rotary_embedding_dim", 0) or d
    if pos is not None:
        cos, sin = cx.emit("core.gather", cos, pos, dim=0), cx.emit("core.gather", sin, pos, dim=0)

    def per_head(t: OnnxTensor) -> OnnxTensor:
        shape = list(t.type.shape)
        shape.insert(head_axis, 1)
        return cx.reshape(t, shape)
    cos, sin = per_head(cos), per_head(sin)
    half = rd // 2
    if at.get("interleaved", 0):
        x1 = cx.emit("core.slice", x4, dim=-1, start=0, end=rd, step=2)
        x2 = cx.emit("core.slice", x4, dim=-1, start=1, end=rd, step=2)
    else:
        x1 = cx.emit("core.slice", x4, dim=-1, start=0, end=half)
        x2 = cx.emit("core.slice", x4, dim=-1, start=half, end=rd)
    r1 = cx.emit("core.sub", cx.emit("core.mul", x1, cos), cx.emit("core.mul", x2, sin))
    r2 = cx.emit("core.add", cx.emit("core.mul", x2, cos), cx.emit("core.mul", x1, sin))
    if at.get("interleaved", 0):
        pair = list(r1.type.shape) + [1]
        both = cx.emit("core.concat", cx.reshape(r1, pair), cx.reshape(r2, pair), dim=-1)
        rot = cx.reshape(both, [*r1.type.shape[:-1], rd])
    else:
        rot = cx.emit("core.concat", r1, r2, dim=-1)
    if rd != d:
        rot = cx.emit("core.concat", rot, cx.emit("core.slice", x4, dim=-1, start=rd), dim=-1)
    return cx.reshape(rot, x.type.shape)


def _dropout(cx: _Importer, node, x: OnnxTensor, *_) -> list[OnnxTensor | None]:
    if len(node.outputs) > 1 and node.outputs[1].name:
        raise OnnxImportError("Dropout's mask output is not supported")
    return [x]


ONNX_OPS: dict[str, Lowering] = {
    # constants, shapes and layout
    "Constant": _constant, "Identity": _identity, "Dropout": _dropout,
    "Shape": _shape, "Size": _size, "Cast": _cast, "CastLike": _cast_like,
    "Reshape": _reshape, "Unsqueeze": _unsqueeze, "Squeeze": _squeeze, "Flatten": _flatten,
    "Transpose": _transpose, "Concat": _concat, "Split": _split, "Slice": _slice,
    "Gather": _gather, "GatherND": _gather_nd, "GatherElements": _gather_elements,
    "Expand": _expand, "ConstantOfShape": _constant_of_shape, "Range": _range, "Where": _where,
    "Trilu": _trilu, "CumSum": _cumsum,
    # arithmetic
    "Add": _binary("core.add", np.add), "Sub": _binary("core.sub", np.subtract),
    "Mul": _binary("core.mul", np.multiply), "Div": _binary("core.div", _np_div),
    "Pow": _binary("core.pow", np.power),
    "Max": _variadic("core.maximum", np.maximum), "Min": _variadic("core.minimum", np.minimum),
    "Sum": _variadic("core.add", np.add),
    "Equal": _compare("core.eq", np.equal), "Less": _compare("core.lt", np.less),
    "LessOrEqual": _compare("core.le", np.less_equal), "Greater": _compare("core.gt", np.greater),
    "GreaterOrEqual": _compare("core.ge", np.greater_equal),
    "And": _compare("core.logical_and", np.logical_and), "Or": _compare("core.logical_or", np.logical_or),
    "Xor": _compare("core.ne", np.logical_xor),
    "Not": _unary("core.logical_not", np.logical_not), "Neg": _unary("core.neg", np.negative),
    "Abs": _unary("core.abs", np.abs), "Sqrt": _unary("core.sqrt", np.sqrt),
    "Reciprocal": _unary("core.reciprocal", np.reciprocal), "Exp": _unary("core.exp", np.exp),
    "Log": _unary("core.log", np.log), "Sin": _unary("core.sin", np.sin), "Cos": _unary("core.cos", np.cos),
    "Tanh": _unary("core.tanh", np.tanh), "Sigmoid": _unary("core.sigmoid", None),
    "Relu": _unary("core.relu", None), "Erf": _unary("core.erf", None),
    "Floor": _unary("core.floor", np.floor), "Round": _unary("core.round", np.round),
    "IsNaN": _unary("core.isnan", np.isnan),
    # contractions, reductions, normalisation, attention
    "MatMul": _matmul, "Gemm": _gemm,
    "Softmax": _softmax("core.softmax"), "LogSoftmax": _softmax("core.log_softmax"),
    "ReduceMean": _reduce("core.mean", np.mean), "ReduceSum": _reduce("core.sum", np.sum),
    "ReduceMax": _reduce("core.amax", np.max), "ReduceMin": _reduce("core.amin", np.min),
    "RMSNormalization": _rms_norm, "SimplifiedLayerNormalization": _rms_norm,
    "LayerNormalization": _layer_norm, "Gelu": _gelu,
    "Attention": _attention, "RotaryEmbedding": _rotary,
}


# --- the entry point -------------------------------------------------------------------------

def load_onnx(path: str | os.PathLike, *, dtype: DType | None = None) -> Graph:
    """Import an ONNX model; weights stay on disk until a backend loads them.

    `dtype` makes every float tensor (weights, activations, float inputs) compute in that type."""
    path = os.fspath(path)
    model = _read(path)
    cx = _Importer(path, model, dtype)
    try:
        graph = gs.import_onnx(model)
        graph.toposort()
    except Exception as e:
        raise OnnxImportError(f"{path}: onnx-graphsurgeon cannot read the graph: {e}") from e
    locs = {n.name: _loc(n) for n in model.graph.node}
    _bind_inputs(cx, model, graph)
    cx.graph_outputs = {o.name for o in graph.outputs}
    for node in tqdm(graph.nodes, desc=f"importing {os.path.basename(path)}", unit="node", disable=None):
        if id(node) not in cx.claimed:
            _convert(cx, node, locs.get(node.name) or node.name or None)
    outputs = []
    for o in graph.outputs:
        if o.name not in cx.tensors:
            raise OnnxImportError(f"{path}: graph output {o.name!r} is not computed by any node")
        outputs.append(cx.value(cx.tensors[o.name]))
    _sweep(cx.graph, outputs)
    return cx.b.build(*outputs)


def _read(path: str) -> Any:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such ONNX file")
    if os.path.isdir(path):
        raise OnnxImportError(f"{path} is a folder, not an ONNX file")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise OnnxImportError(f"{path} is not a readable ONNX model (corrupt or truncated?): {e}") from None
    if model.ir_version == 0 or not model.HasField("graph"):
        raise OnnxImportError(f"{path} is not an ONNX model (no IR version or graph in it)")
    return model


def _loc(node: Any) -> str | None:
    """The dynamo exporter's module path, spelled as the TorchScript exporter spells node names
    (`/m/model/layers.0/self_attn/q_proj/linear`), where the node carries one."""
    scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
    try:
        scopes = ast.literal_eval(scopes) if scopes else None
    except (ValueError, SyntaxError):
        return None
    if not scopes:
        return None
    parts, parent = [], ""
    for scope in scopes[1:] if scopes[0] == "" else scopes:
        parts.append(scope[len(parent) + 1:] if parent and scope.startswith(parent + ".") else scope)
        parent = scope
    return "/" + "/".join(parts)


def _bind_inputs(cx: _Importer, model: Any, graph: Any) -> None:
    inits = {t.name for t in model.graph.initializer}
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant):
            proto = t._values.tensor if hasattr(t._values, "tensor") else None  # unread TensorProto
            if proto is not None:
                s = _storage(proto, cx.model_dir, cx.path)
            else:
                s = TensorStorage(torch.from_numpy(np.ascontiguousarray(t.values)))
            cx.storage_names[s] = t.name
            cx.tensors[t.name] = OnnxTensor(t.name, s.type.with_dtype(cx.float_type(s.type.dtype)), storage=s)
    symbols: dict[str, str] = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = cx.onnx_type(tt.elem_type, f"input {vi.name!r}")
        shape = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                shape.append(d.dim_value)
            else:
                shape.append(_symbol(d.dim_param, symbols))
        name = vi.name if SIMPLE_NAME.match(vi.name) else cx.graph.fresh_name("input")
        cx.bind_value(vi.name, cx.b.input(name, TensorType(dtype, shape)))


def _symbol(dim_param: str, symbols: dict[str, str]) -> str:
    """A symbolic dim for an ONNX dim_param (kept when it is a usable name) or an unnamed dim."""
    if dim_param in symbols:
        return symbols[dim_param]
    used = set(symbols.values())
    try:
        name = canonical_dim(dim_param) if dim_param.isidentifier() and dim_param not in used else None
    except ValueError:  # a reserved word such as `f32`
        name = None
    if name is None:
        name = next(f"d{i}" for i in range(len(used) + 1) if f"d{i}" not in used)
    symbols[dim_param or f"unnamed {len(symbols)}"] = name
    return name


def _convert(cx: _Importer, node: Any, loc: str | None) -> None:
    where = f"{cx.path}: node {node.name!r} ({node.op})"
    if node.domain not in (None, "", "ai.onnx"):
        raise OnnxImportError(f"{where}: ops of domain {node.domain!r} are not supported; kiln imports "
                              f"standard ONNX ops (add an entry to ONNX_OPS in kiln/frontends/onnx.py)")
    lower = ONNX_OPS.get(node.op)
    if lower is None:
        raise OnnxImportError(f"{where}: ONNX op {node.op} has no lowering to kiln's IR; add an entry "
                              f"for {node.op!r} to ONNX_OPS in kiln/frontends/onnx.py")
    unknown = [i.name for i in node.inputs if i.name and i.name not in cx.tensors]
    if unknown:
        raise OnnxImportError(f"{where}: input {unknown[0]!r} is not produced by any earlier node")
    ins = [cx.tensors[i.name] if i.name else None for i in node.inputs]
    cx.b.loc = loc
    try:
        result = lower(cx, node, *ins)
    except OnnxImportError as e:
        raise OnnxImportError(f"{where}: {e}") from None
    except OpError as e:  # the IR refused the op: its message says why
        raise OnnxImportError(f"{where}: {e}") from None
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise OnnxImportError(f"{where}: {type(e).__name__}: {e}") from e
    finally:
        cx.b.loc = None
    results = list(result) if isinstance(result, (list, tuple)) else [result]
    for i, o in enumerate(node.outputs):
        if o.name:
            if i >= len(results) or results[i] is None:
                raise OnnxImportError(f"{where}: its output {i} ({o.name!r}) is not supported")
            cx.tensors[o.name] = _named(results[i], o.name)


def _named(t: OnnxTensor, name: str) -> OnnxTensor:
    if not t.name:
        t.name = name
    return t


def _sweep(graph: Graph, outputs: list[Value]) -> None:
    """Drop pure ops nobody uses (a lowering may leave one behind) and parameters left unused."""
    for op in reversed(list(graph.ops)):
        if op.opdef.is_pure and not any(graph.num_uses(r) or r in outputs for r in op.results):
            graph.erase_op(op)
    for name, v in list(graph.params.items()):
        if not graph.num_uses(v) and v not in outputs:
            graph.remove_param(name)
