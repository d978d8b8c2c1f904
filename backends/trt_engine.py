"""The part of the trt backend that needs TensorRT: kiln's plugins registered with TensorRT's Python
plugin API, the engine build (OnnxParser into a strongly typed network, one optimization profile
for the token and batch dims), engine save/load, and the executor the runtime calls.

    python -m kiln.backends.trt_engine FOLDER      # build FOLDER/model.engine from FOLDER/model.onnx

Everything else (the lowering, the network folder, the profile, the plugin bodies) is in
`backends.trt` and `kernels.trt_plugins` and is tested without TensorRT. This module is not: it
is exercised only where `tensorrt` imports, and kiln has not built an engine on its CPU CI.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import tensorrt as trt
import tensorrt.plugin as trtp
import torch

from ..kernels.trt_plugins import PLUGINS
from .trt import DESCRIPTION, ENGINE, read_description

_LOGGER = trt.Logger(trt.Logger.WARNING)
_REGISTERED = False
_TRT_TO_TORCH = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                 trt.int64: torch.int64, trt.int32: torch.int32, trt.int8: torch.int8, trt.bool: torch.bool}


def _torch(t: Any) -> torch.Tensor:
    """A tensorrt.plugin.Tensor as a torch tensor on its buffer (it has __cuda_array_interface__)."""
    return torch.as_tensor(t, device="cuda")


def _run(name: str, inputs: tuple, attrs: dict[str, Any], outputs: tuple, stream: int) -> None:
    spec = PLUGINS[name]
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        result = spec.run(*(_torch(t) for t in inputs), **{a.name: a.type(attrs[a.name]) for a in spec.attributes})
        results = result if isinstance(result, tuple) else (result,)
        for out, spec_out, value in zip(outputs, spec.outputs, results):
            if spec_out.aliases is None:  # aliased outputs were written in place
                _torch(out).copy_(value)


def register_plugins() -> None:
    """Register every plugin of kernels.trt_plugins with TensorRT (once per process): shapes and
    types of the outputs, and the body that runs on TensorRT's stream."""
    global _REGISTERED
    if _REGISTERED:
        return
    TD = trtp.TensorDesc

    @trtp.register("kiln::PagedAttention")
    def _(q: TD, k: TD, v: TD, k_cache: TD, v_cache: TD, slot_mapping: TD, block_tables: TD, context_lens: TD,
          query_start: TD, positions: TD, inv_freq: TD, num_heads: int, num_kv_heads: int, head_dim: int,
          tokens_per_block: int, scale: float, rope_scale: float) -> tuple[TD, TD, TD]:
        return q.like(), k_cache.aliased(), v_cache.aliased()

    @trtp.impl("kiln::PagedAttention")
    def _(q, k, v, k_cache, v_cache, slot_mapping, block_tables, context_lens, query_start, positions, inv_freq,
          num_heads, num_kv_heads, head_dim, tokens_per_block, scale, rope_scale, outputs, stream):
        _run("PagedAttention", (q, k, v, k_cache, v_cache, slot_mapping, block_tables, context_lens, query_start,
                                positions, inv_freq),
             {"num_heads": num_heads, "num_kv_heads": num_kv_heads, "head_dim": head_dim,
                  "tokens_per_block": tokens_per_block, "scale": scale, "rope_scale": rope_scale}, outputs, stream)

    @trtp.register("kiln::RmsNorm")
    def _(x: TD, weight: TD, eps: float) -> TD:
        return x.like()

    @trtp.impl("kiln::RmsNorm")
    def _(x, weight, eps, outputs, stream):
        _run("RmsNorm", (x, weight), {"eps": eps}, outputs, stream)

    @trtp.register("kiln::AddRmsNorm")
    def _(x: TD, residual: TD, weight: TD, eps: float) -> tuple[TD, TD]:
        return x.like(), x.like()

    @trtp.impl("kiln::AddRmsNorm")
    def _(x, residual, weight, eps, outputs, stream):
        _run("AddRmsNorm", (x, residual, weight), {"eps": eps}, outputs, stream)

    def linear_out(x: TD, rows: TD) -> TD:
        out = x.like()
        out.shape_expr[-1] = rows.shape_expr[0]
        return out

    @trtp.register("kiln::Fp8Linear")
    def _(x: TD, weight: TD, weight_scale: TD, input_scale: TD) -> TD:
        return linear_out(x, weight)

    @trtp.impl("kiln::Fp8Linear")
    def _(x, weight, weight_scale, input_scale, outputs, stream):
        _run("Fp8Linear", (x, weight, weight_scale, input_scale), {}, outputs, stream)

    @trtp.register("kiln::Fp8RowwiseLinear")
    def _(x: TD, weight: TD, weight_scale: TD, amax_floor: float) -> TD:
        return linear_out(x, weight)

    @trtp.impl("kiln::Fp8RowwiseLinear")
    def _(x, weight, weight_scale, amax_floor, outputs, stream):
        _run("Fp8RowwiseLinear", (x, weight, weight_scale), {"amax_floor": amax_floor}, outputs, stream)

    @trtp.register("kiln::W8A16Linear")
    def _(x: TD, weight: TD, weight_scale: TD) -> TD:
        return linear_out(x, weight)

    @trtp.impl("kiln::W8A16Linear")
    def _(x, weight, weight_scale, outputs, stream):
        _run("W8A16Linear", (x, weight, weight_scale), {}, outputs, stream)

    @trtp.register("kiln::W4A16Linear")
    def _(x: TD, qweight: TD, qzeros: TD, scales: TD, group_size: int) -> TD:
        out = x.like()
        out.shape_expr[-1] = scales.shape_expr[1]
        return out

    @trtp.impl("kiln::W4A16Linear")
    def _(x, qweight, qzeros, scales, group_size, outputs, stream):
        _run("W4A16Linear", (x, qweight, qzeros, scales), {"group_size": group_size}, outputs, stream)

    _REGISTERED = True


