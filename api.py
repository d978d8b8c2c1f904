"""`kiln.compile` and the compiled model: a model in, the serving graph of a target out, and an
artifact folder that loads back without the original model or a second trace.

    compiled = kiln.compile("smollm2", target="auto")       # trace, run the target's pipeline
    compiled.save("smollm2.kiln")                           # model.ir, weights.safetensors, kiln.json
    compiled = kiln.load("smollm2.kiln")                    # parse, map the weights, verify

An artifact is a folder:

    model.ir             the serving graph in the text format, with source locations
    weights.safetensors  every parameter, materialised (derived weights computed, i4 packed two
                         per byte as `TensorType.storage_shape` says); tied weights stored once
    tokenizer/           the model's tokenizer (save_pretrained), when the model came with one
    kiln.json            kiln and format versions, target, dtype, the config the runtime needs,
                         the pipeline that ran, and the size and sha256 of model.ir and the weights
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from tqdm.auto import tqdm

from . import __version__
from .backends import BACKENDS, Backend, TargetUnavailableError, select
from .ir.graph import Graph, Value
from .ir.ops.quant import pack_i4
from .ir.parser import parse
from .ir.printer import print_graph
from .ir.registry import get_op
from .ir.storage import _SAFETENSORS_DTYPES, DerivedStorage, SafetensorsStorage, Storage, safetensors_header
from .ir.types import DType, TensorType
from .ir.verifier import VerificationError, verify
from .passes.kv_cache import METADATA
from .passes.manager import PassManager, PassSpec, parse_pipeline
from .passes.pipelines import PIPELINES

__all__ = ["ArtifactError", "CompiledModel", "FORMAT_VERSION", "QUANT_MODES", "TargetUnavailableError", "compile",
           "is_artifact", "load"]

FORMAT_VERSION = 1
"""Bumped whenever a kiln could no longer read what an earlier one wrote."""

MANIFEST, IR_FILE, WEIGHTS_FILE, TOKENIZER_DIR = "kiln.json", "model.ir", "weights.safetensors", "tokenizer"

QUANT_MODES = ("fp8", "fp8-per-channel", "int8_sq", "int4_awq", "w4a16", "int8_wo", "llm.int8", "fp8_kv")
"""Short forms `compile(quant=...)` takes (a QuantConfig says more; "fp8+fp8_kv" combines)."""

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_ST_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}


class ArtifactError(ValueError):
    """An artifact folder that this kiln cannot load: missing or damaged files, or another version."""

    def __init__(self, folder: Path, file: str, problem: str, source: str | None = None):
        self.folder, self.file = folder, file
        how = f"kiln.compile({source!r}, ...).save({str(folder)!r})" if source else "kiln.compile(model, ...).save(...)"
        super().__init__(f"{folder / file}: {problem}. Recompile the model with this kiln ({__version__}): {how}")


@dataclass
class CompiledModel:
    """A model compiled for one target: the serving graph and what the runtime needs to drive it."""

    graph: Graph                       # the serving graph (packed tokens, paged KV caches)
    target: str                        # a key of kiln.backends.BACKENDS
    dtype: str                         # the float type of the weights and activations ("f32", "bf16", ...)
    config: dict[str, Any]             # vocab_size, num_layers, num_kv_heads, head_dim, tokens_per_block, ...
    stateless: Graph | None = None     # the graph as traced, before any pass (None once loaded from disk)
    tokenizer_source: str | None = None  # a folder or GGUF file tokenizer_for() reads, if the model had one
    target_reason: str = ""            # why this target ("auto chose reference: ...")
    pipeline: str = ""                 # the passes that made `graph`
    device: str = "cpu"                # where the executable runs and the runtime keeps the KV pool
    backend_options: dict[str, Any] = field(default_factory=dict)  # what the target's build left (an engine folder)
    quant: dict[str, Any] | None = None  # how the weights were quantized (QuantConfig.to_json, or the checkpoint's)
    _executable: Any = field(default=None, init=False, repr=False, compare=False)
    _tokenizer: Any = field(default=None, init=False, repr=False, compare=False)

    def executable(self) -> Any:
        """The backend's executable of the serving graph, built once."""
        if self._executable is None:
            self._executable = BACKENDS[self.target].compile(self.graph, device=self.device, **self.backend_options)
        return self._executable

    def shard(self, tp: int, rank: int) -> CompiledModel:
        """Rank `rank`'s part of this model under tp-way tensor parallelism (the shard pass); its
        weights are read, lazily, only where this rank needs them."""
        graph = self.graph.clone()
        spec = PassSpec("shard", (("tp", tp), ("rank", rank)))
        PassManager([spec], verify_each=False).run(graph)
        verify(graph)
        return replace(self, graph=graph, config={**self.config, **_serving_facts(graph)}, stateless=None,
                       pipeline=f"{self.pipeline},{spec}" if self.pipeline else str(spec))

    def tokenizer(self) -> Any | None:
        """The model's tokenizer (transformers), loaded once; None if the model came without one."""
        if self._tokenizer is None and self.tokenizer_source is not None:
            from .frontends.hf import tokenizer_for

            self._tokenizer = tokenizer_for(self.tokenizer_source)
        return self._tokenizer

    def save(self, path: str | os.PathLike, *, progress: bool = True) -> Path:
        """Write the artifact folder, so that serving needs neither the original model nor a trace."""
        params, aliases = _distinct_params(self.graph)  # fails before the folder is touched
        tokenizer = self.tokenizer()
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MANIFEST).unlink(missing_ok=True)  # written last: a half-written folder never looks complete
        files = {IR_FILE: _write_file(folder / IR_FILE, [print_graph(self.graph, locs=True).encode()])}
        files[WEIGHTS_FILE] = _write_weights(folder / WEIGHTS_FILE, params, progress)
        if tokenizer is not None:
            shutil.rmtree(folder / TOKENIZER_DIR, ignore_errors=True)
            tokenizer.save_pretrained(folder / TOKENIZER_DIR)
        manifest = {
            "format_version": FORMAT_VERSION, "kiln_version": __version__, "target": self.target,
            "target_reason": self.target_reason, "dtype": self.dtype, "pipeline": self.pipeline,
            "config": self.config, "tokenizer": TOKENIZER_DIR if tokenizer is not None else None,
            "aliases": aliases, "files": files, "quant": self.quant,
        }
        _write_file(folder / MANIFEST, [json.dumps(manifest, indent=2).encode() + b"\n"])
        return folder


