"""From a `torch.export` program to kiln's IR, through one table: `ATEN_OPS` maps each aten op
(`"aten.linear.default"`) to a function that emits IR ops with a Builder. Symbolic sizes
(`aten.sym_size`, SymInt arithmetic) become symbolic dims, so a view to `[1, T, -1, 64]` is a
`core.reshape` whose shape mentions `T`; torch's type promotion is made explicit with casts.

Adding an op is one entry:

    @aten("aten.silu.default")
    def _(cx, x):
        return cx.b.core.silu(x)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.fx

from ..ir.builder import Builder
from ..ir.graph import Graph, Value
from ..ir.storage import Storage, TensorStorage
from ..ir.types import DType, Dim, TensorType, dim_add, dim_div, dim_mul, dim_sub

Converter = Callable[..., Any]
ATEN_OPS: dict[str, Converter] = {}


def aten(*names: str) -> Callable[[Converter], Converter]:
    """Register a converter for one or more aten ops (by `str(node.target)`)."""
    def register(fn: Converter) -> Converter:
        for n in names:
            if n in ATEN_OPS:
                raise ValueError(f"{n} already has a converter")
            ATEN_OPS[n] = fn
        return fn
    return register


class UnsupportedOpError(NotImplementedError):
    """An aten op with no entry in ATEN_OPS; the message says where it came from and what to do."""


class ConversionError(ValueError):
    """An aten op whose arguments the IR cannot express (the message names the node and module)."""


@dataclass
class AtenContext:
    """What a converter gets: the builder, and helpers for constants and type promotion."""

    b: Builder
    node: torch.fx.Node | None = None
    strip: int = 1   # leading FQN components that name the tracing wrapper, not the model

    def constant(self, value: float | int | bool, dtype: DType) -> Value:
        return self.b.constant(float(value) if dtype.is_float else value, dtype)

    def promote(self, *xs: Value | float | int | bool, float_result: bool = False) -> list[Value]:
        """torch's type promotion of tensors and Python scalars, as explicit casts and constants."""
        samples = [torch.empty((1,) * min(x.type.rank, 1), dtype=x.type.dtype.torch) if isinstance(x, Value) else x
                   for x in xs]
        dtype = samples[0] if not isinstance(samples[0], torch.Tensor) else samples[0].dtype
        result = torch.result_type(samples[0], samples[1]) if len(samples) > 1 else dtype
        for s in samples[2:]:
            result = torch.promote_types(result, torch.result_type(s, s) if not isinstance(s, torch.Tensor) else s.dtype)
        if float_result and not result.is_floating_point:
            result = torch.get_default_dtype()
        target = DType.from_torch(result)
        return [self.cast(x, target) if isinstance(x, Value) else self.constant(x, target) for x in xs]

    def cast(self, x: Value, dtype: DType) -> Value:
        return x if x.type.dtype is dtype else self.b.core.cast(x, dtype=dtype)

    def fail(self, message: str) -> ConversionError:
        return ConversionError(f"{message} (at {describe_node(self.node, self.strip)})")


def describe_node(node: torch.fx.Node | None, strip: int = 1) -> str:
    if node is None:
        return "an unknown node"
    return f"{node.target} in {module_path(node, strip) or 'the top-level forward'}"


