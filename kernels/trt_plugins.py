"""kiln's TensorRT plugins: the contract (name, version, namespace, attributes, inputs and outputs
of each) and the body each plugin runs, over kiln's Triton kernels.

This module is the one source of truth: `backends.trt` emits plugin nodes from it, registers
matching ONNX schemas from it (so onnx.checker validates every node), `docs/trt_plugins.md` is
generated from it (`contract_markdown`; a test keeps the file equal), and `backends.trt_engine`
registers each body with TensorRT's Python plugin API (`tensorrt.plugin`). Nothing here imports
tensorrt: the bodies take torch tensors, so they are tested on any machine (under
TRITON_INTERPRET=1 on a CPU) against the IR ops they implement.

A body never reads device memory on the host (no `.item()`, no `.tolist()`): a plugin runs inside
a TensorRT engine, so what the cuda backend learns from the host-side step (decode or prefill,
the longest context) is derived here from tensor shapes alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

NAMESPACE = "kiln"
VERSION = "1"

FLOATS = ("f32", "f16", "bf16")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a plugin."""

    name: str
    dtypes: tuple[str, ...]         # IR dtype names; "like x" types are written as ("=x",)
    shape: str                      # symbolic, for the reader: "[T, H, D]"
    doc: str
    aliases: str | None = None      # an output that is this input, written in place


@dataclass(frozen=True)
class AttrSpec:
    """One plugin field (an ONNX node attribute, a `tensorrt.plugin` attribute)."""

    name: str
    type: type                      # int or float (TensorRT's plugin attributes take no lists)
    doc: str


@dataclass(frozen=True)
class PluginSpec:
    """A plugin: what TensorRT looks up (namespace::name, version), its fields and tensors, the
    IR form it implements and the kiln kernels it calls."""

    name: str
    summary: str
    implements: str
    kernels: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    attributes: tuple[AttrSpec, ...]
    run: Callable[..., Any]         # run(*inputs, **attributes) -> output tensor(s), on the inputs' device

    namespace: str = NAMESPACE
    version: str = VERSION

    @property
    def plugin_id(self) -> str:
        return f"{self.namespace}::{self.name}"

    def input_dtypes(self, index: int) -> tuple[str, ...]:
        """The IR dtypes input `index` may have ("=x" resolved to x's)."""
        spec = self.inputs[index]
        if spec.dtypes[0].startswith("="):
            return self.input_dtypes(next(i for i, s in enumerate(self.inputs) if s.name == spec.dtypes[0][1:]))
        return spec.dtypes


# -- bodies ----------------------------------------------------------------------------------------

def paged_attention(q, k, v, k_cache, v_cache, slot_mapping, block_tables, context_lens, query_start, positions,
                    inv_freq, *, num_heads: int, num_kv_heads: int, head_dim: int, tokens_per_block: int,
                    scale: float, rope_scale: float, out: torch.Tensor | None = None):
    """Rotate q and k (cos/sin of each token's own position, so no table sized by a host-read
    maximum), write k and v into the caches in one launch, then attend: the decode kernel when every
    sequence brings one token (T == B, known from shapes), else the varlen prefill kernel."""
    from .attention import paged_decode_attention, paged_prefill_attention
    from .rope import rope_kv_write

    tokens = q.shape[0]
    angles = positions.float()[:, None] * inv_freq.float()[None, :]                # [T, D/2]
    cos, sin = (angles.cos() * rope_scale).contiguous(), (angles.sin() * rope_scale).contiguous()
    rows = torch.arange(tokens, dtype=torch.int32, device=q.device)
    q = rope_kv_write(q.contiguous(), k.contiguous(), v.contiguous(), rows, cos, sin, k_cache, v_cache, slot_mapping)
    if tokens == context_lens.shape[0]:
        longest = block_tables.shape[1] * tokens_per_block  # an upper bound on every context, read off shapes
        return paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, longest, scale, out=out)
    return paged_prefill_attention(q, k_cache, v_cache, block_tables, context_lens, query_start, tokens, scale,
                                   out=out)


def rms_norm(x, weight, *, eps: float):
    from .norm import rms_norm as kernel

    return kernel(x.contiguous(), weight.contiguous(), eps)


