"""What to quantize (`QuantAlgo`, `QuantConfig`) and the `quantize` pass, which replaces the float
weight of each chosen `llm.linear` by a quantized parameter with its scale (and zero point),
dequantized in the graph (`quant.dequantize`), quantize-dequantizes the linear's input where the
algorithm quantizes activations, and puts the KV cache through e4m3 for FP8 KV. A backend's
fusion pass (`fuse-quantized-linear`) later folds the Q/DQ pairs into quantized GEMMs; on the
reference interpreter the Q/DQ graph runs as it is and is the numerics oracle.

    %0 = llm.linear(%x, @w)
becomes, for W8A16 (int8 weights, one scale per output channel):
    %1 = quant.dequantize(@w.int8, @w.scale) {axis=0}
    %0 = llm.linear(%x, %1)
for W4A16 (int4 in groups of G input channels, asymmetric, AutoAWQ's rounding):
    %1 = quant.dequantize(@w.int4, @w.scale, @w.zero) {axis=1, group_size=G}
for FP8 (e4m3 weights and activations, one calibrated scale each):
    %2 = quant.quantize(%x, @w.input_scale) {dtype=f8e4m3}
    %3 = quant.dequantize(%2, @w.input_scale)
    %1 = quant.dequantize(@w.fp8, @w.scale)
and for FP8_PER_CHANNEL and W8A8_SQ the weight scale is per output channel and the activation
scale is computed at run time per token: amax(|x|, last dim) / 448 (or / 127 for int8).
LLM.int8() splits the linear first (passes/llm_int8.py). FP8 KV puts the k and v operands of each
`llm.attention` through e4m3 with a calibrated scale per tensor; the kv-cache pass turns that
into an e4m3 cache.

The quantized weight and its scale are computed lazily from the original weight's storage, on
first load; the original parameter is dropped when nothing else reads it.
"""

from __future__ import annotations

import enum
import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from ..ir.builder import Builder
from ..ir.graph import Graph, Op, Value
from ..ir.ops import quant as quant_ops
from ..ir.ops.quant import _FP8_MAX, per_token_qdq, qmax, static_qdq
from ..ir.storage import DerivedStorage, Storage, TensorStorage
from ..ir.types import DType, TensorType
from .calibrate import (
    Calibration,
    InputStats,
    attach_calibration,
    attached_calibration,
    load_calibration,
)
from .gptq import WEIGHT_ROUNDINGS, GptqStorage, sweep_source
from .manager import PassManager, register_pass, remark


class QuantAlgo(enum.Enum):
    """The quantization algorithms kiln knows, by their short names (`quant="fp8"`)."""

    FP8 = "fp8"                          # e4m3 weights and activations, one scale per tensor (activations calibrated)
    FP8_PER_CHANNEL = "fp8-per-channel"  # e4m3 weights per output channel, activations per token at run time
    W8A8_SQ = "w8a8-sq"                  # SmoothQuant: int8 weights per channel, activations per token
    W4A16_AWQ = "w4a16-awq"              # int4 weights in groups, after AWQ's activation-aware scales and clipping
    W4A16 = "w4a16"                      # int4 weights in groups, plain round to nearest (AWQ's baseline)
    W8A16 = "w8a16"                      # int8 weights per output channel, float activations
    LLM_INT8 = "llm.int8"                # LLM.int8(): vector-wise int8, outlier input features kept in float
    FP8_KV = "fp8-kv"                    # the KV cache in e4m3 (a kv_cache_quant_algo)

    @classmethod
    def parse(cls, name: str | QuantAlgo) -> QuantAlgo:
        """`QuantAlgo` from its short name or a common alias, case and `_`/`-` insensitive."""
        if isinstance(name, QuantAlgo):
            return name
        key = name.strip().lower().replace("_", "-")
        for a in cls:
            if a.value == key:
                return a
        if key in _ALIASES:
            return _ALIASES[key]
        raise ValueError(f"unknown quantization algorithm {name!r}; known: {', '.join(a.value for a in cls)} "
                         f"(also {', '.join(sorted(_ALIASES))})")


_ALIASES = {
    "int8-sq": QuantAlgo.W8A8_SQ, "w8a8-sq-per-channel": QuantAlgo.W8A8_SQ, "smoothquant": QuantAlgo.W8A8_SQ,
    "int4-awq": QuantAlgo.W4A16_AWQ, "awq": QuantAlgo.W4A16_AWQ, "int4-wo": QuantAlgo.W4A16,
    "int8-wo": QuantAlgo.W8A16, "llm-int8": QuantAlgo.LLM_INT8, "fp8-kv": QuantAlgo.FP8_KV, "kv-fp8": QuantAlgo.FP8_KV,
    "fp8-per-channel-per-token": QuantAlgo.FP8_PER_CHANNEL,
}
"""Other spellings (TensorRT-LLM's, ModelOpt's, the issue's `int8_sq` / `int4_awq` / `int8_wo` / `fp8_kv`)."""


@dataclass(frozen=True)
class Scheme:
    """What an algorithm does to one linear: the weight's dtype and scale granularity, and whether
    and how the activation is quantized."""

    weight: DType
    granularity: str               # "tensor", "channel" (per output channel) or "group" (along K)
    activation: DType | None       # None: the activation stays float
    per_token: bool = False        # activation scales computed at run time per token (else calibrated per tensor)


