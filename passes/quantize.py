"""The `quantize` pass: replace the float weight of each chosen `llm.linear` by a quantized
parameter and its scale, dequantized in the graph (`quant.dequantize`), and for FP8 also
quantize-dequantize the linear's input with a calibrated scale. A backend's fusion pass later
folds the Q/DQ pairs into quantized GEMMs; on the reference interpreter the graph runs as is.

    %0 = llm.linear(%x, @w)
becomes, for W8A16 (int8 weights, one scale per output channel):
    %1 = quant.dequantize(@w.int8, @w.scale) {axis=0}
    %0 = llm.linear(%x, %1)
for FP8 (e4m3 weights and activations, one calibrated scale each):
    %2 = quant.quantize(%x, @w.input_scale) {dtype=f8e4m3}
    %3 = quant.dequantize(%2, @w.input_scale)
    %1 = quant.dequantize(@w.fp8, @w.scale)
    %0 = llm.linear(%3, %1)
and for FP8_PER_CHANNEL the weight scale is per output channel and the activation scale is
computed at run time per token: amax(|x|, last dim) / 448.

The quantized weight and its scale are computed lazily from the original weight's storage, on
first load; the original parameter is dropped when nothing else reads it.
"""

from __future__ import annotations

import enum
import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..ir.builder import Builder
from ..ir.graph import Graph, Op, Value
from ..ir.ops.quant import _FP8_MAX, _INT_RANGE
from ..ir.storage import DerivedStorage, Storage, TensorStorage
from ..ir.types import DType, TensorType, dim_product
from .calibrate import Calibration, InputStats, load_calibration
from .manager import register_pass, remark


class QuantAlgo(enum.Enum):
    """The quantization algorithms kiln knows, by their short names (`quant="fp8"`)."""

    FP8 = "fp8"                          # e4m3 weights and activations, one scale per tensor
    FP8_PER_CHANNEL = "fp8-per-channel"  # e4m3 weights per output channel, activations per token
    W8A16 = "w8a16"                      # int8 weights per output channel, float activations
    W4A16_AWQ = "w4a16-awq"              # int4 weights in groups, AWQ's activation-aware scales
    INT8_SQ = "int8-sq"                  # SmoothQuant: int8 weights per channel, activations per token
    FP8_KV = "fp8-kv"                    # the KV cache in e4m3 (kv_cache_quant_algo)

    @classmethod
    def parse(cls, name: str | QuantAlgo) -> QuantAlgo:
        """`QuantAlgo` from its short name, case and `_`/`-` insensitive."""
        if isinstance(name, QuantAlgo):
            return name
        key = name.strip().lower().replace("_", "-")
        for a in cls:
            if a.value == key:
                return a
        raise ValueError(f"unknown quantization algorithm {name!r}; known: {', '.join(a.value for a in cls)}")


