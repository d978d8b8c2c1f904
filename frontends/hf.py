"""Hugging Face models into the IR: a `transformers` model object, a checkpoint folder
(config.json + safetensors or .bin), or a GGUF file that transformers reads.

The model is built on the meta device from its config (no weights are allocated), its forward
is traced with `torch.export` for a symbolic token count `T`, the aten graph is converted by
`aten.convert`, and each parameter is bound lazily to the checkpoint tensor of the same name.
The graph is the stateless forward of one sequence:

    func @main(%tokens: i32[T], %positions: i32[T]) -> (f32[T,vocab])
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from ..ir.graph import Graph
from ..ir.storage import Storage, TensorStorage
from ..ir.types import DType, TensorType
from . import aten
from .prequantized import CheckpointQuant, bind_quantized, read_checkpoint_quant, to_qdq
from .weights import Checkpoint, CheckpointError, from_state_dict, open_safetensors, open_torch_pickles

TOKENS = "tokens"
POSITIONS = "positions"


class ModelLoadError(ValueError):
    """A model kiln cannot load, with what to do about it."""


@contextlib.contextmanager
def stage(what: str) -> Iterator[None]:
    """Say what a long step is doing and how long it took (stderr, like tqdm)."""
    start = time.perf_counter()
    print(f"kiln: {what} ...", file=sys.stderr, flush=True)
    yield
    print(f"kiln: {what}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def resolve_dtype(dtype: Any, config: Any = None) -> torch.dtype:
    """A user's dtype ("bf16", "float32", DType, torch.dtype, "auto"/None -> the config's)."""
    if dtype is None or dtype == "auto":
        found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(found, str):
            found = getattr(torch, found, None)
        return found if isinstance(found, torch.dtype) and found.is_floating_point else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, DType):
        return dtype.torch
    names = {"f32": torch.float32, "float32": torch.float32, "fp32": torch.float32, "f16": torch.float16,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16}
    if isinstance(dtype, str) and dtype.lower() in names:
        return names[dtype.lower()]
    raise ValueError(f"unknown dtype {dtype!r}; use one of auto, f32, f16, bf16")


@dataclass
class HFModel:
    """What the frontend needs of a model: its config, its weights, and (for a live model
    object) the module to trace."""

    config: Any
    checkpoint: Checkpoint
    module: torch.nn.Module | None = None
    quant: CheckpointQuant | None = None    # what the folder says of its quantization (prequantized.py)


def open_model(source: Any, *, trust_remote_code: bool = False) -> HFModel:
    """Find the config and weights of a model object, checkpoint folder or GGUF file."""
    if isinstance(source, torch.nn.Module):
        config = getattr(source, "config", None)
        if config is None:
            raise ModelLoadError(f"{type(source).__name__} has no .config: pass a transformers model")
        return HFModel(config, from_state_dict(source, f"{type(source).__name__} object"), source.eval())
    path = os.fspath(source)
    if path.endswith(".gguf"):
        return _open_gguf(path)
    if not os.path.isdir(path):
        raise ModelLoadError(f"{path} does not exist" if not os.path.exists(path) else
                             f"{path} is not a model folder, .gguf or .onnx file")
    if not os.path.exists(os.path.join(path, "config.json")):
        ggufs = [f for f in os.listdir(path) if f.endswith(".gguf")]
        if len(ggufs) == 1:
            return _open_gguf(os.path.join(path, ggufs[0]))
        raise ModelLoadError(f"{path} has no config.json: it is not a Hugging Face checkpoint folder")
    config = _load_config(path, trust_remote_code)
    checkpoint = open_safetensors(path)
    if checkpoint is None:
        pickles = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".bin"))
        if not pickles:
            raise ModelLoadError(f"{path} has a config.json but no weights (model.safetensors, a sharded "
                                 f"model.safetensors.index.json, or pytorch_model*.bin)")
        checkpoint = open_torch_pickles(pickles)
    return HFModel(config, checkpoint, quant=read_checkpoint_quant(path, checkpoint.tensors))


def _load_config(path: str, trust_remote_code: bool, **kwargs: Any) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True, **kwargs)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ModelLoadError(f"{path} needs code from the checkpoint to build its model; kiln does not run "
                                 f"it unless you pass trust_remote_code=True (read that code first)") from None
        raise ModelLoadError(f"cannot read the config of {path}: {e}") from None
    except OSError as e:
        raise ModelLoadError(f"cannot read the config of {path}: {e}") from None


def _open_gguf(path: str) -> HFModel:
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    if not os.path.exists(path):
        raise ModelLoadError(f"{path} does not exist")
    folder, name = os.path.split(path)
    with stage(f"reading the GGUF config of {name}"):
        config = _load_config(folder or ".", False, gguf_file=name)
    with torch.device("meta"):
        skeleton = _auto_model(config, torch.float32)
    with stage(f"dequantizing {name}"):
        loaded = load_gguf_checkpoint(path, return_tensors=True, model_to_load=skeleton)
    return HFModel(config, Checkpoint({k: TensorStorage(v) for k, v in loaded["tensors"].items()}, path))


def _auto_model(config: Any, dtype: torch.dtype, attn_implementation: str | None = None) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        return AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs).eval()
    except ValueError as e:
        raise ModelLoadError(f"transformers has no causal-LM class for architecture "
                             f"{getattr(config, 'architectures', None) or config.model_type!r}: {e}") from None


class _Forward(torch.nn.Module):
    """The traced function: one sequence of T tokens at explicit positions to its logits. The
    causal (and sliding-window) mask is built here, over token indices, in one plain form,
    instead of by transformers' mask utilities, which trace into index soup."""

    def __init__(self, model: torch.nn.Module, additive_mask: bool, window: int | None):
        super().__init__()
        self.hf = model
        self.additive_mask = additive_mask
        self.window = window

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        i = torch.arange(tokens.shape[0], device=tokens.device)
        keep = i[None, :] <= i[:, None]
        if self.window:
            keep = keep & (i[:, None] - i[None, :] < self.window)
        mask = keep[None, None]
        if self.additive_mask:
            dtype = self.hf.dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        out = self.hf(input_ids=tokens[None], position_ids=positions[None], attention_mask=mask, use_cache=False)
        return out.logits[0]