def module_path(node: torch.fx.Node, strip: int = 1) -> str | None:
    """The HF module a node came from ("model.layers.0.self_attn"), without the wrapper's prefix."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    parts = path.split(".")[strip:]
    return ".".join(parts) or None


# --- conversion driver -------------------------------------------------------------------------

def convert(ep: torch.export.ExportedProgram, *, inputs: Sequence[tuple[str, TensorType]],
            weights: Mapping[str, Storage], name: str = "main", strip: int = 1,
            progress: Callable[[Iterable], Iterable] = lambda it: it) -> Graph:
    """Convert an exported program. `inputs` names and types the user inputs (symbolic dims by
    the names the caller chose); `weights` maps parameter and buffer names (with the first
    `strip` components of their FQN removed) to storage."""
    graph = Graph(name)
    b = Builder(graph)
    cx = AtenContext(b, strip=strip)
    env: dict[torch.fx.Node, Any] = {}
    sig = ep.graph_signature
    lifted = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    user = [n for n in placeholders if n.name not in lifted]
    if len(user) != len(inputs):
        raise ValueError(f"the program takes {len(user)} inputs, {len(inputs)} were described")
    symbols: dict[str, Dim] = {}
    shared: dict[tuple[int, TensorType], Value] = {}
    for node, (input_name, t) in zip(user, inputs):
        val = node.meta["val"]
        for d, s in zip(t.shape, val.shape):
            if isinstance(s, torch.SymInt):
                symbols[str(s.node.expr)] = d
        env[node] = b.input(input_name, t)
    for node in placeholders:
        if node.name not in lifted:
            continue
        fqn = lifted[node.name]
        key = ".".join(fqn.split(".")[strip:])
        if fqn in ep.constants and key not in weights:
            storage: Storage = TensorStorage(ep.constants[fqn].detach())
        elif key in weights:
            storage = weights[key]
        else:
            raise KeyError(f"no data for {key!r}: the checkpoint has no tensor of that name")
        want = TensorType(DType.from_torch(node.meta["val"].dtype), tuple(node.meta["val"].shape))
        if (id(storage), want) in shared:  # tied weights: one parameter, used twice
            env[node] = shared[id(storage), want]
            continue
        env[node] = shared[id(storage), want] = b.param(
            key, want, storage if storage.type == want else _cast_storage(key, storage, want))
    for node in progress([n for n in ep.graph.nodes if n.op == "call_function"]):
        cx.node = node
        b.loc = module_path(node, strip)
        env[node] = _convert_node(cx, node, env, symbols)
    out = [n for n in ep.graph.nodes if n.op == "output"][0]
    results = [env[a] for a in torch.fx.node.map_arg(out.args[0], lambda n: n) if a is not None]
    graph.set_outputs(results)
    return graph


def _cast_storage(key: str, storage: Storage, want: TensorType) -> Storage:
    from ..ir.storage import DerivedStorage

    if storage.type.shape != want.shape:
        raise ValueError(f"weight {key!r} has shape {list(storage.type.shape)} in the checkpoint "
                         f"({storage.describe()}) but the model's config makes it {list(want.shape)}")
    return DerivedStorage("core.cast", [storage], {"dtype": want.dtype}, want)


def _key(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__name__', target)}"


def _convert_node(cx: AtenContext, node: torch.fx.Node, env: dict, symbols: dict[str, Dim]) -> Any:
    key = _key(node.target)
    fn = ATEN_OPS.get(key)
    if fn is None:
        raise UnsupportedOpError(
            f"{key} (from {module_path(node, cx.strip) or 'the top-level forward'}) has no conversion to kiln's IR; "
            f"add an entry to ATEN_OPS in kiln/frontends/aten.py (one @aten(\"{key}\") function), "
            f"declaring any missing op in kiln/ir/ops")
    args = torch.fx.node.map_aggregate(node.args, lambda a: _arg(a, env, symbols))
    kwargs = torch.fx.node.map_aggregate(node.kwargs, lambda a: _arg(a, env, symbols))
    try:
        return fn(cx, *args, **kwargs)
    except (ConversionError, UnsupportedOpError):
        raise
    except (ValueError, TypeError, KeyError) as e:
        raise ConversionError(f"cannot convert {describe_node(node, cx.strip)}: {e}") from e


def _arg(a: Any, env: dict, symbols: dict[str, Dim]) -> Any:
    if isinstance(a, torch.fx.Node):
        return env[a]
    if isinstance(a, torch.SymInt):
        return symbols.get(str(a.node.expr), str(a.node.expr))
    return a


# --- the table ---------------------------------------------------------------------------------

_IDENTITY = ("aten.alias.default", "aten.contiguous.default", "aten.clone.default", "aten.detach.default",
             "aten.lift_fresh_copy.default", "aten.dropout.default")


@aten(*_IDENTITY)
def _identity(cx, x, *_, **__):
    return x


@aten("aten._assert_tensor_metadata.default", "aten._assert_scalar.default", "aten.sym_constrain_range_for_size.default")
def _assertion(cx, *_, **__):
    return None


@aten("aten.to.dtype", "aten.to.dtype_layout", "aten._to_copy.default", "aten.type_as.default")
def _to(cx, x, dtype=None, *rest, **kwargs):
    dtype = kwargs.get("dtype", dtype)
    if isinstance(dtype, Value):  # type_as(x, other)
        dtype = dtype.type.dtype.torch
    if not isinstance(dtype, torch.dtype):
        return x
    return cx.cast(x, DType.from_torch(dtype))


@aten("aten.to.device")
def _to_device(cx, x, device=None, dtype=None, *rest, **kwargs):
    """x.to(device, dtype): the device is the backend's business, the dtype is a cast (export folds
    `.float().to(x.device)` into this one op)."""
    return _to(cx, x, kwargs.get("dtype", dtype))


@aten("aten.embedding.default")
def _embedding(cx, weight, ids, *_):
    return cx.b.llm.embedding(weight, ids)


@aten("aten.linear.default")
def _linear(cx, x, weight, bias=None):
    return cx.b.llm.linear(x, weight, *([bias] if bias is not None else []))


def _binary(op: str, float_result: bool = False):
    def convert(cx, a, b, *, alpha=1):
        if alpha != 1:
            b = b * alpha if not isinstance(b, Value) else cx.b.core.mul(*cx.promote(b, alpha))
        if not isinstance(a, Value) and not isinstance(b, Value):
            raise cx.fail("an op on two Python scalars")
        return cx.b.op(op, *cx.promote(a, b, float_result=float_result))
    return convert


for _names, _op, _float in [
    (("aten.add.Tensor", "aten.add.Scalar"), "core.add", False),
    (("aten.sub.Tensor", "aten.sub.Scalar"), "core.sub", False),
    (("aten.mul.Tensor", "aten.mul.Scalar"), "core.mul", False),
    (("aten.div.Tensor", "aten.div.Scalar"), "core.div", True),
    (("aten.pow.Tensor_Scalar", "aten.pow.Tensor_Tensor"), "core.pow", False),
    (("aten.maximum.default",), "core.maximum", False),
    (("aten.minimum.default",), "core.minimum", False),
    (("aten.eq.Tensor", "aten.eq.Scalar"), "core.eq", False),
    (("aten.ne.Tensor", "aten.ne.Scalar"), "core.ne", False),
    (("aten.lt.Tensor", "aten.lt.Scalar"), "core.lt", False),
    (("aten.le.Tensor", "aten.le.Scalar"), "core.le", False),
    (("aten.gt.Tensor", "aten.gt.Scalar"), "core.gt", False),
    (("aten.ge.Tensor", "aten.ge.Scalar"), "core.ge", False),
    (("aten.__and__.Tensor", "aten.logical_and.default", "aten.bitwise_and.Tensor"), "core.logical_and", False),
    (("aten.__or__.Tensor", "aten.logical_or.default", "aten.bitwise_or.Tensor"), "core.logical_or", False),
]:
    aten(*_names)(_binary(_op, _float))


@aten("aten.rsub.Scalar", "aten.rsub.Tensor")
def _rsub(cx, a, b, alpha=1):
    return _binary("core.sub")(cx, b, a if alpha == 1 else a * alpha)


_UNARY = {
    "neg": "neg", "abs": "abs", "exp": "exp", "log": "log", "sqrt": "sqrt", "rsqrt": "rsqrt", "reciprocal": "reciprocal",
    "tanh": "tanh", "sigmoid": "sigmoid", "silu": "silu", "relu": "relu", "erf": "erf", "sin": "sin", "cos": "cos",
    "floor": "floor", "round": "round", "logical_not": "logical_not", "bitwise_not": "logical_not",
}


def _unary(op: str, float_only: bool):
    def convert(cx, x):
        if float_only and not x.type.dtype.is_float:
            x = cx.cast(x, DType.from_torch(torch.get_default_dtype()))
        return cx.b.op(f"core.{op}", x)
    return convert


for _aten_name, _op in _UNARY.items():
    aten(f"aten.{_aten_name}.default")(_unary(_op, _op in {"exp", "log", "sqrt", "rsqrt", "reciprocal", "tanh",
                                                           "sigmoid", "silu", "erf", "sin", "cos"}))


@aten("aten.gelu.default")
def _gelu(cx, x, approximate="none"):
    return cx.b.core.gelu(x, approximate=approximate)


@aten("aten.clamp.default")
def _clamp(cx, x, min=None, max=None):
    return cx.b.core.clamp(x, min=min, max=max)


@aten("aten.where.self")
def _where(cx, cond, a, b):
    a, b = cx.promote(a, b)
    return cx.b.core.where(cond, a, b)


@aten("aten.masked_fill.Scalar", "aten.masked_fill.Tensor")
def _masked_fill(cx, x, mask, value):
    (v,) = [cx.cast(value, x.type.dtype)] if isinstance(value, Value) else [cx.constant(value, x.type.dtype)]
    return cx.b.core.where(mask, v, x)


# --- reductions and normalisation ----------------------------------------------------------------

def _reduction(op: str):
    def convert(cx, x, dims=None, keepdim=False, *, dtype=None):
        if dtype is not None:
            x = cx.cast(x, DType.from_torch(dtype))
        dims = () if dims is None else (dims,) if isinstance(dims, int) else tuple(dims)
        return cx.b.op(op, x, dims=dims, keepdim=keepdim)
    return convert


aten("aten.mean.dim", "aten.mean.default")(_reduction("core.mean"))
aten("aten.sum.dim_IntList", "aten.sum.default")(_reduction("core.sum"))
aten("aten.amax.default")(_reduction("core.amax"))
aten("aten.amin.default")(_reduction("core.amin"))


@aten("aten.argmax.default")
def _argmax(cx, x, dim=None, keepdim=False):
    if dim is None:
        raise cx.fail("argmax over all dims")
    return cx.b.core.argmax(x, dim=dim, keepdim=keepdim)


@aten("aten.softmax.int", "aten._softmax.default", "aten._safe_softmax.default")
def _softmax(cx, x, dim, dtype_or_half=None):
    if isinstance(dtype_or_half, torch.dtype):
        x = cx.cast(x, DType.from_torch(dtype_or_half))
    return cx.b.core.softmax(x, dim=dim)


@aten("aten.log_softmax.int", "aten._log_softmax.default")
def _log_softmax(cx, x, dim, dtype_or_half=None):
    if isinstance(dtype_or_half, torch.dtype):
        x = cx.cast(x, DType.from_torch(dtype_or_half))
    return cx.b.core.log_softmax(x, dim=dim)


# --- shapes ------------------------------------------------------------------------------------

@aten("aten.sym_size.int")
def _sym_size(cx, x, dim):
    return x.type.shape[dim]


def _dim_op(fn):
    def convert(cx, a, b):
        if isinstance(a, Value) or isinstance(b, Value):
            raise cx.fail("a size computation on a tensor")
        return fn(a, b)
    return convert


def _guard(cx, *_):
    """Comparisons and min/max of sizes only feed export's runtime guards, which kiln drops: the
    IR checks every op's type against the actual shapes instead."""
    return None