# -- compile -------------------------------------------------------------------------------------


def compile(model: Any, target: str = "auto", quant: str | None = None, dtype: Any = "auto", *,
            pipeline: str | None = None, tokens_per_block: int = 16, trust_remote_code: bool = False,
            progress: bool = True, device: str | None = None, output_dir: str | os.PathLike | None = None,
            build_config: Any = None) -> CompiledModel:
    """Trace or import `model` (anything `kiln.frontends.load` takes, or a stateless `Graph`) and
    run the target's pipeline; `pipeline` replaces that pipeline, kv-cache block size included.
    `device` defaults to the GPU where there is one. Targets that build ahead of serving write
    into `output_dir` (trt: the network, then the engine, sized by `build_config`, a BuildConfig;
    onnx: model.onnx); where TensorRT does not import, target="trt" stops after writing the
    network, with the commands that build the engine."""
    quant_config = _quant_config(quant)
    backend, reason = select(target)
    if quant_config is not None:
        quant_config.check_device(_gpu_capability(backend.name, _device(device)))
    if not isinstance(tokens_per_block, int) or isinstance(tokens_per_block, bool) or tokens_per_block < 1:
        raise ValueError(f"tokens_per_block must be a positive int, got {tokens_per_block!r}")
    specs = _pipeline(backend, pipeline, tokens_per_block)  # a bad pipeline fails before a long trace
    checkpoint_quant, quant_config = _checkpoint_quant(model, quant_config, backend.name, _device(device))
    if isinstance(model, Graph):
        _check_graph_dtype(model, dtype)
        stateless, facts, tokenizer_source = model, {}, None
    else:
        from . import frontends

        stateless = frontends.load(model, dtype=dtype, trust_remote_code=trust_remote_code)
        with _stage(progress, "reading the model's config for the runtime"):
            facts, tokenizer_source = _source_facts(frontends.resolve(model))
        if isinstance(model, (str, os.PathLike)):
            facts["source"] = os.path.abspath(model) if os.path.exists(model) else os.fspath(model)
    graph = stateless.clone()
    record = specs
    if quant_config is not None or checkpoint_quant is not None:
        specs, record = _quantized_pipeline(graph, specs, quant_config, backend.name, tokenizer_source,
                                            _device(device), progress)
    with _stage(progress, f"compiling for {backend.name} ({len(specs)} passes)"):
        PassManager(specs, verify_each=False).run(graph)
        verify(graph)
    config = {**_serving_facts(graph), **_unknown_facts(), **facts}
    built = backend.build(graph, output_dir=output_dir, build_config=build_config,
                          max_positions=config.get("max_positions"), progress=progress)
    quant_record = quant_config.to_json() if quant_config is not None else None
    if checkpoint_quant is not None and not checkpoint_quant.from_float:
        quant_record = {"checkpoint": checkpoint_quant.algo, "source": checkpoint_quant.source}
    return CompiledModel(graph, backend.name, _compute_dtype(graph), config,
                         stateless, tokenizer_source, reason, ",".join(map(str, record)), _device(device), built,
                         quant_record)