SCHEMES: dict[QuantAlgo, Scheme] = {
    QuantAlgo.W8A16: Scheme(DType.i8, "channel", None),
    QuantAlgo.W4A16: Scheme(DType.i4, "group", None),
    QuantAlgo.W4A16_AWQ: Scheme(DType.i4, "group", None),
    QuantAlgo.FP8: Scheme(DType.f8e4m3, "tensor", DType.f8e4m3),
    QuantAlgo.FP8_PER_CHANNEL: Scheme(DType.f8e4m3, "channel", DType.f8e4m3, per_token=True),
    QuantAlgo.W8A8_SQ: Scheme(DType.i8, "channel", DType.i8, per_token=True),
    QuantAlgo.LLM_INT8: Scheme(DType.i8, "channel", DType.i8, per_token=True),
}
"""How each algorithm quantizes a linear (LLM.int8() applies its scheme to the inlier part)."""

LM_HEAD_ALGOS = (QuantAlgo.W8A16, QuantAlgo.W4A16, QuantAlgo.FP8_PER_CHANNEL, QuantAlgo.FP8)
"""What `QuantConfig.lm_head` may be: algorithms that need nothing but the weight (and, for fp8, the
calibrated |x| max of the lm_head's input); smoothing and AWQ fold scales into a norm the lm_head
does not own alone."""
LM_HEAD_PATTERNS = ("lm_head", "*.lm_head")
EMBEDDING_FORMATS = ("int8",)
"""What `QuantConfig.embedding` may be (None keeps the table float): int8 with one scale per row."""
EMBEDDING_SCHEME = Scheme(DType.i8, "channel", None)

_SUFFIX = {DType.i8: "int8", DType.i4: "int4", DType.f8e4m3: "fp8"}
_FP8_MIN_CAPABILITY = (8, 9)