def load_hf(source: Any, *, dtype: Any = None, trust_remote_code: bool = False,
            attn_implementation: str = "sdpa") -> Graph:
    """Trace a Hugging Face model into the IR with its weights bound lazily."""
    return trace(open_model(source, trust_remote_code=trust_remote_code), dtype=dtype,
                 attn_implementation=attn_implementation)


def trace(model: HFModel, *, dtype: Any = None, attn_implementation: str = "sdpa") -> Graph:
    """The IR graph of a model whose config and weights are known (any frontend's route here)."""
    config = model.config
    torch_dtype = resolve_dtype(dtype, config) if model.module is None else _module_dtype(model.module, dtype)
    if model.module is not None:
        module = model.module
        impl = getattr(config, "_attn_implementation", None) or attn_implementation
    else:
        module, buffers = _meta_model(config, torch_dtype, attn_implementation)
        model.checkpoint.tensors.update({k: v for k, v in buffers.items() if k not in model.checkpoint.tensors})
        impl = attn_implementation
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    wrapper = _Forward(module, additive_mask=impl == "eager", window=window)
    weights = _bind_tied(model.checkpoint, module, config)
    quantized = model.quant is not None and not model.quant.from_float  # tensors already quantized
    if quantized:
        bind_quantized(weights, model.quant, torch_dtype)
    program = _export(wrapper, module, config)
    T = "T"
    with stage("converting to kiln IR"):
        graph = aten.convert(program, inputs=[(TOKENS, TensorType(DType.i32, (T,))),
                                               (POSITIONS, TensorType(DType.i32, (T,)))],
                             weights=weights, name="main",
                             progress=lambda nodes: tqdm(nodes, desc="converting", unit="op", leave=False))
    if quantized:
        to_qdq(graph)
    _check_weights(graph, model.checkpoint)
    return graph


def _module_dtype(module: torch.nn.Module, dtype: Any) -> torch.dtype:
    have = next(module.parameters()).dtype
    if dtype not in (None, "auto") and resolve_dtype(dtype) != have:
        raise ModelLoadError(f"the model object is {have}; convert it (model.to(...)) or pass its checkpoint "
                             f"folder to choose another dtype")
    return have


