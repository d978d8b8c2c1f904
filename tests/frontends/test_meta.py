"""Meta Llama checkpoints: made in the test from a random HF Llama by the inverse of the rotary
permutation, in one and in two model-parallel shards, they give the HF model's logits."""

import json

import pytest
import torch
import transformers as tf

from kiln.backends import reference
from kiln.frontends import load
from kiln.frontends.hf import ModelLoadError
from kiln.frontends.meta import is_meta_checkpoint
from kiln.frontends.weights import CheckpointError

HEADS, KV_HEADS, LAYERS = 4, 2, 2
# meta name -> (HF name, dim split across model-parallel shards, or None if replicated)
LAYER = {"attention.wq.weight": ("self_attn.q_proj.weight", 0), "attention.wk.weight": ("self_attn.k_proj.weight", 0),
         "attention.wv.weight": ("self_attn.v_proj.weight", 0), "attention.wo.weight": ("self_attn.o_proj.weight", 1),
         "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0), "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
         "feed_forward.w3.weight": ("mlp.up_proj.weight", 0), "attention_norm.weight": ("input_layernorm.weight", None),
         "ffn_norm.weight": ("post_attention_layernorm.weight", None)}
TOP = {"tok_embeddings.weight": ("model.embed_tokens.weight", 1), "norm.weight": ("model.norm.weight", None),
       "output.weight": ("lm_head.weight", 0)}


def to_pairs(w, heads):
    """HF keeps rotary halves per head; Meta interleaves the pairs (the inverse of HF's conversion)."""
    rows, cols = w.shape
    return w.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                            num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, rms_norm_eps=1e-5,
                            rope_theta=10000.0, tie_word_embeddings=False)
    return tf.LlamaForCausalLM(config).eval()


def write_meta(model, folder, shards):
    sd = model.state_dict()
    names = dict(TOP)
    for i in range(LAYERS):
        names.update({f"layers.{i}.{k}": (f"model.layers.{i}.{v}", d) for k, (v, d) in LAYER.items()})
    parts = [{} for _ in range(shards)]
    for meta_name, (hf_name, dim) in names.items():
        w = sd[hf_name]
        if meta_name.endswith("wq.weight"):
            w = to_pairs(w, HEADS)
        elif meta_name.endswith("wk.weight"):
            w = to_pairs(w, KV_HEADS)
        pieces = [w] * shards if dim is None else list(w.chunk(shards, dim))
        for part, piece in zip(parts, pieces):
            part[meta_name] = piece.clone()
    folder.mkdir()
    for i, part in enumerate(parts):
        torch.save(part, folder / f"consolidated.{i:02d}.pth")
    (folder / "params.json").write_text(json.dumps({"dim": 64, "n_layers": LAYERS, "n_heads": HEADS,
                                                    "n_kv_heads": KV_HEADS, "vocab_size": 128, "norm_eps": 1e-5,
                                                    "rope_theta": 10000.0, "multiple_of": 32}))
    return folder


@pytest.mark.parametrize("shards", [1, 2])
def test_meta_checkpoint_matches_hf(hf_model, tmp_path, shards):
    folder = write_meta(hf_model, tmp_path / "meta", shards)
    assert is_meta_checkpoint(str(folder))
    graph = load(folder)
    ids = torch.randint(0, 128, (9,))
    got = reference.run(graph, ids.int(), torch.arange(9, dtype=torch.int32))[0]
    with torch.no_grad():
        want = hf_model(ids[None]).logits[0]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_meta_errors(hf_model, tmp_path):
    folder = write_meta(hf_model, tmp_path / "meta", 2)
    part = torch.load(folder / "consolidated.01.pth")
    del part["layers.1.attention.wq.weight"]
    torch.save(part, folder / "consolidated.01.pth")
    with pytest.raises(ModelLoadError, match=r"consolidated.01.pth lacks .layers.1.attention.wq.weight., which .*consolidated.00.pth has"):
        load(folder)
    folder = write_meta(hf_model, tmp_path / "meta2", 1)
    (folder / "params.json").write_text(json.dumps({"n_layers": 2}))
    with pytest.raises(ModelLoadError, match="params.json lacks 'dim'"):
        load(folder)


def test_pickles_never_run_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (exec, ("open('/tmp/kiln_pwned', 'w')",))

    folder = tmp_path / "evil"
    folder.mkdir()
    torch.save({"tok_embeddings.weight": Payload()}, folder / "consolidated.00.pth")
    (folder / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4}))
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load(folder)
    import os
    assert not os.path.exists("/tmp/kiln_pwned")