aten("_operator.eq", "_operator.ne", "_operator.lt", "_operator.le", "_operator.gt", "_operator.ge",
     "torch.sym_min", "torch.sym_max", "torch.sym_not", "_operator.and_", "_operator.or_")(_guard)
aten("_operator.mul")(_dim_op(dim_mul))
aten("_operator.add")(_dim_op(dim_add))
aten("_operator.sub")(_dim_op(dim_sub))
aten("_operator.floordiv")(_dim_op(dim_div))


@aten("_operator.getitem")
def _getitem(cx, seq, index):
    return seq[index]


@aten("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default")
def _reshape(cx, x, shape):
    return cx.b.core.reshape(x, shape=list(shape))


@aten("aten.unsqueeze.default")
def _unsqueeze(cx, x, dim):
    d = dim % (x.type.rank + 1)
    shape = list(x.type.shape)
    shape.insert(d, 1)
    return cx.b.core.reshape(x, shape=shape)


@aten("aten.squeeze.dim", "aten.squeeze.dims", "aten.squeeze.default")
def _squeeze(cx, x, dims=None):
    dims = range(x.type.rank) if dims is None else [dims] if isinstance(dims, int) else dims
    drop = {d % x.type.rank for d in dims if x.type.shape[d % x.type.rank] == 1}
    return cx.b.core.reshape(x, shape=[s for i, s in enumerate(x.type.shape) if i not in drop])