_NOT_SAVED = {"calibration", "calib_tokens"}
"""QuantConfig fields kiln.json does not keep: run-time inputs of calibration."""


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how; invalid combinations fail here, before any work is done."""

    quant_algo: QuantAlgo | str | None = QuantAlgo.W8A16
    kv_cache_quant_algo: QuantAlgo | str | None = None
    group_size: int = 128               # int4: input channels per scale
    smoothquant_val: float = 0.5        # SmoothQuant's migration strength alpha
    exclude_modules: tuple[str, ...] = ("lm_head", "*.lm_head")  # fnmatch on weight, its module, or op loc
    zero_point: bool = True             # int4: asymmetric groups with zero points (AutoAWQ's default)
    int8_threshold: float = 6.0         # LLM.int8(): input features whose calibrated |x| max exceeds this stay float
    calib_size: int = 128               # calibration windows
    calib_seq_len: int = 256            # tokens per calibration window
    calib_rows: int = 512               # AWQ (and fp8 with amax_method="mse"): input rows kept per linear
    amax_method: str = "max"            # calibrated e4m3 scales (fp8 activations, fp8 KV): "max" or "mse" (activation_amax)
    weight_rounding: str = "nearest"    # weights onto their grid: "nearest", or "gptq" (error-compensating, passes/gptq.py)
    embedding: str | None = "int8"      # the token table, when quant_algo is given: "int8" (a scale per row) or None
    lm_head: QuantAlgo | str | None = None  # the lm_head's own algorithm (LM_HEAD_ALGOS); None: float, or as exclude says
    calibration: Calibration | None = field(default=None, repr=False, compare=False)
    calib_tokens: Sequence[int] | torch.Tensor | None = field(default=None, repr=False, compare=False)
    """A token stream to calibrate on instead of pydoc_data.topics read with the model's tokenizer."""

    def __post_init__(self) -> None:
        algo = None if self.quant_algo in (None, "none", "") else QuantAlgo.parse(self.quant_algo)
        kv = None if self.kv_cache_quant_algo in (None, "none", "") else QuantAlgo.parse(self.kv_cache_quant_algo)
        object.__setattr__(self, "quant_algo", algo)
        object.__setattr__(self, "kv_cache_quant_algo", kv)
        object.__setattr__(self, "exclude_modules", tuple(self.exclude_modules))
        head = None if self.lm_head in (None, "none", "") else QuantAlgo.parse(self.lm_head)
        object.__setattr__(self, "lm_head", head)
        embedding = None if self.embedding in (None, "none", "", "float") else str(self.embedding).lower()
        object.__setattr__(self, "embedding", embedding)
        if head is not None and head not in LM_HEAD_ALGOS:
            raise ValueError(f"lm_head={head.value!r}: the lm_head takes {', '.join(a.value for a in LM_HEAD_ALGOS)} "
                             f"(SmoothQuant and AWQ fold scales into the final norm, which it does not own alone)")
        if embedding is not None and embedding not in EMBEDDING_FORMATS:
            raise ValueError(f"embedding={self.embedding!r}: the token table is kept as int8 (one scale per row) "
                             f"or float (None)")
        if algo is QuantAlgo.FP8_KV:
            raise ValueError("fp8-kv is a kv_cache_quant_algo, not a quant_algo for linears: "
                             "QuantConfig(kv_cache_quant_algo='fp8-kv'), or quant='fp8_kv'")
        if kv is not None and kv is not QuantAlgo.FP8_KV:
            raise ValueError(f"kv_cache_quant_algo must be fp8-kv (or None), got {kv.value}")
        if algo is None and kv is None and head is None:
            raise ValueError("QuantConfig quantizes nothing: give a quant_algo, a kv_cache_quant_algo, or both")
        if algo in (QuantAlgo.W4A16, QuantAlgo.W4A16_AWQ) and (
                self.group_size < 32 or self.group_size & (self.group_size - 1)):
            raise ValueError(f"group_size must be a power of two of at least 32 for int4 (the W4A16 kernels read "
                             f"whole groups), got {self.group_size}; AutoAWQ's default is 128")
        if not 0.0 <= self.smoothquant_val <= 1.0:
            raise ValueError(f"smoothquant_val (alpha) must be in [0, 1], got {self.smoothquant_val}")
        if self.int8_threshold <= 0:
            raise ValueError(f"int8_threshold must be positive, got {self.int8_threshold}")
        if self.amax_method not in AMAX_METHODS:
            raise ValueError(f"amax_method must be one of {', '.join(AMAX_METHODS)}, got {self.amax_method!r}")
        if self.weight_rounding not in WEIGHT_ROUNDINGS:
            raise ValueError(f"weight_rounding must be one of {', '.join(WEIGHT_ROUNDINGS)}, got {self.weight_rounding!r}")
        if self.weight_rounding == "gptq" and algo in (None, QuantAlgo.LLM_INT8):
            raise ValueError(f"weight_rounding='gptq' rounds the weights of the linears' algorithm, and "
                             f"{'llm.int8 (whose outlier split changes the weight) is' if algo else 'none is given'} "
                             f"not one it takes: use fp8, fp8-per-channel, w8a8-sq, w4a16-awq, w4a16 or w8a16")
        if self.calib_size < 1 or self.calib_seq_len < 2 or self.calib_rows < 0:
            raise ValueError(f"calibration needs calib_size >= 1 windows of calib_seq_len >= 2 tokens, got "
                             f"{self.calib_size} x {self.calib_seq_len} (calib_rows {self.calib_rows})")

    # -- short forms and files ----------------------------------------------------------------------

    @classmethod
    def of(cls, quant: str | QuantConfig | Mapping[str, Any], **defaults: Any) -> QuantConfig:
        """A QuantConfig from what a user wrote: one, its JSON dict, or a short form such as "fp8",
        "int4_awq", "fp8_kv", "fp8+fp8_kv" (linears and KV cache) or "w4a16+lm_head=w8a16+group_size=64"
        (any field as key=value); `defaults` fill the fields a short form does not set."""
        if isinstance(quant, QuantConfig):
            return quant
        if isinstance(quant, Mapping):
            return cls.from_json(quant)
        if not isinstance(quant, str):
            raise TypeError(f"quant must be a short name such as 'fp8' or a QuantConfig, got {type(quant).__name__}")
        algo, kv, options = None, None, {}
        for part in (p for p in quant.split("+") if p.strip()):
            if "=" in part:
                key, value = (t.strip() for t in part.split("=", 1))
                options[key.replace("-", "_")] = _option(key.replace("-", "_"), value)
                continue
            a = QuantAlgo.parse(part)
            if a is QuantAlgo.FP8_KV:
                kv = a
            elif algo is not None:
                raise ValueError(f"quant={quant!r} names two algorithms for the linears ({algo.value}, {a.value})")
            else:
                algo = a
        return cls(algo, kv, **{**defaults, **options})

    def to_json(self) -> dict[str, Any]:
        """The config as kiln.json keeps it (no calibration data)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _NOT_SAVED}
        out["quant_algo"] = self.quant_algo.value if self.quant_algo else None
        out["kv_cache_quant_algo"] = self.kv_cache_quant_algo.value if self.kv_cache_quant_algo else None
        out["exclude_modules"] = list(self.exclude_modules)
        out["lm_head"] = self.lm_head.value if self.lm_head else None
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> QuantConfig:
        known = {f.name for f in fields(cls)} - _NOT_SAVED
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown QuantConfig keys {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        return cls(**{k: tuple(v) if k == "exclude_modules" else v for k, v in data.items()})

    # -- what it takes ------------------------------------------------------------------------------

    @property
    def scheme(self) -> Scheme | None:
        return SCHEMES.get(self.quant_algo) if self.quant_algo else None

    @property
    def needs_calibration(self) -> bool:
        """Whether the algorithms need statistics of real activations."""
        return (self.quant_algo in (QuantAlgo.FP8, QuantAlgo.W8A8_SQ, QuantAlgo.W4A16_AWQ, QuantAlgo.LLM_INT8)
                or self.kv_cache_quant_algo is QuantAlgo.FP8_KV or self.needs_hessian)

    @property
    def needs_hessian(self) -> bool:
        """Whether calibration must keep each linear input's x^T x (GPTQ's rounding reads it)."""
        return self.weight_rounding == "gptq"

    @property
    def calibration_rows(self) -> int:
        """Input rows per linear that calibration must keep: AWQ's search and the "mse" amax search read them."""
        return self.calib_rows if self.quant_algo is QuantAlgo.W4A16_AWQ or self.searches_amax else 0

    @property
    def searches_amax(self) -> bool:
        """Whether a calibrated e4m3 scale (fp8 activations, the fp8 KV cache) is searched on rows."""
        calibrated_fp8 = self.quant_algo is QuantAlgo.FP8 or self.kv_cache_quant_algo is QuantAlgo.FP8_KV
        return calibrated_fp8 and self.amax_method != "max"

    @property
    def uses_fp8(self) -> bool:
        return (self.quant_algo in (QuantAlgo.FP8, QuantAlgo.FP8_PER_CHANNEL)
                or self.kv_cache_quant_algo is QuantAlgo.FP8_KV)

    def pipeline(self) -> str:
        """The passes, after calibration, that apply this config to a stateless graph."""
        steps, exclude = [], f"exclude={'|'.join(self.exclude_modules)}"
        if self.quant_algo is QuantAlgo.W8A8_SQ:
            steps.append(f"smooth{{alpha={self.smoothquant_val},{exclude}}}")
        if self.quant_algo is QuantAlgo.W4A16_AWQ:
            steps.append(f"awq{{group_size={self.group_size},zero_point={str(self.zero_point).lower()},{exclude}}}")
        opts = [f"algo={self.quant_algo.value if self.quant_algo else 'none'}", exclude]
        if self.quant_algo in (QuantAlgo.W4A16, QuantAlgo.W4A16_AWQ):
            opts += [f"group_size={self.group_size}", f"zero_point={str(self.zero_point).lower()}"]
        if self.quant_algo is QuantAlgo.LLM_INT8:
            opts.append(f"threshold={self.int8_threshold}")
        if self.searches_amax:
            opts.append(f"amax={self.amax_method}")
        if self.weight_rounding != "nearest":
            opts.append(f"rounding={self.weight_rounding}")
        if self.kv_cache_quant_algo is QuantAlgo.FP8_KV:
            opts.append("kv=fp8")
        if self.embedding != "int8":
            opts.append(f"embedding={self.embedding or 'none'}")
        if self.lm_head is not None:
            opts.append(f"lm_head={self.lm_head.value}")
        steps.append("quantize{" + ",".join(opts) + "}")
        return ",".join(steps)

    def excludes(self, op: Op) -> str | None:
        """The exclude pattern that matches this linear or table (by weight name or loc), if any; an
        lm_head with an algorithm of its own (`lm_head`) is not excluded."""
        if self.lm_head is not None and _matches(op, LM_HEAD_PATTERNS):
            return None
        return _matches(op, self.exclude_modules)

    def algo_for(self, op: Op) -> QuantAlgo | None:
        """The algorithm this linear takes: the lm_head's own, or the linears'."""
        return self.lm_head if self.lm_head is not None and _matches(op, LM_HEAD_PATTERNS) else self.quant_algo

    # -- checks before any work ---------------------------------------------------------------------

    def check_device(self, capability: tuple[int, int] | None) -> None:
        """FP8 needs a GPU with FP8 tensor cores (compute capability 8.9: Ada, Hopper and later);
        `capability` None means no GPU (the reference interpreter computes FP8 on the CPU)."""
        if capability is not None and self.uses_fp8 and tuple(capability) < _FP8_MIN_CAPABILITY:
            what = " and ".join(a.value for a in (self.quant_algo, self.kv_cache_quant_algo)
                                if a in (QuantAlgo.FP8, QuantAlgo.FP8_PER_CHANNEL, QuantAlgo.FP8_KV))
            raise ValueError(f"{what} needs a GPU with FP8 support (compute capability 8.9 or newer: L4/L40, H100, "
                             f"...); this GPU is {capability[0]}.{capability[1]}. Use w8a16, w4a16-awq or w8a8-sq "
                             f"here, or target='reference'")

    def check_graph(self, graph: Graph) -> None:
        """Fail before calibration when the graph's linears cannot take this config (an int4 group
        size that does not divide in_features, a packing that needs out_features % 8)."""
        def grouped(op: Op) -> bool:
            algo = self.algo_for(op)
            return algo is not None and SCHEMES[algo].granularity == "group"
        candidates = [op for op in _linears(graph)
                      if grouped(op) and _skip_reason(op, self, check_calibration=False) is None]
        if not candidates:
            return
        bad = [op for op in candidates if op.operands[1].type.shape[1] % self.group_size
               or op.operands[1].type.shape[0] % 8]
        if bad:
            n, k = bad[0].operands[1].type.shape
            ks = sorted({op.operands[1].type.shape[1] for op in bad})
            fits = [g for g in (128, 64, 32) if all(op.operands[1].type.shape[1] % g == 0 for op in candidates)]
            hint = f"; group_size={fits[0]} divides every in_features" if fits else ""
            raise ValueError(f"group_size={self.group_size} does not fit {len(bad)} linears: "
                             f"{bad[0].loc or bad[0].operands[1].name} is [{n}, {k}] (int4 groups need in_features % "
                             f"group_size == 0, in_features here: {ks}; AutoAWQ's packing needs out_features % 8 "
                             f"== 0){hint}")