def _device(device: str | None) -> str:
    return device if device is not None else "cuda" if torch.cuda.is_available() else "cpu"


def _quant_config(quant: Any) -> Any:
    """compile's `quant` as a QuantConfig (checked), or None."""
    if quant is None:
        return None
    from .passes.quantize import QuantConfig

    try:
        return QuantConfig.of(quant)
    except ValueError as e:
        raise ValueError(f"quant={quant!r}: {e}. Short forms: {', '.join(QUANT_MODES)}; or a "
                         f"kiln.QuantConfig; quant=None compiles in the model's own dtype") from None


def _gpu_capability(target: str, device: str) -> tuple[int, int] | None:
    """The compute capability that will run quantized GEMMs: a GPU target's, None for the interpreter."""
    if target == "reference" or not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(torch.device(device))


def _checkpoint_quant(model: Any, quant_config: Any, target: str, device: str) -> tuple[Any, Any]:
    """What a model folder says of its quantization (quant_config.json, config.json), and the
    QuantConfig to apply: the caller's, or the folder's when it asks for quantization at load time
    (from_float). A folder of quantized tensors takes no quant of its own."""
    from .frontends import resolve
    from .frontends.prequantized import read_checkpoint_quant
    from .frontends.weights import open_safetensors
    from .passes.quantize import QuantConfig

    source = os.fspath(resolve(model)) if isinstance(model, (str, os.PathLike)) else None
    if source is None or not os.path.isfile(os.path.join(source, "config.json")):
        return None, quant_config
    checkpoint = open_safetensors(source)   # headers only: FP8 checkpoints are known by their tensors
    found = read_checkpoint_quant(source, checkpoint.tensors if checkpoint is not None else None)
    if found is None:
        return None, quant_config
    if quant_config is not None:
        what = f"asks to be quantized with {found.algo} at load time" if found.from_float else \
            f"is quantized already ({found.algo})"
        raise ValueError(f"{found.source} {what}; compile it with quant=None, or give quant= for a float checkpoint")
    if not found.from_float:
        return found, None
    config = QuantConfig(found.algo, group_size=found.group_size, zero_point=found.zero_point)
    config.check_device(_gpu_capability(target, device))
    return found, config


