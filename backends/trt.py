"""The trt backend: the serving graph as a TensorRT network, written as ONNX in TensorRT's
conventions, with kiln's fused ops as plugin nodes; built into an engine where `tensorrt` imports.

    folder = export_network(graph, "smol-trt/", build_config=BuildConfig(max_batch_size=64))
    exe = compile(graph, path="smol-trt/")          # builds (or loads) the engine; needs TensorRT

A network folder holds:

    model.onnx           the network: standard ONNX ops, explicit quantization (Q/DQ with constant
                         scales), and plugin nodes in the domain `kiln` (docs/trt_plugins.md)
    model.standard.onnx  the same network with every plugin replaced by its standard-op lowering,
                         which `trtexec` builds without kiln (written when model.onnx has plugins)
    model.onnx.data      the weights, shared by both networks
    network.json         the plugin nodes, the optimization profile for the token and batch dims
                         (from BuildConfig), the inputs updated in place, and the build commands
    model.engine         the engine, once built (by kiln where tensorrt imports, or by trtexec)

The lowering is `backends.onnx`'s, with a table of plugin lowerings tried first: each matches an
op's form (a pattern over its operands for the quantized GEMMs) and declines otherwise, so any
op a plugin does not take (a sliding-window attention, an odd head size) keeps its standard
lowering. Only `trt_engine` imports tensorrt.
"""

from __future__ import annotations

import functools
import json
import math
import shlex
import tempfile
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch

from ..ir.graph import Graph, Op, Value
from ..ir.types import DType, eval_dim
from ..kernels.trt_plugins import FLOATS, NAMESPACE, PLUGINS, VERSION, PluginSpec
from ..passes.pattern import Attr, Const, Match, P, Var
from . import TargetUnavailableError
from .onnx import (
    LOWERINGS,
    PARAM_TRANSFORMS,
    Emitter,
    ExportedModel,
    WeightWriter,
    export,
    state_output_name,
)

__all__ = ["ALL_PLUGINS", "NetworkFolder", "TensorRTRequiredError", "build", "compile", "export_network",
           "optimization_profile", "register_onnx_schemas", "trtexec_command"]

ALL_PLUGINS = tuple(PLUGINS)
NETWORK, STANDARD, ENGINE, DESCRIPTION = "model.onnx", "model.standard.onnx", "model.engine", "network.json"
INSTALL = ("pip install tensorrt (NVIDIA's wheels; add --extra-index-url https://pypi.nvidia.com where the default "
           "index lacks them), or run in NVIDIA's NGC TensorRT container (nvcr.io/nvidia/tensorrt:<yy.mm>-py3); "
           "kiln's plugins need TensorRT's Python plugin API, tensorrt.plugin (10.6 and later), with aliased outputs "
           "(TensorDesc.aliased)")


class TensorRTRequiredError(TargetUnavailableError):
    """The network was written, but building its engine needs TensorRT, which does not import here."""


# -- plugin lowerings -----------------------------------------------------------------------------

def _plugin_node(e: Emitter, spec: PluginSpec, *inputs, **attrs):
    want = {a.name: a.type for a in spec.attributes}
    if set(attrs) != set(want):
        raise AssertionError(f"{spec.name}: attributes {sorted(attrs)} differ from the contract's {sorted(want)}")
    typed = {k: want[k](v) for k, v in attrs.items()}
    return e.node(spec.name, *inputs, outputs=len(spec.outputs), domain=NAMESPACE, plugin_namespace=NAMESPACE,
                  plugin_version=VERSION, **typed)


