"""Meta's own Llama checkpoints (`params.json` + `consolidated.NN.pth`) into the same graph as the
HF route: the folder becomes an HF Llama config and a lazily renamed, re-sharded and
re-permuted view of its tensors, and is then traced like any HF model.

Meta's q/k projections keep each head's rotary pairs interleaved (GPT-J style); HF's Llama
rotates halves, so wq/wk rows are permuted per head on load (a lazy derived storage)."""

from __future__ import annotations

import glob
import json
import os
from typing import Any

from ..ir.graph import Graph
from ..ir.storage import DerivedStorage, Storage
from .hf import HFModel, ModelLoadError, trace
from .weights import Checkpoint, open_torch_pickles

# Meta name -> (HF name, the dim along which model-parallel shards are concatenated; None if replicated)
_LAYER_NAMES = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}
_TOP_NAMES = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", 1),
    "norm.weight": ("model.norm.weight", None),
    "output.weight": ("lm_head.weight", 0),
}


def is_meta_checkpoint(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "params.json")) and bool(
        glob.glob(os.path.join(path, "consolidated.*.pth")))


def load_meta(folder: str, *, dtype: Any = None) -> Graph:
    """Trace a Meta Llama checkpoint folder into the IR."""
    return trace(open_meta(folder), dtype=dtype)


def open_meta(folder: str) -> HFModel:
    params_path = os.path.join(folder, "params.json")
    try:
        with open(params_path) as f:
            params = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {params_path}: {e}") from None
    shards = sorted(glob.glob(os.path.join(folder, "consolidated.*.pth")))
    if not shards:
        raise ModelLoadError(f"{folder} has params.json but no consolidated.NN.pth weights")
    parts = [open_torch_pickles([s]) for s in shards]
    tensors = _merge(parts, shards)
    config = _config(params, tensors)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    for i in range(config.num_hidden_layers):
        for proj, n in (("q_proj", heads), ("k_proj", kv_heads)):
            name = f"model.layers.{i}.self_attn.{proj}.weight"
            if name in tensors:
                tensors[name] = _halves_from_pairs(tensors[name], n)
    return HFModel(config, Checkpoint(tensors, folder))


def _merge(parts: list[Checkpoint], shards: list[str]) -> dict[str, Storage]:
    """Rename to HF names and concatenate model-parallel shards (lazily)."""
    out: dict[str, Storage] = {}
    for meta_name in parts[0].tensors:
        hf_name, dim = _hf_name(meta_name)
        if hf_name is None:
            continue
        pieces = []
        for part, path in zip(parts, shards):
            if meta_name not in part.tensors:
                raise ModelLoadError(f"{path} lacks {meta_name!r}, which {shards[0]} has: the shards do not match")
            pieces.append(part.tensors[meta_name])
        if len(pieces) == 1 or dim is None:
            out[hf_name] = pieces[0]
        else:
            shape = list(pieces[0].type.shape)
            shape[dim] = sum(p.type.shape[dim] for p in pieces)
            out[hf_name] = DerivedStorage("core.concat", pieces, {"dim": dim}, pieces[0].type.with_shape(shape))
    return out


def _hf_name(meta_name: str) -> tuple[str | None, int | None]:
    if meta_name in _TOP_NAMES:
        return _TOP_NAMES[meta_name]
    parts = meta_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[2] in _LAYER_NAMES:
        name, dim = _LAYER_NAMES[parts[2]]
        return f"model.layers.{parts[1]}.{name}", dim
    if meta_name.endswith("rope.freqs"):
        return None, None  # recomputed from params.json
    raise ModelLoadError(f"unknown tensor {meta_name!r} in a Meta Llama checkpoint")


def _halves_from_pairs(w: Storage, heads: int) -> Storage:
    """Reorder each head's rows from interleaved rotary pairs to halves (HF's layout)."""
    rows, cols = w.type.shape
    head_dim = rows // heads
    split = DerivedStorage("core.reshape", [w], {"shape": (heads, head_dim // 2, 2, cols)},
                           w.type.with_shape((heads, head_dim // 2, 2, cols)))
    swapped = DerivedStorage("core.permute", [split], {"dims": (0, 2, 1, 3)},
                             w.type.with_shape((heads, 2, head_dim // 2, cols)))
    return DerivedStorage("core.reshape", [swapped], {"shape": (rows, cols)}, w.type)


def _config(params: dict[str, Any], tensors: dict[str, Storage]) -> Any:
    from transformers import LlamaConfig

    try:
        dim, layers, heads = params["dim"], params["n_layers"], params["n_heads"]
    except KeyError as e:
        raise ModelLoadError(f"params.json lacks {e.args[0]!r}") from None
    vocab = tensors["model.embed_tokens.weight"].type.shape[0]
    if params.get("vocab_size", -1) > 0 and params["vocab_size"] != vocab:
        raise ModelLoadError(f"params.json says vocab_size {params['vocab_size']} but tok_embeddings has {vocab} rows")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(params.get("rope_theta", 10000.0))}
    if params.get("use_scaled_rope"):
        rope.update(rope_type="llama3", factor=float(params.get("rope_scaling_factor", 8.0)), low_freq_factor=1.0,
                    high_freq_factor=4.0, original_max_position_embeddings=8192)
    return LlamaConfig(
        vocab_size=vocab, hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=params.get("n_kv_heads") or heads,
        intermediate_size=tensors["model.layers.0.mlp.gate_proj.weight"].type.shape[0],
        rms_norm_eps=float(params.get("norm_eps", 1e-5)), rope_parameters=rope,
        max_position_embeddings=int(params.get("max_seq_len", 8192)),
        tie_word_embeddings="lm_head.weight" not in tensors)