def _quantized_pipeline(graph: Graph, specs: list[PassSpec], config: Any, target: str, tokenizer: str | None,
                        device: str, progress: bool) -> tuple[list[PassSpec], list[PassSpec]]:
    """The target's passes with quantization on the stateless fused graph, before kv-cache:
    calibration (when the algorithm needs it), smooth / awq, quantize; then the rest, and the
    target's fusion of Q/DQ into quantized GEMMs. Runs the passes up to kv-cache on `graph` and
    returns (the passes still to run, the whole pipeline)."""
    from .passes.calibrate import attach_calibration
    from .passes.pipelines import QUANTIZED_LINEAR_FUSION

    split = next((i for i, s in enumerate(specs) if s.name == "kv-cache"), len(specs))
    fusion = parse_pipeline(QUANTIZED_LINEAR_FUSION[target]) if target in QUANTIZED_LINEAR_FUSION else []
    if config is None:  # a checkpoint quantized already: its Q/DQ only needs the target's fusion
        return [*specs, *fusion], [*specs, *fusion]
    with _stage(progress, "preparing the stateless graph for quantization"):
        PassManager(specs[:split], verify_each=False).run(graph)
    config.check_graph(graph)  # before calibration: an int4 group size that cannot fit fails here
    calibrate = []
    if config.calibration is not None:
        attach_calibration(graph, config.calibration)
    elif config.needs_calibration and config.calib_tokens is not None:
        from .passes.calibrate import calibrate_text

        attach_calibration(graph, calibrate_text(graph, None, tokens=config.calib_tokens, samples=config.calib_size,
                                                 length=config.calib_seq_len, rows=config.calibration_rows,
                                                 hessian=config.needs_hessian, progress=progress, device=device))
    elif config.needs_calibration:
        if tokenizer is None:
            raise ValueError(f"{config.pipeline()} needs calibration text, read with the model's tokenizer, and this "
                             f"model came without one: compile its checkpoint folder, or give token ids to calibrate on: "
                             f"QuantConfig(..., calib_tokens=ids)")
        calibrate = [PassSpec("calibrate", (("tokenizer", tokenizer), ("samples", config.calib_size),
                                            ("length", config.calib_seq_len), ("rows", config.calibration_rows),
                                            *((("hessian", True),) if config.needs_hessian else ()),
                                            ("device", device)))]
    quant = [*calibrate, *parse_pipeline(config.pipeline())]
    with _stage(progress, f"quantizing: {', '.join(map(str, quant))}"):
        PassManager(quant, verify_each=False).run(graph)
    rest = [*specs[split:], *fusion]
    return rest, [*specs[:split], *quant, *rest]


def _pipeline(backend: Backend, pipeline: str | None, block: int) -> list[PassSpec]:
    """The target's named pipeline with the KV-cache block size set, or the caller's pipeline as given."""
    if pipeline is not None:
        return parse_pipeline(pipeline)
    specs = parse_pipeline(PIPELINES[backend.pipeline])
    return [replace(s, options=tuple({**dict(s.options), "block": block}.items())) if s.name == "kv-cache" else s
            for s in specs]


def _check_graph_dtype(graph: Graph, dtype: Any) -> None:
    if dtype in (None, "auto"):
        return
    from .frontends.hf import resolve_dtype

    want, have = DType.from_torch(resolve_dtype(dtype)), _compute_dtype(graph)
    if want.value != have:
        raise ValueError(f"dtype={dtype!r} applies when kiln traces a model; this graph is already {have}: "
                         f"load the model again with dtype={dtype!r} or pass dtype='auto'")


@contextlib.contextmanager
def _stage(progress: bool, what: str) -> Iterator[None]:
    if not progress:
        yield
        return
    from .frontends.hf import stage

    with stage(what):
        yield


def _serving_facts(graph: Graph) -> dict[str, Any]:
    """What the runtime needs to size and drive the KV pool, read off the serving graph itself."""
    names = [v.name for v in graph.inputs]
    caches = [v for v in graph.inputs if v.name.startswith(("k_cache.", "v_cache."))]
    if names[:2] != ["tokens", "positions"] or any(m not in names for m in METADATA) or not caches:
        raise ValueError(f"the pipeline did not produce a serving graph (inputs: {', '.join(names)}); "
                         f"a pipeline for the runtime must run kv-cache, as the named pipeline 'serving' does")
    if len({v.type for v in caches}) != 1:
        raise ValueError(f"the runtime keeps one KV pool, but the layers' caches differ: "
                         f"{', '.join(f'{v.ref}: {v.type}' for v in caches)}")
    _, block, kv_heads, head_dim = caches[0].type.shape
    return {"vocab_size": graph.outputs[0].type.shape[-1], "num_layers": len(caches) // 2,
            "num_kv_heads": kv_heads, "head_dim": head_dim, "tokens_per_block": block,
            "cache_dtype": caches[0].type.dtype.value}