def build_engine(folder: Path, *, workspace_bytes: int | None = None) -> Path:
    """Parse folder/model.onnx into a strongly typed network, add the folder's optimization profile,
    build, and save folder/model.engine."""
    register_plugins()
    description = read_description(folder)
    builder = trt.Builder(_LOGGER)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, _LOGGER)
    if not parser.parse_from_file(str(folder / description["network"])):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT's ONNX parser rejected {folder / description['network']}:\n{errors}")
    config = builder.create_builder_config()
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    profile = builder.create_optimization_profile()
    for name, shapes in description["profile"].items():
        profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT could not build an engine from {folder}; its log above says why")
    path = folder / ENGINE
    path.write_bytes(bytes(serialized))
    return path


def load_engine(path: Path) -> trt.ICudaEngine:
    register_plugins()
    engine = trt.Runtime(_LOGGER).deserialize_cuda_engine(Path(path).read_bytes())
    if engine is None:
        raise RuntimeError(f"TensorRT could not load {path}: built by another TensorRT version or GPU? Rebuild it")
    return engine


class TrtExecutable:
    """An engine called like the serving graph: exe(*inputs, *caches) -> [logits], caches updated in
    place (plugins write the runtime's pool directly; a standard-op network's new caches are copied back)."""

    def __init__(self, folder: Path, *, device: str = "cuda"):
        description = read_description(folder)
        self.engine = load_engine(folder / ENGINE)
        self.context = self.engine.create_execution_context()
        self.inputs: list[str] = description["inputs"]
        self.state: dict[str, str] = description["state"]
        self.aliased = set(description["aliased_outputs"])
        self.outputs = [o for o in description["outputs"] if o not in self.state]
        self.device = torch.device(device)

    def __call__(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        if len(inputs) != len(self.inputs):
            raise ValueError(f"the engine takes {len(self.inputs)} inputs, got {len(inputs)}")
        ctx = self.context
        bound = {}
        for name, t in zip(self.inputs, inputs):
            t = t.to(self.device).contiguous()
            bound[name] = t
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
        copies = []
        results = []
        for name in [*self.outputs, *self.state]:
            if name in self.aliased:
                ctx.set_tensor_address(name, bound[self.state[name]].data_ptr())
                continue
            out = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=_TRT_TO_TORCH[self.engine.get_tensor_dtype(name)],
                              device=self.device)
            ctx.set_tensor_address(name, out.data_ptr())
            (copies.append((inputs[self.inputs.index(self.state[name])], out)) if name in self.state
             else results.append(out))
        if not ctx.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError("TensorRT failed to run the engine (see its log)")
        for name, t in bound.items():  # inputs moved to the device for the call carry the writes back
            original = inputs[self.inputs.index(name)]
            if t is not original and t.data_ptr() != original.data_ptr() and name in self.state.values():
                original.copy_(t)
        for target, new in copies:
            target.copy_(new)
        return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kiln.backends.trt_engine",
                                     description="Build a kiln TensorRT network folder into FOLDER/model.engine.")
    parser.add_argument("folder", type=Path, help=f"a folder written by kiln (with {DESCRIPTION})")
    parser.add_argument("--workspace-gb", type=float, default=None, help="TensorRT's workspace limit")
    args = parser.parse_args(argv)
    workspace = int(args.workspace_gb * (1 << 30)) if args.workspace_gb else None
    print(f"built {build_engine(args.folder, workspace_bytes=workspace)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
