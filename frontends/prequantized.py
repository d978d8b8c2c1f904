"""Quantized checkpoints: what a model folder says about its quantization, and the binding of
already-quantized tensors into the traced graph without dequantizing them.

A folder says it in `quant_config.json` (AutoAWQ's file, or the AutoQuant form with `quant_mode`
and `from_float`), in `quantization_config` of config.json (the same keys, or transformers' AWQ /
FP8 keys), or, for FP8 checkpoints in the HF / ModelOpt convention, by its tensors alone (an e4m3
`weight` with a `weight_scale`). With `from_float` the folder holds float weights that kiln.compile
quantizes at load time; otherwise the tensors are quantized already:

- AutoAWQ (w_bit 4, version "gemm"): `qweight` int32 [K, N/8], `qzeros` int32 [K/G, N/8] and
  `scales` [K/G, N] per linear;
- FP8: `weight` e4m3 [N, K] with `weight_scale` (per tensor, or per output channel) and, for
  static activation scales, `input_scale`; without it activations are quantized per token;
- int8 (AutoQuant's weight_only w_bit 8 and smoothquant): `weight` int8 [N, K] with a per-channel
  `weight_scale`; smoothquant quantizes activations per token.

The frontend binds each linear's weight to a placeholder storage that knows the quantized tensors
(it could dequantize on load, but is never loaded), and after tracing `to_qdq` replaces it by the
graph's own form: `quant.dequantize` of parameters that are the checkpoint's tensors, read lazily
(AutoAWQ's int32 words are unpacked only if something loads them; the fusion pass hands them back
untouched), and activation Q/DQ where the scheme quantizes activations.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..ir.builder import Builder
from ..ir.graph import Graph, Value
from ..ir.ops.quant import AwqUnpackedStorage, awq_unpack, per_token_qdq, static_qdq
from ..ir.storage import DerivedStorage, Storage
from ..ir.types import DType, TensorType


class QuantizedCheckpointError(ValueError):
    """A quantized checkpoint kiln cannot read, with what to do about it."""


AWQ_VERSIONS = ("gemm",)
"""The AutoAWQ packings kiln reads (GEMM: AWQ_ORDER nibbles along output channels)."""

_MODES = {("weight_only", 4): "w4a16-awq", ("weight_only", 8): "w8a16", ("smoothquant", 8): "w8a8-sq",
          ("llm.int8", 8): "llm.int8"}
"""(AutoQuant quant_mode, w_bit) -> kiln's algorithm."""


@dataclass(frozen=True)
class CheckpointQuant:
    """What a folder says about its quantization, in kiln's terms."""

    algo: str                   # a QuantAlgo short name: w4a16-awq, w8a16, w8a8-sq, llm.int8, fp8, fp8-per-channel
    from_float: bool            # True: float weights to quantize at load time; False: already quantized
    source: str                 # the file (and key) that said so
    group_size: int = 128
    zero_point: bool = True
    version: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


def _read_json(path: str) -> dict[str, Any] | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
    except ValueError as e:
        raise QuantizedCheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise QuantizedCheckpointError(f"{path} is not a JSON object")
    return data


def read_checkpoint_quant(folder: str, tensors: Mapping[str, Storage] | None = None) -> CheckpointQuant | None:
    """The quantization a model folder declares (or its FP8 tensors show); None for a float model.
    A configuration kiln cannot honour (an unknown AWQ version, a bit width it has no kernel for)
    fails here, before anything is traced."""
    if not isinstance(folder, (str, os.PathLike)) or not os.path.isdir(folder):
        return None
    found = _read_json(os.path.join(folder, "quant_config.json"))
    where = os.path.join(folder, "quant_config.json")
    if found is None:
        config = _read_json(os.path.join(folder, "config.json")) or {}
        found = config.get("quantization_config")
        where = os.path.join(folder, "config.json") + ":quantization_config"
    if found is not None:
        return _from_keys(dict(found), where)
    if tensors is not None and any(k.endswith(".weight_scale") for k in tensors):
        return _fp8_from_tensors(tensors, folder)
    return None