def _compute_dtype(graph: Graph) -> str:
    """The float type holding most weight elements (norms in f32 do not make a bf16 model f32)."""
    count: dict[DType, int] = {}
    for p in graph.params.values():
        if p.type.dtype in (DType.f32, DType.f16, DType.bf16) and p.type.is_static:
            count[p.type.dtype] = count.get(p.type.dtype, 0) + p.type.numel()
    return max(count, key=count.get).value if count else DType.f32.value


def _unknown_facts() -> dict[str, Any]:
    """The source's facts that every config has, None (or no ids) where the source does not say."""
    return {"max_positions": None, "eos_token_ids": [], "bos_token_id": None, "architecture": None, "source": None}


def _source_facts(source: Any) -> tuple[dict[str, Any], str | None]:
    """Facts only the source knows (max positions, eos/bos ids, architecture) and where its tokenizer is."""
    if isinstance(source, torch.nn.Module):
        return _config_facts(source.config, getattr(source, "generation_config", None)), None
    from transformers import AutoConfig

    from .frontends.meta import is_meta_checkpoint

    path = os.fspath(source)
    if is_meta_checkpoint(path):  # its tokenizer.model is not one transformers reads
        with open(os.path.join(path, "params.json")) as f:
            return {"max_positions": json.load(f).get("max_seq_len")}, None
    ggufs = [f for f in os.listdir(path) if f.endswith(".gguf")] if os.path.isdir(path) else []
    if path.endswith(".gguf") or (not _has(path, "config.json") and len(ggufs) == 1):
        gguf = path if path.endswith(".gguf") else os.path.join(path, ggufs[0])
        config = AutoConfig.from_pretrained(os.path.dirname(gguf) or ".", gguf_file=os.path.basename(gguf),
                                            local_files_only=True)
        return _config_facts(config, None), gguf
    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."  # a checkpoint, or an ONNX file's folder
    facts: dict[str, Any] = {}
    if _has(folder, "config.json"):
        generation = None
        if _has(folder, "generation_config.json"):
            with open(os.path.join(folder, "generation_config.json")) as f:
                generation = json.load(f)
        facts = _config_facts(AutoConfig.from_pretrained(folder, local_files_only=True), generation)
    return facts, folder if any(_has(folder, f) for f in _TOKENIZER_FILES) else None


def _has(folder: str, name: str) -> bool:
    return os.path.exists(os.path.join(folder, name))


def _config_facts(config: Any, generation: Any) -> dict[str, Any]:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config

    def ids(value: Any) -> list[int]:
        return [] if value is None else [int(value)] if isinstance(value, int) else [int(v) for v in value]

    def get(obj: Any, key: str) -> Any:
        return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)

    eos = list(dict.fromkeys(ids(get(generation, "eos_token_id")) + ids(get(text, "eos_token_id"))))
    bos = get(generation, "bos_token_id")
    return {"max_positions": get(text, "max_position_embeddings"), "eos_token_ids": eos,
            "bos_token_id": get(text, "bos_token_id") if bos is None else bos,
            "architecture": (getattr(config, "architectures", None) or [getattr(config, "model_type", None)])[0]}


# -- save ----------------------------------------------------------------------------------------


def _write_file(path: Path, chunks: Iterable[bytes], total: int | None = None, desc: str | None = None,
                progress: bool = False) -> dict[str, Any]:
    """Write byte chunks to `path` via a temporary file (the old file stays whole, and readable by
    anyone who has it mapped, until the new one is complete); returns its size and sha256."""
    digest, size = hashlib.sha256(), 0
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f, tqdm(total=total, desc=desc, unit="B", unit_scale=True,
                                        disable=not progress) as bar:
            for chunk in chunks:
                f.write(chunk)
                digest.update(chunk)
                size += len(chunk)
                bar.update(len(chunk))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return {"bytes": size, "sha256": digest.hexdigest()}


def _stored_type(t: TensorType) -> TensorType:
    """The type a parameter has on disk: i4 packed two per byte into u8."""
    return TensorType(DType.u8, t.storage_shape()) if t.dtype is DType.i4 else t