def _matches(op: Op, patterns: Sequence[str]) -> str | None:
    """The first fnmatch pattern naming op's weight (operand 1 of a linear, 0 of a lookup), its module or loc."""
    w = op.operands[0 if op.name == "llm.embedding" else 1].name
    names = [w, w.removesuffix(".weight"), op.loc or ""]
    return next((p for p in patterns if any(fnmatch.fnmatchcase(n, p) for n in names)), None)


def _option(key: str, text: str) -> Any:
    """A `key=value` part of a short form (`"w4a16+lm_head=w8a16+group_size=64"`) as the field's type."""
    found = {f.name: f for f in fields(QuantConfig) if f.name not in _NOT_SAVED | {"quant_algo", "kv_cache_quant_algo"}}
    if key not in found:
        raise ValueError(f"unknown option {key!r} in a quant short form; known: {', '.join(sorted(found))}")
    default = found[key].default
    if text.lower() in ("none", ""):
        return None
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{key}={text!r}: give true or false")
        return text.lower() in ("true", "1")
    if isinstance(default, (int, float)):
        try:
            return type(default)(text)
        except ValueError:
            raise ValueError(f"{key}={text!r}: give a number") from None
    return tuple(p for p in text.split("|") if p) if isinstance(default, tuple) else text


def _linears(graph: Graph) -> list[Op]:
    return [op for op in graph.ops if op.name == "llm.linear"]


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