def _from_keys(q: dict[str, Any], where: str) -> CheckpointQuant:
    method = str(q.get("quant_method", "")).lower()
    if method in ("fp8", "modelopt", "compressed-tensors") or str(q.get("quant_algo", "")).upper() == "FP8":
        if q.get("weight_block_size"):
            raise QuantizedCheckpointError(f"{where}: block-wise FP8 (weight_block_size {q['weight_block_size']}) is "
                                           f"not supported; kiln reads FP8 with per-tensor or per-channel scales")
        dynamic = str(q.get("activation_scheme", "static")).lower() == "dynamic"
        return CheckpointQuant("fp8-per-channel" if dynamic else "fp8", False, where)
    if method not in ("", "awq"):
        raise QuantizedCheckpointError(f"{where}: quant_method {method!r} is not one kiln reads (awq, fp8, or "
                                       f"AutoQuant's w_bit / quant_mode keys)")
    bits = q.get("w_bit", q.get("bits"))
    group = q.get("q_group_size", q.get("group_size", 128))
    mode = str(q.get("quant_mode", "weight_only")).lower()
    version = q.get("version")
    from_float = bool(q.get("from_float", False))
    if bits not in (4, 8):
        raise QuantizedCheckpointError(f"{where}: w_bit/bits={bits!r}; kiln quantizes weights to 4 (AWQ) or 8 bits")
    if (mode, bits) not in _MODES:
        known = ", ".join(f"{m} with w_bit {b}" for m, b in _MODES)
        raise QuantizedCheckpointError(f"{where}: quant_mode {mode!r} with w_bit {bits} is not one kiln knows "
                                       f"({known})")
    if bits == 4 and (version is None or str(version).lower() not in AWQ_VERSIONS):
        raise QuantizedCheckpointError(f"{where}: AWQ version {version!r} is not one kiln reads; it reads "
                                       f"{', '.join(AWQ_VERSIONS)} (AutoAWQ's default GEMM packing). Re-quantize "
                                       f"with version='gemm', or give the float weights with from_float=true")
    if not isinstance(group, int) or group < 1:
        raise QuantizedCheckpointError(f"{where}: q_group_size/group_size must be a positive int, got {group!r}")
    algo = _MODES[mode, bits]
    if algo == "llm.int8" and not from_float:
        raise QuantizedCheckpointError(f"{where}: LLM.int8() keeps outlier input features in 16-bit, which int8 "
                                       f"weights no longer have; give the float weights with from_float=true")
    return CheckpointQuant(algo, from_float, where, group_size=group, zero_point=bool(q.get("zero_point", True)),
                           version=str(version).lower() if version is not None else None)


def _fp8_from_tensors(tensors: Mapping[str, Storage], folder: str) -> CheckpointQuant | None:
    scaled = [k.removesuffix("_scale") for k in tensors if k.endswith(".weight_scale")]
    if not any(k in tensors and tensors[k].type.dtype is DType.f8e4m3 for k in scaled):
        return None
    static = any(k.endswith(".input_scale") for k in tensors)
    return CheckpointQuant("fp8" if static else "fp8-per-channel", False, f"{folder} (e4m3 weights with weight_scale)")


# -- placeholders bound during tracing -------------------------------------------------------------