def _distinct_params(graph: Graph) -> tuple[list[Value], dict[str, str]]:
    """The parameters to write, and the aliases of those that share a storage (tied weights)."""
    written: dict[int, str] = {}
    aliases: dict[str, str] = {}
    params: list[Value] = []
    for name, p in graph.params.items():
        if p.storage is None:
            raise ValueError(f"parameter {p.ref} has no data to save; bind the model's weights first")
        if not p.type.is_static:
            raise ValueError(f"parameter {p.ref} has a symbolic shape ({p.type}) and cannot be saved")
        if id(p.storage) in written:
            aliases[name] = written[id(p.storage)]
        else:
            written[id(p.storage)] = name
            params.append(p)
    return params, aliases


def _write_weights(path: Path, params: list[Value], progress: bool) -> dict[str, Any]:
    """Stream the parameters into one safetensors file, one tensor in memory at a time (plus the
    inputs that derived weights still to be written need)."""
    params = sorted(params, key=lambda p: -_stored_type(p.type).dtype.bits)  # each aligned to its element size
    header: dict[str, Any] = {}
    offset = 0
    for p in params:
        t = _stored_type(p.type)
        end = offset + t.nbytes()
        header[p.name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, end]}
        offset = end
    header["__metadata__"] = {"format": "pt", "writer": f"kiln {__version__}"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % 64)  # the data starts 64-byte aligned in the (page-aligned) mapping

    def chunks() -> Iterator[bytes]:
        yield struct.pack("<Q", len(blob)) + blob
        weights = _Materialiser([p.storage for p in params])
        for p in params:
            tensor = _as_stored(p, weights.take(p.storage))
            yield tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data

    return _write_file(path, chunks(), offset + 8 + len(blob), "writing weights", progress)


def _as_stored(p: Value, tensor: torch.Tensor) -> torch.Tensor:
    want = _stored_type(p.type)
    tensor = tensor.detach().cpu()
    if p.type.dtype is DType.i4 and tensor.dtype == torch.int8 and tuple(tensor.shape) == p.type.shape:
        tensor = pack_i4(tensor)
    if tensor.dtype != want.dtype.torch or tuple(tensor.shape) != want.shape:
        raise ValueError(f"parameter {p.ref}: its storage ({p.storage.describe()}) holds {tensor.dtype} "
                         f"{tuple(tensor.shape)}, not {want}")
    return tensor


class _Materialiser:
    """Loads storages for writing: every storage is read or computed once, and kept only while a
    derived storage that is still to be written needs it."""

    def __init__(self, roots: list[Storage]):
        self.pending: dict[int, int] = {}
        self.cache: dict[int, torch.Tensor] = {}
        seen: set[int] = set()

        def visit(s: Storage) -> None:
            if id(s) in seen:
                return
            seen.add(id(s))
            for i in s.inputs if isinstance(s, DerivedStorage) else ():
                self.pending[id(i)] = self.pending.get(id(i), 0) + 1
                visit(i)

        for r in roots:
            self.pending[id(r)] = self.pending.get(id(r), 0) + 1
            visit(r)

    def take(self, s: Storage) -> torch.Tensor:
        t = self._get(s)
        self._release(s)
        return t

    def _get(self, s: Storage) -> torch.Tensor:
        if id(s) not in self.cache:
            if isinstance(s, DerivedStorage):
                args = [self._get(i) for i in s.inputs]
                with torch.no_grad():
                    self.cache[id(s)] = get_op(s.op_name).run_reference(*args, **s.attrs)[s.result_index]
                for i in s.inputs:
                    self._release(i)
            else:
                self.cache[id(s)] = s.load()
        return self.cache[id(s)]

    def _release(self, s: Storage) -> None:
        self.pending[id(s)] -= 1
        if self.pending[id(s)] == 0:
            self.cache.pop(id(s), None)


# -- load ----------------------------------------------------------------------------------------


def is_artifact(path: Any) -> bool:
    """Whether `path` is a folder that `load` reads (it has a kiln.json)."""
    return isinstance(path, (str, os.PathLike)) and os.path.isfile(os.path.join(path, MANIFEST))