def add_rms_norm(x, residual, weight, *, eps: float):
    from .norm import rms_norm as kernel

    return kernel(x.contiguous(), weight.contiguous(), eps, residual=residual.contiguous())


FP8_MAX = 448.0


def fp8_linear(x, weight, weight_scale, input_scale):
    """Static per-tensor FP8: x quantized with its calibrated scale, then the FP8 GEMM."""
    from .gemm_fp8 import linear_fp8

    xq = (x.float() / input_scale.float()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return linear_fp8(xq.contiguous(), weight, input_scale.reshape(1), weight_scale.reshape(1), out_dtype=x.dtype)


def fp8_rowwise_linear(x, weight, weight_scale, *, amax_floor: float):
    """Dynamic per-token FP8: each row's scale is max(|row|, amax_floor) / 448 in x's dtype, as
    kiln's quantize pass computes it, then the FP8 GEMM with per-channel weight scales."""
    from .gemm_fp8 import linear_fp8

    rows = x.reshape(-1, x.shape[-1])
    scale = rows.abs().amax(-1).clamp(min=amax_floor) / torch.tensor(FP8_MAX, dtype=x.dtype, device=x.device)
    xq = (rows.float() / scale.float()[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    y = linear_fp8(xq.contiguous(), weight, scale, weight_scale, out_dtype=x.dtype)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def w8a16_linear(x, weight, weight_scale):
    from .gemm_woq import linear_w8a16

    return linear_w8a16(x.contiguous(), weight, weight_scale)


def w4a16_linear(x, qweight, qzeros, scales, *, group_size: int):
    from .gemm_woq import linear_awq

    if qweight.shape[0] // scales.shape[0] != group_size:
        raise ValueError(f"group_size={group_size} does not match qweight {tuple(qweight.shape)} and scales "
                         f"{tuple(scales.shape)}")
    return linear_awq(x.contiguous(), qweight, qzeros, scales.to(x.dtype))


# -- the contract ----------------------------------------------------------------------------------

_T = "tokens of the step, all sequences packed"


def _t(name: str, dtypes: tuple[str, ...], shape: str, doc: str, aliases: str | None = None) -> TensorSpec:
    return TensorSpec(name, dtypes, shape, doc, aliases)


PLUGINS: dict[str, PluginSpec] = {p.name: p for p in [
    PluginSpec(
        "PagedAttention",
        "Rotary embedding of q and k, the step's K/V written into the paged caches, and causal attention of "
        "every packed token over its sequence's cached history (GQA).",
        "llm.paged_attention (a plain one gets positions of zeros and inv_freq of zeros: an exact no-op rope)",
        "rope.rope_kv_write, then attention.paged_decode_attention (every sequence has one new token) or "
        "attention.paged_prefill_attention",
        inputs=(
            _t("q", FLOATS, "[T, H, D]", f"queries of the {_T}, before rope"),
            _t("k", ("=q",), "[T, Hkv, D]", "keys of the step, before rope"),
            _t("v", ("=q",), "[T, Hkv, D]", "values of the step"),
            _t("k_cache", ("=q",), "[NB, BS, Hkv, D]", "the layer's key cache (the runtime's pool)"),
            _t("v_cache", ("=q",), "[NB, BS, Hkv, D]", "the layer's value cache"),
            _t("slot_mapping", ("i64",), "[T]", "flat cache slot of each token (block * BS + offset); < 0: skip"),
            _t("block_tables", ("i32",), "[B, MB]", "each sequence's cache blocks, in order"),
            _t("context_lens", ("i32",), "[B]", "each sequence's context length, this step's tokens included"),
            _t("query_start", ("i32",), "[B + 1]", "row of the first token of each sequence in q, then T"),
            _t("positions", ("i32",), "[T]", "position of each token in its sequence"),
            _t("inv_freq", ("f32",), "[D / 2]", "rotary inverse frequencies (scaling folded in)"),
        ),
        outputs=(
            _t("out", ("=q",), "[T, H, D]", "attention output"),
            _t("k_cache_out", ("=q",), "[NB, BS, Hkv, D]", "k_cache, written in place", aliases="k_cache"),
            _t("v_cache_out", ("=q",), "[NB, BS, Hkv, D]", "v_cache, written in place", aliases="v_cache"),
        ),
        attributes=(
            AttrSpec("num_heads", int, "H, query heads"),
            AttrSpec("num_kv_heads", int, "Hkv, key/value heads (H is a multiple)"),
            AttrSpec("head_dim", int, "D, a power of two"),
            AttrSpec("tokens_per_block", int, "BS, tokens in one cache block"),
            AttrSpec("scale", float, "softmax scale (1/sqrt(D) unless the model says otherwise)"),
            AttrSpec("rope_scale", float, "factor on cos and sin (yarn's attention factor; 1.0 otherwise)"),
        ),
        run=paged_attention),
    PluginSpec(
        "RmsNorm", "RMSNorm over the last axis, computed in f32.", "llm.rms_norm", "norm.rms_norm",
        inputs=(_t("x", FLOATS, "[..., N]", "activations"), _t("weight", ("=x",), "[N]", "scale")),
        outputs=(_t("y", ("=x",), "[..., N]", "normalised x"),),
        attributes=(AttrSpec("eps", float, "added to the mean square"),),
        run=rms_norm),
    PluginSpec(
        "AddRmsNorm", "The residual add and the next RMSNorm in one pass over the residual stream.",
        "llm.add_rms_norm", "norm.rms_norm (with residual)",
        inputs=(_t("x", FLOATS, "[..., N]", "the block's output"), _t("residual", ("=x",), "[..., N]", "the stream"),
                _t("weight", ("=x",), "[N]", "scale")),
        outputs=(_t("y", ("=x",), "[..., N]", "rms_norm(x + residual)"), _t("h", ("=x",), "[..., N]", "x + residual")),
        attributes=(AttrSpec("eps", float, "added to the mean square"),),
        run=add_rms_norm),
    PluginSpec(
        "Fp8Linear", "W8A8 FP8 GEMM with per-tensor scales: x quantized with its calibrated scale in the plugin.",
        "llm.linear(dequantize(quantize(x, s_x)), dequantize(w_fp8, s_w)) with scalar scales (quant algo fp8)",
        "gemm_fp8.linear_fp8",
        inputs=(_t("x", FLOATS, "[..., K]", "activations, not quantized"),
                _t("weight", ("f8e4m3",), "[N, K]", "e4m3 weight, nn.Linear layout"),
                _t("weight_scale", ("f32",), "[]", "weight scale"),
                _t("input_scale", ("f32",), "[]", "calibrated activation scale")),
        outputs=(_t("y", ("=x",), "[..., N]", "x @ dequant(weight).T (a bias is a separate Add)"),),
        attributes=(),
        run=fp8_linear),
    PluginSpec(
        "Fp8RowwiseLinear", "FP8 GEMM with per-token activation scales computed in the plugin and per-channel "
        "weight scales.",
        "llm.linear over per-token dynamic e4m3 Q/DQ of x and dequantize(w_fp8, s_w, axis=0) "
        "(quant algo fp8-per-channel)", "gemm_fp8.linear_fp8",
        inputs=(_t("x", FLOATS, "[..., K]", "activations, not quantized"),
                _t("weight", ("f8e4m3",), "[N, K]", "e4m3 weight"),
                _t("weight_scale", ("f32",), "[N]", "per output channel")),
        outputs=(_t("y", ("=x",), "[..., N]", "x @ dequant(weight).T"),),
        attributes=(AttrSpec("amax_floor", float, "a token's |x| max is at least this (all-zero tokens)"),),
        run=fp8_rowwise_linear),
    PluginSpec(
        "W8A16Linear", "INT8 weight-only GEMM, per-channel scales; activations stay 16/32-bit.",
        "llm.linear(x, dequantize(w_i8, s_w, axis=0)) (quant algo w8a16)", "gemm_woq.linear_w8a16",
        inputs=(_t("x", FLOATS, "[..., K]", "activations"), _t("weight", ("i8",), "[N, K]", "int8 weight"),
                _t("weight_scale", ("=x",), "[N]", "per output channel")),
        outputs=(_t("y", ("=x",), "[..., N]", "x @ dequant(weight).T"),),
        attributes=(),
        run=w8a16_linear),
    PluginSpec(
        "W4A16Linear", "INT4 weight-only GEMM with group-wise scales and zero points, AutoAWQ's packing.",
        "llm.linear(x, dequantize(w_i4, s_w[, zero_point], axis=1, group_size=G)) (or per channel, G = K)",
        "gemm_woq.linear_awq",
        inputs=(_t("x", FLOATS, "[..., K]", "activations"),
                _t("qweight", ("i32",), "[K, N / 8]", "w + 8 transposed, eight nibbles per int32 in AWQ order"),
                _t("qzeros", ("i32",), "[K / G, N / 8]", "zero point + 8 (8 when symmetric), packed alike"),
                _t("scales", ("=x",), "[K / G, N]", "group scales, transposed")),
        outputs=(_t("y", ("=x",), "[..., N]", "x @ dequant(weight).T"),),
        attributes=(AttrSpec("group_size", int, "G, input channels per scale"),),
        run=w4a16_linear),
]}
"""Plugin name -> its contract and body."""


# -- the document ----------------------------------------------------------------------------------

_HEADER = """\
# kiln's TensorRT plugins

Generated from `kernels/trt_plugins.py` (`contract_markdown()`); `tests/backends/test_trt.py`
fails when this file and the table differ. Edit the table, then regenerate:

    python -c "from kiln.kernels.trt_plugins import contract_markdown; print(contract_markdown(), end='')" > docs/trt_plugins.md

## How they appear in a network

`target="trt"` writes the network as ONNX in TensorRT's conventions (`backends/trt.py`). A
plugin is a node in the custom domain `kiln` (opset version 1) whose `op_type` is the plugin's
name; TensorRT's ONNX parser finds it in the plugin registry by `op_type` and the node's
`plugin_namespace` and `plugin_version` attributes, and passes the other attributes as the
plugin's fields. Every attribute is an int or a float (TensorRT's Python plugins take no
lists). Inputs and outputs are positional, in the order below; an input marked "=q" has q's
type. An output that *aliases* an input is that input's buffer, written in place (the KV
caches): the network lists it as an output named `<input>.out`, and kiln's executor binds both
to the runtime's pool.

The plugins are registered with TensorRT's Python plugin API (`tensorrt.plugin`, TensorRT 10.6
and later; the caches use its aliased outputs, `TensorDesc.aliased`) by
`kiln.backends.trt_engine.register_plugins()`; none has run inside TensorRT yet. Each body calls
kiln's Triton kernels on the stream TensorRT passes. Being Python plugins, they load in a Python
process that imported kiln, not in `trtexec`: that is why a network folder also holds
`model.standard.onnx`, the same network in standard ops, which `trtexec` builds alone.

kiln's ONNX schemas for these nodes (`backends.trt.register_onnx_schemas`) let `onnx.checker`
validate every plugin node's attributes and input count.
"""


def contract_markdown() -> str:
    """docs/trt_plugins.md: every plugin's id, version, fields, inputs and outputs."""
    lines = [_HEADER]
    for p in PLUGINS.values():
        lines += [f"## `{p.plugin_id}` (version {p.version})", "", p.summary, "",
                  f"- implements: {p.implements}", f"- kernels: {p.kernels}", "",
                  "| attribute | type | meaning |", "|---|---|---|"]
        lines += [f"| `{a.name}` | {a.type.__name__} | {a.doc} |" for a in p.attributes] or ["| (none) | | |"]
        lines += ["", "| # | input | dtypes | shape | meaning |", "|---|---|---|---|---|"]
        lines += [f"| {i} | `{t.name}` | {_dtypes(t)} | `{t.shape}` | {t.doc} |" for i, t in enumerate(p.inputs)]
        lines += ["", "| # | output | dtypes | shape | meaning |", "|---|---|---|---|---|"]
        lines += [f"| {i} | `{t.name}` | {_dtypes(t)} | `{t.shape}` | {t.doc}"
                  + (f" (aliases input `{t.aliases}`)" if t.aliases else "") + " |" for i, t in enumerate(p.outputs)]
        lines.append("")
    return "\n".join(lines)


def _dtypes(t: TensorSpec) -> str:
    return " ".join(t.dtypes)