@dataclass(eq=False)
class QuantizedWeightStorage(Storage):
    """A linear's float weight as the checkpoint holds it, quantized: `to_qdq` replaces it by Q/DQ
    of the parts; loading it (which nothing does) would dequantize."""

    scheme: str                         # "awq", "fp8" or "int8"
    parts: dict[str, Storage]           # awq: qweight, qzeros, scales; fp8/int8: weight, weight_scale[, input_scale]
    type: TensorType
    per_token: bool = False             # activations quantized per token at run time

    def load(self) -> torch.Tensor:
        p = {k: s.load() for k, s in self.parts.items()}
        if self.scheme == "awq":
            group = p["qweight"].shape[0] // p["scales"].shape[0]
            q = awq_unpack(p["qweight"]) - awq_unpack(p["qzeros"]).repeat_interleave(group, 0)
            w = (q.float() * p["scales"].float().repeat_interleave(group, 0)).t()
        else:
            s = p["weight_scale"].float()
            w = p["weight"].float() * (s.reshape(-1, 1) if s.numel() > 1 else s.reshape(()))
        return w.to(self.type.dtype.torch)

    def describe(self) -> str:
        return f"{self.scheme} weight of ({', '.join(s.describe() for s in self.parts.values())})"


def bind_quantized(tensors: dict[str, Storage], quant: CheckpointQuant, dtype: torch.dtype) -> int:
    """Bind each quantized linear's `<module>.weight` to a placeholder over its quantized tensors
    (in place); returns how many. Names and shapes are checked here, before tracing."""
    float_type = DType.from_torch(dtype)
    count = 0
    if quant.algo == "w4a16-awq":
        for key in [k for k in tensors if k.endswith(".qweight")]:
            base = key.removesuffix(".qweight")
            parts = {p: tensors.get(f"{base}.{p}") for p in ("qweight", "qzeros", "scales")}
            missing = [p for p, s in parts.items() if s is None]
            if missing:
                raise QuantizedCheckpointError(f"{base} has a qweight but no {', '.join(missing)}: an AutoAWQ "
                                               f"checkpoint stores qweight, qzeros and scales per linear")
            k, n = parts["qweight"].type.shape[0], parts["scales"].type.shape[1]
            groups = parts["scales"].type.shape[0]
            if (parts["qweight"].type.dtype is not DType.i32 or parts["qweight"].type.shape[1] * 8 != n
                    or k % groups or parts["qzeros"].type.shape != (groups, n // 8)):
                raise QuantizedCheckpointError(
                    f"{base}: qweight {parts['qweight'].type}, qzeros {parts['qzeros'].type} and scales "
                    f"{parts['scales'].type} are not AutoAWQ's GEMM layout ([K, N/8], [K/G, N/8], [K/G, N])")
            tensors[f"{base}.weight"] = QuantizedWeightStorage("awq", parts, TensorType(float_type, (n, k)))
            count += 1
    for key in [k for k in tensors if k.endswith(".weight_scale") and quant.algo != "w4a16-awq"]:
        base = key.removesuffix(".weight_scale")
        weight = tensors.get(f"{base}.weight")
        if weight is None:
            continue
        want = DType.f8e4m3 if quant.algo.startswith("fp8") else DType.i8
        if weight.type.dtype is not want or weight.type.rank != 2:
            raise QuantizedCheckpointError(f"{base}.weight is {weight.type}; a {quant.algo} checkpoint stores "
                                           f"{want} [out, in] weights with their weight_scale")
        n = weight.type.shape[0]
        scale = tensors[key]
        if scale.type.shape not in ((), (1,), (n,), (n, 1)):
            raise QuantizedCheckpointError(f"{key} is {scale.type}: kiln reads one scale per tensor or per output "
                                           f"channel ([{n}] or [{n}, 1])")
        parts = {"weight": weight, "weight_scale": scale}
        if f"{base}.input_scale" in tensors:
            parts["input_scale"] = tensors[f"{base}.input_scale"]
        per_token = quant.algo in ("fp8-per-channel", "w8a8-sq") or (
            quant.algo == "fp8" and "input_scale" not in parts)
        tensors[f"{base}.weight"] = QuantizedWeightStorage("fp8" if want is DType.f8e4m3 else "int8", parts,
                                                           TensorType(float_type, weight.type.shape), per_token)
        count += 1
    if count == 0:
        raise QuantizedCheckpointError(f"{quant.source} says the checkpoint is quantized ({quant.algo}), but it has "
                                       f"no quantized linear weights (qweight / weight with weight_scale)")
    return count


# -- after tracing: the graph's Q/DQ form -------------------------------------------------------------

def _cast_to(storage: Storage, type: TensorType) -> Storage:
    st = storage.type
    if st.shape != type.shape:
        storage = DerivedStorage("core.reshape", [storage], {"shape": type.shape}, st.with_shape(type.shape))
    if storage.type.dtype is not type.dtype:
        storage = DerivedStorage("core.cast", [storage], {"dtype": type.dtype}, type)
    return storage


def to_qdq(graph: Graph) -> int:
    """Replace every parameter bound to a QuantizedWeightStorage by quant.dequantize of the
    checkpoint's tensors (and Q/DQ of the activations it multiplies); returns how many."""
    count = 0
    for name, p in list(graph.params.items()):
        if isinstance(p.storage, QuantizedWeightStorage):
            _replace(graph, p)
            count += 1
    return count


def _replace(graph: Graph, p: Value) -> None:
    st: QuantizedWeightStorage = p.storage
    n, k = p.type.shape
    dt = p.type.dtype
    if st.scheme == "awq":
        groups = st.parts["scales"].type.shape[0]
        values = graph.add_param(f"{p.name}.int4", TensorType(DType.i4, (n, k)),
                                 AwqUnpackedStorage(st.parts["qweight"], TensorType(DType.i8, (n, k))))
        zero = graph.add_param(f"{p.name}.zero", TensorType(DType.i8, (n, groups)),
                               AwqUnpackedStorage(st.parts["qzeros"], TensorType(DType.i8, (n, groups))))
        scales = st.parts["scales"]
        transposed = DerivedStorage("core.permute", [scales], {"dims": (1, 0)}, TensorType(scales.type.dtype, (n, groups)))
        scale = graph.add_param(f"{p.name}.scale", TensorType(dt, (n, groups)),
                                _cast_to(transposed, TensorType(dt, (n, groups))))
        operands, attrs = (values, scale, zero), {"axis": 1, "group_size": k // groups}
    else:
        weight, raw = st.parts["weight"], st.parts["weight_scale"]
        per_channel = raw.type.numel() > 1
        scale_type = TensorType(dt, (n,) if per_channel else ())
        values = graph.add_param(f"{p.name}.{'fp8' if st.scheme == 'fp8' else 'int8'}", weight.type, weight)
        scale = graph.add_param(f"{p.name}.scale", scale_type, _cast_to(raw, scale_type))
        operands, attrs = (values, scale), ({"axis": 0} if per_channel else {})
    users = list(dict.fromkeys(graph.users(p)))
    first = min(users, key=graph.index)
    b = Builder(graph, before=first, loc=first.loc)
    weight = b.quant.dequantize(*operands, **attrs)
    graph.replace_all_uses(p, weight)
    if st.scheme != "awq":
        act = DType.f8e4m3 if st.scheme == "fp8" else DType.i8
        xs = None
        if not st.per_token and "input_scale" in st.parts:
            t = TensorType(dt, ())
            xs = graph.add_param(f"{p.name}.input_scale", t, _cast_to(st.parts["input_scale"], t))
        for op in users:
            if op.name != "llm.linear":
                raise QuantizedCheckpointError(f"{p.name} is read by {op.name}, not only by linears; kiln binds "
                                               f"quantized weights of linears only")
            ab = Builder(graph, before=op, loc=op.loc)
            x = op.operands[0]
            if st.per_token:
                x = per_token_qdq(ab, x, act)
            elif xs is not None:
                x = static_qdq(ab, x, xs, act)
            graph.set_operands(op, (x, *op.operands[1:]))
    graph.remove_param(p.name)