def load(path: str | os.PathLike, *, device: str | None = None, check_weights: bool = True,
         progress: bool = True) -> CompiledModel:
    """Load an artifact folder written by `CompiledModel.save`: parse the IR, map the weights
    lazily, verify. `check_weights=False` skips hashing the weights file (its size is still checked)."""
    folder = Path(path)
    manifest = _read_manifest(folder)
    source = _source(manifest)

    def error(file: str, problem: str) -> ArtifactError:
        return ArtifactError(folder, file, problem, source)

    if manifest["target"] not in BACKENDS:
        raise error(MANIFEST, f"names target {manifest['target']!r}, which this kiln does not know "
                              f"(known: {', '.join(BACKENDS)})")
    for name in (IR_FILE, WEIGHTS_FILE):
        want = manifest["files"][name]
        file = folder / name
        if not file.is_file():
            raise error(name, "is missing")
        size = file.stat().st_size
        if size != want["bytes"]:
            what = "truncated" if size < want["bytes"] else "longer than written"
            raise error(name, f"is {what}: {size} bytes, kiln.json says {want['bytes']}")
        if name == IR_FILE or check_weights:
            if _sha256(file, progress and name == WEIGHTS_FILE) != want["sha256"]:
                raise error(name, "does not match the sha256 in kiln.json: the file was changed or damaged")
    try:
        graph = parse((folder / IR_FILE).read_text(), source=str(folder / IR_FILE))
    except ValueError as e:
        raise error(IR_FILE, f"does not parse: {e}") from None
    try:
        header = safetensors_header(str(folder / WEIGHTS_FILE))
    except (ValueError, TypeError) as e:
        raise error(WEIGHTS_FILE, f"is not readable: {e}") from None
    storages: dict[str, SafetensorsStorage] = {}
    for name, p in graph.params.items():
        key = manifest["aliases"].get(name, name)
        if key not in header:
            raise error(WEIGHTS_FILE, f"has no tensor {key!r} for parameter {p.ref}")
        if key not in storages:
            storages[key] = SafetensorsStorage(str(folder / WEIGHTS_FILE), key, header[key])
        p.storage = storages[key]
    try:
        verify(graph)
    except VerificationError as e:
        raise error(IR_FILE, f"does not fit its weights: {e}") from None
    tokenizer = manifest["tokenizer"]
    if tokenizer is not None and not (folder / tokenizer).is_dir():
        raise error(tokenizer, "is missing (kiln.json says the model has a tokenizer there)")
    return CompiledModel(graph, manifest["target"], manifest["dtype"], manifest["config"], None,
                         str(folder / tokenizer) if tokenizer is not None else None,
                         manifest["target_reason"], manifest["pipeline"], _device(device),
                         quant=manifest.get("quant"))


def _read_manifest(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise ArtifactError(folder, "", "is not a folder (a compiled model is saved as one)")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise ArtifactError(folder, MANIFEST, "is missing: the folder is not a kiln artifact, or saving it "
                                              "did not finish") from None
    except ValueError as e:
        raise ArtifactError(folder, MANIFEST, f"is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(folder, MANIFEST, "is not a JSON object")
    source = _source(manifest)
    version, fmt = manifest.get("kiln_version"), manifest.get("format_version")
    if fmt != FORMAT_VERSION:
        raise ArtifactError(folder, MANIFEST, f"was written by kiln {version} in artifact format {fmt}; this kiln "
                                              f"({__version__}) reads format {FORMAT_VERSION}", source)
    if not isinstance(version, str) or version.split(".")[:2] != __version__.split(".")[:2]:
        raise ArtifactError(folder, MANIFEST, f"was written by kiln {version}; this kiln is {__version__}, and "
                                              f"artifacts are kept only within one major.minor version", source)
    keys = ("target", "target_reason", "dtype", "pipeline", "config", "tokenizer", "aliases", "files")
    missing = [k for k in keys if k not in manifest] + [
        f"files.{f}" for f in (IR_FILE, WEIGHTS_FILE)
        if not isinstance(manifest.get("files", {}).get(f), dict) or {"bytes", "sha256"} - manifest["files"][f].keys()]
    if missing:
        raise ArtifactError(folder, MANIFEST, f"lacks {', '.join(missing)}", source)
    return manifest


def _source(manifest: dict[str, Any]) -> str | None:
    """The model the artifact was compiled from, for the message that says how to recompile it."""
    config = manifest.get("config")
    return config.get("source") if isinstance(config, dict) else None


def _sha256(path: Path, progress: bool) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, desc=f"checking {path.name}", unit="B",
                                     unit_scale=True, disable=not progress) as bar:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()