def _meta_model(config: Any, dtype: torch.dtype, attn_implementation: str) -> tuple[torch.nn.Module, dict[str, Storage]]:
    """The model with parameters on the meta device and buffers (rotary frequencies, computed in
    __init__ and absent from checkpoints) real; buffers are returned and then moved to meta."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        module = _auto_model(config, dtype, attn_implementation)
    buffers = {k: TensorStorage(v.detach().clone()) for k, v in module.named_buffers()}
    return module.to("meta"), buffers


def _export(wrapper: torch.nn.Module, module: torch.nn.Module, config: Any) -> torch.export.ExportedProgram:
    device = next(module.parameters()).device
    n = 8
    tokens = torch.zeros(n, dtype=torch.int32, device=device)
    positions = torch.arange(n, dtype=torch.int32, device=device)
    # Dim.DYNAMIC rather than a named Dim: older torch (2.11) cannot prove some guards a model's
    # shape arithmetic makes (min(16*T, 32*T) == 16*T) and would refuse a named range; kiln keeps
    # the token count symbolic either way and checks every op's type itself.
    T = torch.export.Dim.DYNAMIC
    name = type(module).__name__
    with stage(f"tracing {name} with torch.export"), torch.no_grad():
        try:
            return torch.export.export(wrapper, (tokens, positions), dynamic_shapes=({0: T}, {0: T}), strict=False)
        except Exception as e:  # torch.export raises many kinds; all mean "this forward does not trace"
            raise ModelLoadError(f"torch.export could not trace {name}: {type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}") from e


def _bind_tied(checkpoint: Checkpoint, module: torch.nn.Module, config: Any) -> dict[str, Storage]:
    """Checkpoint tensors by the module's parameter names: transformers' own renamings of
    checkpoint keys applied (legacy names, base-model prefixes), and tied parameters
    (lm_head <- embed_tokens) pointing at the tensor the checkpoint does hold."""
    weights = _renamed(checkpoint, module)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text_config, "tie_word_embeddings", False):
        out, inp = module.get_output_embeddings(), module.get_input_embeddings()
        if out is not None and inp is not None:
            target, source = _param_name(module, out.weight), _param_name(module, inp.weight)
            if target not in weights and source in weights:
                weights[target] = weights[source]
    return weights


def _renamed(checkpoint: Checkpoint, module: torch.nn.Module) -> dict[str, Storage]:
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # a transformers without checkpoint conversion mappings: names are as saved
        return dict(checkpoint.tensors)
    transforms = get_model_conversion_mapping(module) if hasattr(module, "config") else []
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    expected = dict.fromkeys(k for k, _ in module.named_parameters(remove_duplicate=False))
    expected.update(dict.fromkeys(k for k, _ in module.named_buffers()))
    prefix = getattr(module, "base_model_prefix", None) or None
    out: dict[str, Storage] = {}
    for key, storage in checkpoint.tensors.items():
        name, converter = rename_source_key(key, renamings, converters, prefix, expected)
        if converter is not None:
            raise CheckpointError(f"{checkpoint.source}: tensor {key!r} must be merged or split by transformers' "
                                  f"weight conversion ({converter}) before kiln can bind it; save the model with "
                                  f"save_pretrained from this transformers version first")
        out[name] = storage
    return out


def _param_name(module: torch.nn.Module, param: torch.nn.Parameter) -> str:
    for n, p in module.named_parameters(remove_duplicate=False):
        if p is param:
            return n
    raise KeyError("parameter not found in module")


def _check_weights(graph: Graph, checkpoint: Checkpoint) -> None:
    for name, p in graph.params.items():
        if p.storage is None:
            raise CheckpointError(f"{checkpoint.source} has no tensor {name!r}")


def tokenizer_for(source: Any) -> Any:
    """The tokenizer that comes with a model folder or GGUF file (transformers' own)."""
    from transformers import AutoTokenizer

    path = os.fspath(source)
    if path.endswith(".gguf"):
        folder, name = os.path.split(path)
        return AutoTokenizer.from_pretrained(folder or ".", gguf_file=name, local_files_only=True)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)