@aten("aten.flatten.using_ints")
def _flatten(cx, x, start=0, end=-1):
    start, end = start % x.type.rank, end % x.type.rank
    shape = [*x.type.shape[:start], -1, *x.type.shape[end + 1:]]
    return cx.b.core.reshape(x, shape=shape)


@aten("aten.transpose.int")
def _transpose(cx, x, d0, d1):
    dims = list(range(x.type.rank))
    d0, d1 = d0 % x.type.rank, d1 % x.type.rank
    dims[d0], dims[d1] = dims[d1], dims[d0]
    return cx.b.core.permute(x, dims=dims)


@aten("aten.t.default")
def _t(cx, x):
    return cx.b.core.permute(x, dims=[1, 0]) if x.type.rank == 2 else x


@aten("aten.permute.default")
def _permute(cx, x, dims):
    return cx.b.core.permute(x, dims=[d % x.type.rank for d in dims])


@aten("aten.expand.default")
def _expand(cx, x, shape, *, implicit=False):
    return cx.b.core.expand(x, shape=list(shape))


@aten("aten.slice.Tensor")
def _slice(cx, x, dim=0, start=None, end=None, step=1):
    start = 0 if start is None else start
    return cx.b.core.slice(x, dim=dim % x.type.rank, start=start, end=end, step=step)