def _paged_attention(e: Emitter, op: Op, q, k, v, k_cache, v_cache, slot_mapping, block_tables, context_lens,
                     query_start, positions=None, inv_freq=None):
    qt, ct = op.operands[0].type, op.operands[3].type
    _, heads, dim = qt.shape
    _, block, kv_heads, _ = ct.shape
    if op.attrs["window"] is not None or dim & (dim - 1) or qt.dtype.value not in FLOATS:
        e.notes.append(f"{op.results[0].ref}: PagedAttention takes no sliding window, head_dim {dim} that is not a "
                       f"power of two, or {qt.dtype}: standard ops")
        return NotImplemented
    if positions is None:  # rotating by angle 0 is an exact copy
        positions = e.node("ConstantOfShape", e.node("Shape", slot_mapping),
                           value=onnx.helper.make_tensor("value", onnx.TensorProto.INT32, [1], [0]))
        inv_freq = e.const(0.0, DType.f32, (dim // 2,))
        rope_scale = 1.0
    else:
        positions = e.cast(positions, op.operands[9].type.dtype, DType.i32)
        inv_freq = e.cast(inv_freq, op.operands[10].type.dtype, DType.f32)
        rope_scale = op.attrs["rope_scale"]
    scale = op.attrs["scale"] if op.attrs["scale"] is not None else dim ** -0.5
    out, k_new, v_new = _plugin_node(e, PLUGINS["PagedAttention"], q, k, v, k_cache, v_cache, slot_mapping,
                                     block_tables, context_lens, query_start, positions, inv_freq, num_heads=heads,
                                     num_kv_heads=kv_heads, head_dim=dim, tokens_per_block=block, scale=scale,
                                     rope_scale=rope_scale)
    e.update(op.operands[3], k_new)
    e.update(op.operands[4], v_new)
    return out


def _rms_norm(e: Emitter, op: Op, x, weight):
    return _plugin_node(e, PLUGINS["RmsNorm"], x, weight, eps=op.attrs["eps"])


def _add_rms_norm(e: Emitter, op: Op, x, residual, weight):
    return tuple(_plugin_node(e, PLUGINS["AddRmsNorm"], x, residual, weight, eps=op.attrs["eps"]))


# The quantized GEMMs are the quantize pass's forms, matched declaratively on llm.linear.
_F8 = DType.f8e4m3


def _param(name: str, dtype: DType | None = None) -> Var:
    return Var(name, where=lambda v: v.is_param and (dtype is None or v.type.dtype is dtype))


_FP8_WEIGHT = P("quant.dequantize", _param("w", _F8), _param("ws"), attrs={"axis": None, "group_size": None})
_FP8_INPUT = P("quant.dequantize", P("quant.quantize", Var("x"), _param("xs"), attrs={"dtype": _F8, "axis": None,
                                                                                     "group_size": None}),
               _param("xs"), attrs={"axis": None, "group_size": None})
FP8_LINEAR = P("llm.linear", _FP8_INPUT, _FP8_WEIGHT, where=lambda m: m.ws.type.rank == 0 and m.xs.type.rank == 0)

_TOKEN_SCALE = P("core.div", P("core.clamp", P("core.amax", P("core.abs", Var("rows")), attrs={"dims": (1,)}),
                               attrs={"min": Attr("floor"), "max": None}), Const(448.0), name="s")
_ROWWISE_INPUT = P("quant.dequantize", P("quant.quantize", Var("rows"), _TOKEN_SCALE, attrs={"dtype": _F8, "axis": 0}),
                   Var("s"), attrs={"axis": 0, "group_size": None})
_ROWWISE_WEIGHT = P("quant.dequantize", _param("w", _F8), _param("ws"), attrs={"axis": 0, "group_size": None})
W8A16_LINEAR = P("llm.linear", Var("x"), P("quant.dequantize", _param("w", DType.i8), _param("ws"),
                                           attrs={"axis": 0, "group_size": None}))
W4A16_LINEAR = P("llm.linear", Var("x"), P("quant.dequantize", _param("w", DType.i4), _param("ws"),
                                           attrs={"axis": Attr("axis"), "group_size": Attr("group")}))
W4A16_LINEAR_ZP = P("llm.linear", Var("x"), P("quant.dequantize", _param("w", DType.i4), _param("ws"),
                                              _param("zp"),
                                              attrs={"axis": Attr("axis"), "group_size": Attr("group")}))


def _match(pattern: P, e: Emitter, op: Op) -> Match | None:
    return next((Match(e.ir, op.results[0], b) for b in pattern.match_op(e.ir, op, {})), None)


def _bias(e: Emitter, op: Op, y):
    return y if len(op.operands) < 3 or op.operands[2] is None else e.node("Add", y, e.value(op.operands[2]))


def _scale_f32(e: Emitter, v: Value):
    return e.cast(e.value(v), v.type.dtype, DType.f32)


def _linear(e: Emitter, op: Op, x, w, bias=None, *, plugins: Collection[str] = ALL_PLUGINS):
    if "Fp8Linear" in plugins and (m := _match(FP8_LINEAR, e, op)):
        y = _plugin_node(e, PLUGINS["Fp8Linear"], e.value(m.x), e.value(m.w), _scale_f32(e, m.ws), _scale_f32(e, m.xs))
        return _bias(e, op, y)
    if "Fp8RowwiseLinear" in plugins and (m := _rowwise(e, op)):
        y = _plugin_node(e, PLUGINS["Fp8RowwiseLinear"], e.value(m.rows), e.value(m.w), _scale_f32(e, m.ws),
                         amax_floor=m.floor)
        if m.rows is not op.operands[0]:
            y = e.node("Reshape", y, e.shape(op.results[0].type.shape, infer_one=True))
        return _bias(e, op, y)
    if "W8A16Linear" in plugins and (m := _match(W8A16_LINEAR, e, op)) and _woq_input(m):
        ws = e.cast(e.value(m.ws), m.ws.type.dtype, m.x.type.dtype)
        return _bias(e, op, _plugin_node(e, PLUGINS["W8A16Linear"], x, e.value(m.w), ws))
    if "W4A16Linear" in plugins and (m := _match(W4A16_LINEAR_ZP, e, op) or _match(W4A16_LINEAR, e, op)) \
            and _woq_input(m):
        return _w4a16(e, op, x, m)
    return NotImplemented


def _woq_input(m: Match) -> bool:
    return m.x.type.dtype.value in FLOATS and (m.x.op is None or m.x.op.name != "quant.dequantize")


def _rowwise(e: Emitter, op: Op) -> Match | None:
    x = op.operands[0]
    if x.op is not None and x.op.name == "core.reshape":
        x = x.op.operands[0]
    if x.op is None:
        return None
    root = next((Match(e.ir, x, b) for b in _ROWWISE_INPUT.match_op(e.ir, x.op, {})), None)
    weight = next((b for b in _ROWWISE_WEIGHT.match_op(e.ir, op.operands[1].op, {})), None) \
        if op.operands[1].op is not None else None
    if root is None or weight is None or root.rows.type.rank != 2 or op.operands[0].type.dtype.value not in FLOATS:
        return None
    return Match(e.ir, op.results[0], {"rows": root.rows, "floor": root.floor, **weight})


def _w4a16(e: Emitter, op: Op, x, m: Match):
    n, k = m.w.type.shape
    group = m.group if m.group is not None else k
    if (m.axis % 2 != 1 and m.group is not None) or (m.group is None and m.axis % 2 != 0) or n % 8 or k % group:
        e.notes.append(f"{op.results[0].ref}: W4A16Linear takes int4 [N, K] weights with K-groups and N % 8 == 0")
        return NotImplemented
    groups = k // group
    qweight = e.param(m.w, "awq_qweight", dtype=DType.i32, shape=(k, n // 8))
    if "zp" in m:
        qzeros = e.param(m.zp, "awq_qzeros", dtype=DType.i32, shape=(groups, n // 8))
    else:
        qzeros = e.param(m.ws, "awq_zeros8", dtype=DType.i32, shape=(groups, n // 8))
    scales = e.cast(e.param(m.ws, "awq_scales", shape=(groups, n)), m.ws.type.dtype, m.x.type.dtype)
    y = _plugin_node(e, PLUGINS["W4A16Linear"], x, qweight, qzeros, scales, group_size=group)
    return _bias(e, op, y)


def _awq_layout(q: torch.Tensor) -> torch.Tensor:
    """[N, K'] int values in [-8, 7] -> AutoAWQ's int32 [K', N/8] of (value + 8)."""
    from ..kernels.gemm_woq import awq_pack

    return awq_pack((q.to(torch.int32) + 8).transpose(0, 1).contiguous())


def _as_groups(t: torch.Tensor) -> torch.Tensor:
    return t[:, None] if t.dim() == 1 else t            # per-channel [N] is one group: [N, 1]


PARAM_TRANSFORMS.update({
    "awq_qweight": _awq_layout,
    "awq_qzeros": lambda zp: _awq_layout(_as_groups(zp)),
    "awq_zeros8": lambda scale: _awq_layout(torch.zeros_like(_as_groups(scale), dtype=torch.int32)),
    "awq_scales": lambda scale: _as_groups(scale).transpose(0, 1).contiguous(),
})

PLUGIN_LOWERINGS = {"llm.paged_attention": _paged_attention, "llm.rms_norm": _rms_norm,
                    "llm.add_rms_norm": _add_rms_norm, "llm.linear": _linear}
PLUGIN_OF_OP = {"llm.paged_attention": ("PagedAttention",), "llm.rms_norm": ("RmsNorm",),
                "llm.add_rms_norm": ("AddRmsNorm",),
                "llm.linear": ("Fp8Linear", "Fp8RowwiseLinear", "W8A16Linear", "W4A16Linear")}


def plugin_table(plugins: Collection[str]) -> dict[str, Any]:
    """The plugin lowerings for the chosen plugins (the ops none of them covers keep their own)."""
    unknown = set(plugins) - set(PLUGINS)
    if unknown:
        raise ValueError(f"unknown plugins {', '.join(sorted(unknown))}; kiln's plugins: {', '.join(PLUGINS)}")
    chosen = frozenset(plugins)
    table = {name: fn for name, fn in PLUGIN_LOWERINGS.items() if set(PLUGIN_OF_OP[name]) <= chosen}
    if set(PLUGIN_OF_OP["llm.linear"]) & chosen:
        table["llm.linear"] = functools.partial(_linear, plugins=chosen)
    return table


# -- ONNX schemas of the plugin nodes -------------------------------------------------------------

_ONNX_TYPE_NAMES = {DType.f32: "tensor(float)", DType.f16: "tensor(float16)", DType.bf16: "tensor(bfloat16)",
                    DType.f8e4m3: "tensor(float8e4m3fn)", DType.f8e5m2: "tensor(float8e5m2)",
                    DType.i64: "tensor(int64)", DType.i32: "tensor(int32)", DType.i8: "tensor(int8)",
                    DType.u8: "tensor(uint8)", DType.i4: "tensor(int4)", DType.bool: "tensor(bool)"}


def register_onnx_schemas() -> None:
    """Declare each plugin to onnx (domain kiln, version 1), so that onnx.checker checks every plugin
    node's attributes, input count and input types against the contract."""
    from onnx.defs import OpSchema

    def type_names(dtypes) -> list[str]:
        return [_ONNX_TYPE_NAMES[DType.parse(d)] for d in dtypes]

    for p in PLUGINS.values():
        if onnx.defs.has(p.name, NAMESPACE):
            continue
        constraints, formals = [], {}
        for kind, tensors in (("in", p.inputs), ("out", p.outputs)):
            for t in tensors:
                if t.dtypes[0].startswith("="):
                    param = f"T_{t.dtypes[0][1:]}"
                else:
                    param = f"T_{t.name}" if kind == "in" else f"T_out_{t.name}"
                    constraints.append((param, type_names(t.dtypes), t.doc))
                formals.setdefault(kind, []).append(OpSchema.FormalParameter(t.name, param, t.doc))
        attrs = [OpSchema.Attribute(a.name, OpSchema.AttrType.INT if a.type is int else OpSchema.AttrType.FLOAT,
                                    a.doc, required=True) for a in p.attributes]
        attrs += [OpSchema.Attribute(n, OpSchema.AttrType.STRING, f"TensorRT's plugin lookup: {n}", required=True)
                  for n in ("plugin_namespace", "plugin_version")]
        onnx.defs.register_schema(OpSchema(p.name, NAMESPACE, int(VERSION), p.summary, inputs=formals["in"],
                                           outputs=formals["out"], type_constraints=constraints, attributes=attrs))


# -- optimization profiles and build commands -----------------------------------------------------

def optimization_profile(graph: Graph, build_config: Any = None, *, max_positions: int | None = None
                         ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shapes of every input, from BuildConfig: T (tokens of a step) up to
    max_num_tokens, optimal at max_batch_size (decode steps); B (sequences) and N (logit rows) up to
    max_batch_size (N up to max_num_tokens: prompt logprobs); MB (blocks of one sequence) and NB (the
    pool) from max_seq_len and the block size, as the runtime sizes its pool."""
    from ..runtime.config import BuildConfig

    bc = build_config or BuildConfig()
    seq_len = bc.max_seq_len or max_positions or 4096
    caches = [v for v in graph.inputs if v.name.startswith(("k_cache.", "v_cache."))]
    block = caches[0].type.shape[1] if caches else 1
    per_seq = math.ceil(seq_len / block)
    tokens, batch = bc.max_num_tokens, bc.max_batch_size
    ranges = {"T": (1, min(batch, tokens), tokens), "B": (1, batch, batch), "N": (1, batch, tokens),
              "MB": (1, per_seq, per_seq), "NB": (1, per_seq * batch, per_seq * batch)}
    symbols = {s for v in graph.inputs for s in v.type.symbols}
    unknown = symbols - set(ranges)
    if unknown:
        raise ValueError(f"no optimization-profile range for the dims {', '.join(sorted(unknown))}: kiln knows "
                         f"{', '.join(ranges)} (the serving graph's) ")
    profile = {}
    for v in graph.inputs:
        profile[v.name] = tuple(tuple(eval_dim(d, {s: r[i] for s, r in ranges.items()}) for d in v.type.shape)
                                for i in range(3))
    return profile


def trtexec_command(onnx_path: Path, engine_path: Path, profile: Mapping[str, tuple]) -> str:
    """The trtexec command line that builds `onnx_path` into `engine_path` with this profile."""
    def shapes(i: int) -> str:
        return ",".join(f"{name}:{'x'.join(map(str, dims[i]))}" for name, dims in profile.items() if dims[i])

    args = ["trtexec", f"--onnx={onnx_path}", "--stronglyTyped", f"--minShapes={shapes(0)}",
            f"--optShapes={shapes(1)}", f"--maxShapes={shapes(2)}", f"--saveEngine={engine_path}"]
    return " ".join(shlex.quote(a) for a in args)


def kiln_build_command(folder: Path) -> str:
    return f"python -m kiln.backends.trt_engine {shlex.quote(str(folder))}"


# -- the network folder ---------------------------------------------------------------------------

@dataclass
class NetworkFolder:
    """A written network: its files, its plugin nodes, its profile and how to build it."""

    folder: Path
    network: ExportedModel
    standard: ExportedModel | None            # None when the network has no plugins (it is standard)
    plugin_nodes: dict[str, int]              # plugin name -> node count
    aliased: list[str]                        # state outputs a plugin writes in place
    profile: dict[str, tuple]
    notes: list[str] = field(default_factory=list)
    standard_unbuildable: str | None = None   # why TensorRT cannot build model.standard.onnx, if it cannot

    @property
    def engine(self) -> Path:
        return self.folder / ENGINE

    def trtexec(self) -> str | None:
        """The trtexec command for the network trtexec can build alone (standard ops), if any."""
        if self.standard_unbuildable is not None:
            return None
        path = self.standard.path if self.standard is not None else self.network.path
        return trtexec_command(path, self.engine, self.profile)

    def kiln_build(self) -> str:
        return kiln_build_command(self.folder)


def export_network(graph: Graph, folder: str | Path, *, plugins: Collection[str] = ALL_PLUGINS,
                   build_config: Any = None, max_positions: int | None = None,
                   params: Mapping[str, torch.Tensor] | None = None, progress: bool = True) -> NetworkFolder:
    """Write the TensorRT network of `graph` (and its standard-op twin) into `folder`."""
    register_onnx_schemas()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in (NETWORK, STANDARD, ENGINE, DESCRIPTION, f"{NETWORK}.data"):
        (folder / stale).unlink(missing_ok=True)
    weights = WeightWriter(folder, f"{NETWORK}.data", progress)
    profile = optimization_profile(graph, build_config, max_positions=max_positions)
    table = plugin_table(plugins)
    network = export(graph, folder / NETWORK, tables=(table, LOWERINGS), weights=weights, params=params,
                     domains=[(NAMESPACE, int(VERSION))], progress=progress)
    model = onnx.load(str(network.path), load_external_data=False)
    kiln_nodes = [n for n in model.graph.node if n.domain == NAMESPACE]
    counts: dict[str, int] = {}
    for n in kiln_nodes:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    aliased = [name for n in kiln_nodes for name, out in zip(n.output, PLUGINS[n.op_type].outputs)
               if out.aliases and name in network.state]
    standard = None
    if kiln_nodes:
        standard = export(graph, folder / STANDARD, weights=weights, params=params, progress=progress)
    check = onnx.load(str((standard or network).path), load_external_data=False)
    unbuildable = _dynamic_quantize_scale(check)
    if unbuildable is not None and not kiln_nodes:
        raise ValueError(f"TensorRT cannot build this network: {unbuildable}. Keep the Fp8RowwiseLinear plugin "
                         f"(plugins=...) for per-token FP8")
    result = NetworkFolder(folder, network, standard, counts, aliased, profile, network.notes, unbuildable)
    _write_description(result)
    return result


def _dynamic_quantize_scale(model: onnx.ModelProto) -> str | None:
    """TensorRT's explicit quantization takes constant Q scales only; say which node has another."""
    constants = {t.name for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[1] not in constants:
            return f"QuantizeLinear {n.name} has a scale computed at run time (per-token FP8)"
    return None


def _write_description(f: NetworkFolder) -> None:
    description = {
        "network": NETWORK, "standard_network": STANDARD if f.standard is not None else None,
        "weights": f.network.external_data, "engine": ENGINE,
        "inputs": f.network.inputs, "outputs": f.network.outputs, "state": f.network.state,
        "aliased_outputs": f.aliased,
        "plugins": {"namespace": NAMESPACE, "version": VERSION, "nodes": f.plugin_nodes,
                    "contract": "docs/trt_plugins.md"},
        "profile": {name: dict(zip(("min", "opt", "max"), map(list, p))) for name, p in f.profile.items()},
        "strongly_typed": True, "notes": f.notes,
        "build": {"kiln": f.kiln_build(), "trtexec": f.trtexec(), "trtexec_unavailable": f.standard_unbuildable},
    }
    (f.folder / DESCRIPTION).write_text(json.dumps(description, indent=2) + "\n")


def read_description(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / DESCRIPTION
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a kiln TensorRT network folder ({DESCRIPTION} is missing): write "
                                f"one with kiln.compile(model, target='trt', output_dir=...)")
    return json.loads(path.read_text())


# -- the target -----------------------------------------------------------------------------------

def tensorrt_missing() -> str | None:
    import importlib.util

    return None if importlib.util.find_spec("tensorrt") is not None else "TensorRT (tensorrt) does not import here"


def missing_message(f: NetworkFolder, why: str) -> str:
    lines = [f"target='trt' wrote its network to {f.folder} ({NETWORK}: "
             + (", ".join(f"{n} x{c}" for n, c in f.plugin_nodes.items()) + " kiln plugin nodes" if f.plugin_nodes
                else "standard ops only") + f"; {DESCRIPTION}: plugins, profile, build commands), but building the "
             f"TensorRT engine needs TensorRT: {why}. No engine was built.",
             f"Install it: {INSTALL}.",
             f"Then build with kiln (registers kiln's Python plugins): {f.kiln_build()}"]
    command = f.trtexec()
    if command is not None:
        lines.append(f"or with trtexec alone, from the standard-op network: {command}")
    else:
        lines.append(f"(trtexec cannot build this network without kiln's plugins: {f.standard_unbuildable})")
    return "\n".join(lines)


def build(graph: Graph, *, output_dir: str | Path | None = None, build_config: Any = None,
          max_positions: int | None = None, plugins: Collection[str] = ALL_PLUGINS,
          progress: bool = True) -> dict[str, Any]:
    """Ahead of serving: write the network folder and build its engine; where TensorRT does not
    import, stop after writing with TensorRTRequiredError, which says how to finish."""
    folder = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="kiln-trt-"))
    written = export_network(graph, folder, plugins=plugins, build_config=build_config, max_positions=max_positions,
                             progress=progress)
    why = tensorrt_missing()
    if why is not None:
        raise TensorRTRequiredError(missing_message(written, why))
    from . import trt_engine

    trt_engine.build_engine(folder)
    return {"path": str(folder)}


def compile(graph: Graph, *, device: str = "cuda", path: str | Path | None = None, build_config: Any = None,
            **_: Any) -> Any:
    """The engine's executable: built from the folder at `path` (written first when absent)."""
    if path is None or not (Path(path) / DESCRIPTION).is_file():
        path = build(graph, output_dir=path, build_config=build_config)["path"]
    elif not (Path(path) / ENGINE).is_file():
        why = tensorrt_missing()
        if why is not None:
            raise TensorRTRequiredError(f"{path} holds a network but no engine, and {why}. Install: {INSTALL}")
        from . import trt_engine

        trt_engine.build_engine(Path(path))
    from . import trt_engine

    return trt_engine.TrtExecutable(Path(path), device=device)


def state_outputs(graph: Graph) -> dict[str, str]:
    """Output name -> the cache input it updates (the serving graph's KV pool)."""
    return {state_output_name(v.name): v.name for v in graph.inputs if v.name.startswith(("k_cache.", "v_cache."))}