_INT4_LEVELS = 15   # 2^4 - 1 steps between a group's min and max


def int4_group_params(w: torch.Tensor, group_size: int, zero_point: bool, scale_dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """AutoAWQ's int4 rounding per group of `group_size` along the last dim: asymmetric
    scale = (max - min) / 15 with zero = clamp(-round(min / scale), 0, 15), or symmetric
    scale = amax / 7. Returns (scale in `scale_dtype`, signed zero point = zero - 8 as int8, or None);
    the zero point is computed from the scale as stored."""
    g = w.detach().float().reshape(*w.shape[:-1], w.shape[-1] // group_size, group_size)
    if not zero_point:
        scale = (g.abs().amax(-1) / 7).clamp(min=1e-5).to(scale_dtype)
        return scale, None
    hi, lo = g.amax(-1), g.amin(-1)
    scale = ((hi - lo).clamp(min=1e-5) / _INT4_LEVELS).to(scale_dtype)
    zero = (-torch.round(lo / scale.float())).clamp(0, _INT4_LEVELS) - 8
    return scale, zero.to(torch.int8)


@dataclass(eq=False)
class Int4GroupStorage(Storage):
    """The scale (`part="scale"`) or signed zero point (`part="zero"`) of each int4 group of a weight."""

    source: Storage
    group_size: int
    zero_point: bool
    part: str
    type: TensorType
    scale_dtype: DType = DType.f32

    def load(self) -> torch.Tensor:
        scale, zero = int4_group_params(self.source.load(), self.group_size, self.zero_point, self.scale_dtype.torch)
        return scale if self.part == "scale" else zero

    def describe(self) -> str:
        kind = "asymmetric" if self.zero_point else "symmetric"
        return f"int4 {self.part} per group of {self.group_size} ({kind}) of ({self.source.describe()})"





def fresh_param(graph: Graph, base: str) -> str:
    """`base`, or `base.1`, `base.2`... whichever names no parameter yet."""
    name, n = base, 1
    while name in graph.params:
        name, n = f"{base}.{n}", n + 1
    return name


@dataclass(frozen=True)
class QuantizedWeight:
    """The parameters that replace one float weight: values, scale, and zero point (int4 asymmetric)."""

    values: Value
    scale: Value
    zero: Value | None
    axis: int | None
    group_size: int | None

    def dequantize(self, b: Builder) -> Value:
        extra = [self.zero] if self.zero is not None else []
        attrs = {k: v for k, v in (("axis", self.axis), ("group_size", self.group_size)) if v is not None}
        return b.quant.dequantize(self.values, self.scale, *extra, **attrs)


def quantize_weight(graph: Graph, name: str, storage: Storage, type: TensorType, scheme: Scheme,
                    config: QuantConfig, hessian: torch.Tensor | None = None) -> QuantizedWeight:
    """Declare the lazily computed parameters that hold `storage` quantized by `scheme`: rounded to
    nearest, or by GPTQ when the config asks for it and `hessian` (the input's x^T x) is given."""
    dtype = scheme.weight
    if scheme.granularity == "group":
        gs = config.group_size
        shape = (type.shape[0], type.shape[1] // gs)
        scale_t = TensorType(type.dtype, shape)
        scale_s = Int4GroupStorage(storage, gs, config.zero_point, "scale", scale_t, type.dtype)
        zero_t = TensorType(DType.i8, shape)
        zero_s = Int4GroupStorage(storage, gs, config.zero_point, "zero", zero_t, type.dtype) if config.zero_point else None
        axis, group = 1, gs
    else:
        axis = 0 if scheme.granularity == "channel" else None
        scale_t = TensorType(type.dtype, () if axis is None else (type.shape[0],))
        scale_s, zero_s, group = AmaxScaleStorage(storage, qmax(dtype), axis, scale_t), None, None
    q_type = type.with_dtype(dtype)
    inputs = [storage, scale_s] + ([zero_s] if zero_s else [])
    attrs = {"dtype": dtype, "axis": axis, "group_size": group}
    held = q_type.with_dtype(DType.i8) if dtype is DType.i4 else q_type   # i4 values are computed unpacked
    if config.weight_rounding == "gptq" and hessian is not None:
        values_s = GptqStorage(sweep_source(storage), scale_s, zero_s, hessian, dtype, axis, group, held)
    else:
        values_s = DerivedStorage("quant.quantize", inputs, attrs, held)
    values = graph.add_param(fresh_param(graph, f"{name}.{_SUFFIX[dtype]}"), q_type, values_s)
    scale = graph.add_param(fresh_param(graph, f"{name}.scale"), scale_t, scale_s)
    zero = graph.add_param(fresh_param(graph, f"{name}.zero"), zero_s.type, zero_s) if zero_s else None
    return QuantizedWeight(values, scale, zero, axis, group)


# -- activations -----------------------------------------------------------------------------------

AMAX_METHODS = ("max", "mse")
_AMAX_FRACTIONS = 1.0 - torch.arange(31) / 100   # "mse": candidate bounds 1.0, 0.99, ... 0.70 x the observed max


def activation_amax(stats: InputStats, method: str, dtype: DType) -> float:
    """The |x| bound of a calibrated per-tensor activation scale (bound / qmax): the observed max, or
    for "mse" the fraction of it whose rounding of the calibration rows has the least squared error
    (e4m3's grid moves with the scale, so a bound a little under the max can fit the rows better)."""
    if method == "max":
        return stats.amax
    if stats.rows is None:
        raise ValueError("amax_method='mse' searches the scale on calibration rows, and the calibration kept none: "
                         "calibrate with rows > 0 (calibrate{rows=512}, QuantConfig.calib_rows)")
    x = stats.rows.float()
    errors = [(static_qdq_values(x, stats.amax * float(f) / qmax(dtype), dtype) - x).pow(2).mean()
              for f in _AMAX_FRACTIONS]
    return stats.amax * float(_AMAX_FRACTIONS[int(torch.stack(errors).argmin())])


def static_qdq_values(x: torch.Tensor, scale: float, dtype: DType) -> torch.Tensor:
    """x through quant.quantize / quant.dequantize with one scale, in f32 (what static_qdq computes)."""
    s = torch.tensor(scale, dtype=torch.float32)
    return quant_ops.dequantize(quant_ops.quantize(x, s, dtype=dtype), s).float()


def calibrated_qdq(graph: Graph, b: Builder, x: Value, amax: float, dtype: DType, name: str) -> Value:
    """Quantize-dequantize x with one calibrated scale (amax / qmax) held in a parameter."""
    s = weight_scale(torch.tensor(amax), qmax(dtype), None).to(x.type.dtype.torch)
    return static_qdq(b, x, graph.add_param(fresh_param(graph, name), storage=TensorStorage(s)), dtype)


# -- the rewrite ---------------------------------------------------------------------------------

def _skip_reason(op: Op, config: QuantConfig, calibration: Calibration | None = None,
                 check_calibration: bool = True) -> str | None:
    w = op.operands[1]
    where = f"linear at {op.results[0].ref}" + (f" ({op.loc})" if op.loc else "")
    if not w.is_param:
        return f"{where} is not quantized: its weight {w.ref} is computed, not a parameter"
    if w.storage is None:
        return f"{where} is not quantized: {w.ref} has no data to quantize"
    why = _not_a_float_matrix(w, "[out, in]")
    if why is not None:
        return f"{where} is not quantized: {why}"
    pattern = config.excludes(op)
    if pattern is not None:
        return f"{where} is not quantized: excluded by {pattern!r}"
    calibrated = config.algo_for(op) in (QuantAlgo.FP8, QuantAlgo.LLM_INT8)
    if check_calibration and calibrated and w.name not in (calibration or {}):
        return f"{where} is not quantized: the calibration has no input statistics for {w.ref}"
    return None


def _rewrite(graph: Graph, op: Op, config: QuantConfig, calibration: Calibration | None,
             done: dict[str, QuantizedWeight]) -> bool:
    algo = config.algo_for(op)
    scheme = SCHEMES[algo]
    x, w = op.operands[0], op.operands[1]
    if algo is QuantAlgo.LLM_INT8:
        from .llm_int8 import split_outliers

        op = split_outliers(graph, op, calibration[w.name], config.int8_threshold)
        if op is None:
            return False
        x, w = op.operands[0], op.operands[1]
    if w.name not in done:  # a weight read by several linears is quantized once (GPTQ: with the first one's input)
        done[w.name] = quantize_weight(graph, w.name, w.storage, w.type, scheme, config, _hessian(op, config,
                                                                                                  calibration))
    b = Builder(graph, before=op, loc=op.loc)
    if scheme.activation is not None and scheme.per_token:
        x = per_token_qdq(b, x, scheme.activation)
    elif scheme.activation is not None:
        amax = activation_amax(calibration[w.name], config.amax_method, scheme.activation)
        x = calibrated_qdq(graph, b, x, amax, scheme.activation, w.name + ".input_scale")
    graph.set_operands(op, (x, done[w.name].dequantize(b), *op.operands[2:]))
    if graph.num_uses(w) == 0 and w not in graph.outputs:
        graph.remove_param(w.name)
    return True


def _round_by_gptq(quantized: Mapping[str, QuantizedWeight]) -> None:
    """Run GPTQ's sweeps now, with progress, rather than silently on first load (they cost seconds per
    linear; each storage keeps its result)."""
    from tqdm.auto import tqdm

    sweeps = [q.values.storage for q in quantized.values() if isinstance(q.values.storage, GptqStorage)]
    for storage in tqdm(sweeps, desc="gptq", unit="linear", leave=False, disable=not sweeps):
        storage.load()


def _hessian(op: Op, config: QuantConfig, calibration: Calibration | None) -> torch.Tensor | None:
    """The x^T x GPTQ rounds this linear's weight with, or None (rounding to nearest, with a remark)."""
    if config.weight_rounding != "gptq":
        return None
    w = op.operands[1]
    stats = (calibration or {}).get(w.name)
    if stats is None or stats.gram is None:
        remark(f"linear at {op.results[0].ref}{f' ({op.loc})' if op.loc else ''} rounds to nearest, not by GPTQ: the "
               f"calibration has no X^T X for {w.ref}")
        return None
    return stats.gram


def _shares_rows(q: QuantizedWeight, table: TensorType) -> bool:
    """Whether a quantized weight is also a quantized table: 8-bit values with one scale per row."""
    return (q.axis == 0 and q.group_size is None and q.values.type.dtype in (DType.i8, DType.f8e4m3)
            and q.scale.type.shape == (table.shape[0],))


def quantize_embeddings(graph: Graph, config: QuantConfig, quantized: dict[str, QuantizedWeight]) -> int:
    """Store every looked-up table as int8 with one scale per row (`fuse-quantized-linear` makes the lookup
    quant.embedding, which dequantizes only the rows it reads). A table tied to a quantized lm_head of 8-bit
    rows shares its values and scales; one tied to a float lm_head stays float (an int8 copy would add memory)."""
    count = 0
    for op in [o for o in graph.ops if o.name == "llm.embedding"]:
        table = op.operands[0]
        where = f"lookup at {op.results[0].ref}" + (f" ({op.loc})" if op.loc else "")
        if not table.is_param or table.storage is None:
            continue   # computed (a checkpoint's own quantized table, dequantized) or without data
        if table.name in quantized and _shares_rows(quantized[table.name], table.type):
            q = quantized[table.name]
        else:
            why = _table_skip_reason(graph, op, config)
            if why is not None:
                remark(f"{where} keeps a float table: {why}")
                continue
            q = quantize_weight(graph, table.name, table.storage, table.type, EMBEDDING_SCHEME, config)
            quantized[table.name] = q
        b = Builder(graph, before=op, loc=op.loc)
        graph.set_operands(op, (q.dequantize(b), *op.operands[1:]))
        if graph.num_uses(table) == 0 and table not in graph.outputs:
            graph.remove_param(table.name)
        count += 1
    return count


def _not_a_float_matrix(w: Value, shape: str) -> str | None:
    """Why a weight or table cannot be quantized as it is typed, if it cannot."""
    if not w.type.dtype.is_float or w.type.dtype in _FP8_MAX:
        return f"{w.ref} is {w.type.dtype}, not a 16/32-bit float"
    if not w.type.is_static or w.type.rank != 2:
        return f"{w.ref} is {w.type}, not a static {shape} matrix"
    return None


def _table_skip_reason(graph: Graph, op: Op, config: QuantConfig) -> str | None:
    table = op.operands[0]
    why = _not_a_float_matrix(table, "[vocab, hidden]")
    if why is not None:
        return why
    pattern = _matches(op, config.exclude_modules)
    if pattern is not None:
        return f"excluded by {pattern!r}"
    others = [u for u in graph.users(table) if u.name != "llm.embedding"]
    if others:
        return (f"{table.ref} is also read by {others[0].name} at {others[0].results[0].ref} (a tied lm_head, kept "
                f"float), and an int8 copy beside it would add memory; lm_head='w8a16' quantizes both as one")
    return None


def quantize_kv_cache(graph: Graph, calibration: Calibration, amax_method: str = "max") -> int:
    """Put the k and v of every llm.attention through e4m3 with a calibrated scale per tensor
    (amax / 448, amax as activation_amax bounds it): what an FP8 cache stores and reads back.
    Returns how many attentions."""
    count = 0
    for i, op in enumerate([o for o in graph.ops if o.name == "llm.attention"]):
        names = (f"k_cache.{i}", f"v_cache.{i}")
        missing = [n for n in names if n not in calibration]
        if missing:
            remark(f"attention at {op.results[0].ref} keeps a float KV cache: the calibration has no {missing[0]}")
            continue
        b = Builder(graph, before=op, loc=op.loc)
        base = op.loc or f"kv.{i}"
        k, v = (calibrated_qdq(graph, b, x, activation_amax(calibration[n], amax_method, DType.f8e4m3), DType.f8e4m3,
                               f"{base}.{kv}_scale")
                for x, n, kv in zip(op.operands[1:3], names, "kv"))
        graph.set_operands(op, (op.operands[0], k, v, *op.operands[3:]))
        count += 1
    return count


def quantize_graph(graph: Graph, config: QuantConfig, calibration: Calibration | None = None) -> int:
    """Quantize every eligible linear (and the tables, and the KV cache) of `graph` in place; returns how
    many linears, lookups and attentions were quantized. Calibration comes from the argument, the config, or
    the one the calibrate pass attached to the graph."""
    calibration = calibration if calibration is not None else config.calibration
    if calibration is None:
        calibration = attached_calibration(graph)
    if config.needs_hessian and not any(s.gram is not None for s in (calibration or {}).values()):
        raise ValueError(f"{config.pipeline()} rounds weights by GPTQ, which needs each linear input's X^T X: "
                         f"calibrate with it first (calibrate{{tokenizer=MODEL,hessian=true}}, "
                         f"kiln.passes.calibrate.calibrate(..., hessian=True)), or calib=FILE saved from one")
    if config.needs_calibration and config.quant_algo is not QuantAlgo.W8A8_SQ and calibration is None:
        raise ValueError(f"{config.pipeline()} quantizes with calibrated statistics: run the calibrate pass first "
                         f"(calibrate{{tokenizer=MODEL}}), pass calibration= (kiln.passes.calibrate.calibrate), "
                         f"or calib=FILE to the quantize pass")
    config.check_graph(graph)
    count, quantized = 0, {}
    for op in _linears(graph):
        if config.algo_for(op) is None:
            continue
        why = _skip_reason(op, config, calibration)
        if why is not None:
            remark(why)
            continue
        count += _rewrite(graph, op, config, calibration, quantized)
    _round_by_gptq(quantized)
    if config.quant_algo is not None and config.embedding is not None:
        count += quantize_embeddings(graph, config, quantized)
    if config.kv_cache_quant_algo is QuantAlgo.FP8_KV:
        count += quantize_kv_cache(graph, calibration, config.amax_method)
    return count


@register_pass("quantize")
def quantize(graph: Graph, *, algo: str = "w8a16", exclude: str = "lm_head|*.lm_head", calib: str = "",
             group_size: int = 128, zero_point: bool = True, threshold: float = 6.0, kv: str = "",
             amax: str = "max", rounding: str = "nearest", embedding: str = "int8", lm_head: str = "") -> int:
    """Quantize linears (algo=fp8|fp8-per-channel|w8a8-sq|w4a16|w4a16-awq|w8a16|llm.int8|none) and the
    KV cache (kv=fp8); exclude: '|'-separated fnmatch patterns; amax=max|mse: the calibrated e4m3 scales
    (fp8 activations, kv=fp8) from the observed max or searched on the calibration rows; rounding=nearest|gptq:
    weights onto their grid to nearest, or by GPTQ (needs calibrate{hessian=true}); embedding=int8|none: the
    looked-up tables (with algo); lm_head=ALGO: the lm_head's own algorithm (w8a16, w4a16, fp8-per-channel, fp8).

    Calibrated statistics (fp8, llm.int8, kv=fp8) come from the calibrate pass earlier in the
    pipeline, or from calib=FILE (kiln.passes.calibrate.save_calibration)."""
    if kv not in ("", "none", "fp8", "fp8-kv", "fp8_kv"):
        raise ValueError(f"kv={kv!r}: the KV cache quantizes to fp8 (kv=fp8) or not at all")
    config = QuantConfig(algo, QuantAlgo.FP8_KV if kv not in ("", "none") else None, group_size=group_size,
                         exclude_modules=tuple(p for p in exclude.split("|") if p), zero_point=zero_point,
                         int8_threshold=threshold, amax_method=amax, weight_rounding=rounding, embedding=embedding,
                         lm_head=lm_head or None)
    return quantize_graph(graph, config, load_calibration(calib) if calib else None)


def quantize_with(graph: Graph, algo: QuantAlgo | str, calibration: Mapping[str, InputStats] | None = None,
                  **options) -> int:
    """Shorthand: quantize_graph(graph, QuantConfig(algo, **options), calibration)."""
    return quantize_graph(graph, QuantConfig(algo, **options), dict(calibration) if calibration else None)


def apply_quantization(graph: Graph, config: QuantConfig, calibration: Calibration | None = None,
                       **options: Any) -> PassManager:
    """Run config's passes (smooth / awq, quantize) on a stateless graph, in place, with `calibration`
    (or config's) attached; `options` go to the PassManager (printing, timing). Returns the manager,
    whose records say what each pass did."""
    calibration = calibration if calibration is not None else config.calibration
    if calibration is not None:
        attach_calibration(graph, calibration)
    pm = PassManager(config.pipeline(), **options)
    pm.run(graph)
    return pm