@aten("aten.select.int")
def _select(cx, x, dim, index):
    d = dim % x.type.rank
    one = cx.b.core.slice(x, dim=d, start=index, end=None if index == -1 else index + 1)
    return cx.b.core.reshape(one, shape=[s for i, s in enumerate(x.type.shape) if i != d])


def _split_at(cx, x, sizes: Sequence[Dim], dim: int) -> list[Value]:
    d, start, parts = dim % x.type.rank, 0, []
    for size in sizes:
        end = dim_add(start, size)
        parts.append(cx.b.core.slice(x, dim=d, start=start, end=end))
        start = end
    return parts


@aten("aten.split.Tensor", "aten.split_with_sizes.default")
def _split(cx, x, size, dim=0):
    if isinstance(size, (list, tuple)):
        return _split_at(cx, x, size, dim)
    total = x.type.shape[dim % x.type.rank]
    if not isinstance(total, int) or not isinstance(size, int):
        raise cx.fail(f"a split of symbolic dim {total} into pieces of {size}")
    return _split_at(cx, x, [min(size, total - i) for i in range(0, total, size)], dim)


@aten("aten.chunk.default")
def _chunk(cx, x, chunks, dim=0):
    total = x.type.shape[dim % x.type.rank]
    if not isinstance(total, int):
        raise cx.fail(f"chunks of symbolic dim {total}")
    size = -(-total // chunks)
    return _split(cx, x, size, dim)


@aten("aten.layer_norm.default")
def _layer_norm(cx, x, shape, weight=None, bias=None, eps=1e-5, *_):
    if len(shape) != 1:
        raise cx.fail(f"layer_norm over {len(shape)} dims (only the last dim is supported)")
    if weight is None and bias is not None:
        weight = cx.b.constant(1.0, x.type.dtype, (x.type.shape[-1],))
    return cx.b.llm.layer_norm(x, *[p for p in (weight, bias) if p is not None], eps=eps)


@aten("aten.cat.default")
def _cat(cx, xs, dim=0):
    xs = cx.promote(*xs) if len({x.type.dtype for x in xs}) > 1 else list(xs)
    return cx.b.core.concat(*xs, dim=dim % xs[0].type.rank)


@aten("aten.arange.default", "aten.arange.start", "aten.arange.start_step")
def _arange(cx, *args, dtype=None, **_):
    start, end, step = (0, args[0], 1) if len(args) == 1 else (*args, 1)[:3]
    if dtype is None:
        dtype = torch.int64 if all(isinstance(a, (int, str)) for a in (start, end, step)) else torch.get_default_dtype()
    ramp = cx.b.core.arange(end=end, start=start, step=step, dtype=DType.i64)
    return cx.cast(ramp, DType.from_torch(dtype))


@aten("aten.full.default", "aten.new_full.default")
def _full(cx, *args, dtype=None, **_):
    like, (shape, value) = (args[0], args[1:]) if isinstance(args[0], Value) else (None, args)
    dtype = DType.from_torch(dtype) if dtype is not None else like.type.dtype if like is not None else \
        DType.from_torch(torch.get_default_dtype())
    return cx.b.constant(value, dtype, tuple(shape))


def _fill(value):
    def convert(cx, *args, dtype=None, **_):
        like, shape = (args[0], args[1]) if args and isinstance(args[0], Value) else (None, args[0])
        d = DType.from_torch(dtype) if dtype is not None else like.type.dtype if like is not None else \
            DType.from_torch(torch.get_default_dtype())
        return cx.b.constant(value if d is not DType.bool else bool(value), d, tuple(shape))
    return convert


aten("aten.ones.default", "aten.new_ones.default")(_fill(1))
aten("aten.zeros.default", "aten.new_zeros.default")(_fill(0))


@aten("aten.ones_like.default", "aten.zeros_like.default", "aten.full_like.default")
def _like(cx, x, *args, dtype=None, **_):
    value = 1 if cx.node.target is torch.ops.aten.ones_like.default else 0 if not args else args[0]
    d = DType.from_torch(dtype) if dtype is not None else x.type.dtype
    return cx.b.constant(value, d, x.type.shape)


# --- linear algebra and attention ----------------------------------------------------------------

@aten("aten.matmul.default", "aten.bmm.default", "aten.mm.default")
def _matmul(cx, a, b):
    return cx.b.core.matmul(a, b)


@aten("aten.scaled_dot_product_attention.default")
def _sdpa(cx, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False):
    if dropout_p:
        raise cx.fail("attention with dropout (trace the model in eval mode)")
    return cx.b.llm.attention(q, k, v, *([attn_mask] if attn_mask is not None else []), causal=bool(is_causal),
                              scale=scale)