IMPLEMENTED = (QuantAlgo.W8A16, QuantAlgo.FP8, QuantAlgo.FP8_PER_CHANNEL)


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how; invalid combinations fail here, before any work is done."""

    quant_algo: QuantAlgo | str = QuantAlgo.W8A16
    kv_cache_quant_algo: QuantAlgo | str | None = None
    group_size: int = 128               # for w4a16-awq (not yet)
    smoothquant_val: float = 0.5        # for int8-sq (not yet)
    exclude_modules: tuple[str, ...] = ("lm_head", "*.lm_head")  # fnmatch on weight, its module, or op loc
    calibration: Calibration | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        algo = QuantAlgo.parse(self.quant_algo)
        object.__setattr__(self, "quant_algo", algo)
        object.__setattr__(self, "exclude_modules", tuple(self.exclude_modules))
        if algo is QuantAlgo.FP8_KV:
            raise ValueError("fp8-kv is a kv_cache_quant_algo, not a quant_algo for linears")
        if algo not in IMPLEMENTED:
            raise ValueError(f"quant_algo {algo.value} is not implemented yet; implemented: "
                                      f"{', '.join(a.value for a in IMPLEMENTED)}")
        if self.kv_cache_quant_algo is not None:
            kv = QuantAlgo.parse(self.kv_cache_quant_algo)
            if kv is not QuantAlgo.FP8_KV:
                raise ValueError(f"kv_cache_quant_algo must be fp8-kv, got {kv.value}")
            raise ValueError("kv_cache_quant_algo fp8-kv is not implemented yet; quantize only "
                                      "linears for now (kv_cache_quant_algo=None)")
        if self.group_size < 1:
            raise ValueError(f"group_size must be positive, got {self.group_size}")
        if algo is QuantAlgo.FP8 and self.calibration is None:
            raise ValueError("fp8 quantizes activations with calibrated scales: pass calibration= (from "
                             "kiln.passes.calibrate.calibrate), or calib=PATH to the quantize pass")

    def excludes(self, op: Op) -> str | None:
        """The exclude pattern that matches this linear (by weight name or loc), if any."""
        w = op.operands[1].name
        names = [w, w.removesuffix(".weight"), op.loc or ""]
        return next((p for p in self.exclude_modules if any(fnmatch.fnmatchcase(n, p) for n in names)), None)


# -- lazily computed quantized weights -----------------------------------------------------------

@dataclass(eq=False)
class AmaxScaleStorage(Storage):
    """amax(|w|) / qmax, over the whole tensor or per slice along `axis`, in `type`'s dtype; an
    all-zero slice gets scale 1 (its quantized values are zeros either way)."""

    source: Storage
    qmax: float
    axis: int | None
    type: TensorType

    def load(self) -> torch.Tensor:
        return weight_scale(self.source.load(), self.qmax, self.axis).to(self.type.dtype.torch)

    def describe(self) -> str:
        where = "per tensor" if self.axis is None else f"along axis {self.axis}"
        return f"amax/{self.qmax:g} {where} of ({self.source.describe()})"


def weight_scale(w: torch.Tensor, qmax: float, axis: int | None) -> torch.Tensor:
    """Symmetric scale amax(|w|)/qmax in f32, per tensor (axis None) or per index of `axis`."""
    a = w.detach().abs().float()
    amax = a.amax() if axis is None else a.movedim(axis, 0).reshape(w.shape[axis], -1).amax(1)
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


def _qmax(dtype: DType) -> float:
    return _FP8_MAX[dtype] if dtype in _FP8_MAX else float(_INT_RANGE[dtype][1])


# -- the rewrite ---------------------------------------------------------------------------------

_PLAN = {QuantAlgo.W8A16: (DType.i8, 0, "int8"), QuantAlgo.FP8: (DType.f8e4m3, None, "fp8"),
         QuantAlgo.FP8_PER_CHANNEL: (DType.f8e4m3, 0, "fp8")}
"""algo -> (weight dtype, scale axis of the [out, in] weight or None per tensor, name suffix)."""


def _fresh_param(graph: Graph, base: str) -> str:
    name, n = base, 1
    while name in graph.params:
        name, n = f"{base}.{n}", n + 1
    return name


def _skip_reason(op: Op, config: QuantConfig) -> str | None:
    w = op.operands[1]
    where = f"linear at {op.results[0].ref}" + (f" ({op.loc})" if op.loc else "")
    if not w.is_param:
        return f"{where} is not quantized: its weight {w.ref} is computed, not a parameter"
    if w.storage is None:
        return f"{where} is not quantized: {w.ref} has no data to quantize"
    if not w.type.dtype.is_float or w.type.dtype in _FP8_MAX:
        return f"{where} is not quantized: {w.ref} is {w.type.dtype}, not a 16/32-bit float"
    if not w.type.is_static or w.type.rank != 2:
        return f"{where} is not quantized: {w.ref} is {w.type}, not a static [out, in] matrix"
    pattern = config.excludes(op)
    if pattern is not None:
        return f"{where} is not quantized: excluded by {pattern!r}"
    if config.quant_algo is QuantAlgo.FP8 and w.name not in config.calibration:
        return f"{where} is not quantized: the calibration has no input scale for {w.ref}"
    return None


def _quantized_weight(graph: Graph, w: Value, dtype: DType, axis: int | None, suffix: str) -> tuple[Value, Value]:
    scale_type = TensorType(w.type.dtype, () if axis is None else (w.type.shape[axis],))
    scale_storage = AmaxScaleStorage(w.storage, _qmax(dtype), axis, scale_type)
    attrs = {"dtype": dtype, "axis": axis, "group_size": None}
    q_type = w.type.with_dtype(dtype)
    q = graph.add_param(_fresh_param(graph, f"{w.name}.{suffix}"), q_type,
                        DerivedStorage("quant.quantize", [w.storage, scale_storage], attrs, q_type))
    return q, graph.add_param(_fresh_param(graph, w.name + ".scale"), scale_type, scale_storage)


def _rewrite(graph: Graph, op: Op, config: QuantConfig, done: dict[str, tuple[Value, Value]]) -> None:
    dtype, axis, suffix = _PLAN[config.quant_algo]
    x, w = op.operands[0], op.operands[1]
    if w.name not in done:  # a weight read by several linears is quantized once
        done[w.name] = _quantized_weight(graph, w, dtype, axis, suffix)
    q, scale = done[w.name]
    b = Builder(graph, before=op, loc=op.loc)
    if config.quant_algo is QuantAlgo.FP8:
        stats: InputStats = config.calibration[w.name]
        s = weight_scale(torch.tensor(stats.amax), _qmax(DType.f8e4m3), None).to(x.type.dtype.torch)
        x_scale = graph.add_param(_fresh_param(graph, w.name + ".input_scale"), storage=TensorStorage(s))
        x = b.quant.dequantize(b.quant.quantize(x, x_scale, dtype=DType.f8e4m3), x_scale)
    elif config.quant_algo is QuantAlgo.FP8_PER_CHANNEL:
        x = _per_token_fp8(b, x)
    weight = b.quant.dequantize(q, scale, **({} if axis is None else {"axis": axis}))
    graph.set_operands(op, (x, weight, *op.operands[2:]))
    if graph.num_uses(w) == 0 and w not in graph.outputs:
        graph.remove_param(w.name)


def _per_token_fp8(b: Builder, x: Value) -> Value:
    """Quantize-dequantize x to e4m3 with one dynamic scale per token (row of the last dim)."""
    k, dt = x.type.shape[-1], x.type.dtype
    rows = x if x.type.rank == 2 else b.core.reshape(x, shape=[dim_product(x.type.shape[:-1]), k])
    amax = b.core.clamp(b.core.amax(b.core.abs(rows), dims=[1], keepdim=False), min=_TINY_AMAX)
    scale = b.core.div(amax, b.constant(_FP8_MAX[DType.f8e4m3], dt))
    q = b.quant.quantize(rows, scale, dtype=DType.f8e4m3, axis=0)
    back = b.quant.dequantize(q, scale, axis=0)
    return back if rows is x else b.core.reshape(back, shape=list(x.type.shape))


_TINY_AMAX = 1e-6   # the floor of a token's amax, so that an all-zero token does not divide by zero


def quantize_graph(graph: Graph, config: QuantConfig) -> int:
    """Quantize every eligible linear of `graph` in place; returns how many were quantized."""
    count, quantized = 0, {}
    for op in [op for op in graph.ops if op.name == "llm.linear"]:
        why = _skip_reason(op, config)
        if why is not None:
            remark(why)
            continue
        _rewrite(graph, op, config, quantized)
        count += 1
    return count


@register_pass("quantize")
def quantize(graph: Graph, *, algo: str = "w8a16", exclude: str = "lm_head|*.lm_head", calib: str = "") -> int:
    """Quantize linears (algo=w8a16|fp8|fp8-per-channel); exclude: '|'-separated fnmatch patterns.

    calib is a safetensors file of input amax (kiln.passes.calibrate.save_calibration), needed by fp8."""
    config = QuantConfig(algo, exclude_modules=tuple(p for p in exclude.split("|") if p),
                         calibration=load_calibration(calib) if calib else None)
    return quantize_graph(graph, config)


def quantize_with(graph: Graph, algo: QuantAlgo | str, calibration: Mapping[str, InputStats] | None = None,
                  **options) -> int:
    """Shorthand: quantize_graph(graph, QuantConfig(algo, calibration=..., **options))."""
    return quantize_graph(graph, QuantConfig(algo, calibration=dict(calibration) if calibration else None,
                                             **options))
