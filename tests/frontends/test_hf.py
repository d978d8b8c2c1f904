"""The Hugging Face frontend: logits match transformers itself (f32, CPU, reference backend) for
tiny random models of several architectures, for SmolLM2 with its real weights, and for every
way a model can be handed over; bad input is a clear error."""

import json
import os
import shutil

import pytest
import torch
import transformers as tf

from kiln.backends import reference
from kiln.frontends import load
from kiln.frontends.aten import UnsupportedOpError, convert
from kiln.frontends.hf import ModelLoadError, load_hf
from kiln.frontends.weights import CheckpointError
from kiln.ir import DType, SafetensorsStorage, TensorStorage, TensorType, verify

# Converted graphs do the same arithmetic as the eager model in the same order; what is left
# is float reassociation inside matmul/attention kernels (a few ulp at logit scale).
ATOL = 2e-5

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
ARCHITECTURES = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {"rope_parameters": LLAMA3_ROPE}),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": 4}),  # shorter than the prompts
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),                             # q/k/v bias
    "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, {"head_dim": 16}),               # (1 + w) norm, gelu
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, {"pad_token_id": 0}),                # fused qkv / gate_up
    "gpt_neox": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, {}),                       # layer norm, partial rope, renamed lm_head
}


def logits(graph, ids):
    positions = torch.arange(len(ids), dtype=torch.int32)
    return reference.run(graph, ids.int(), positions)[0]


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids[None].long()).logits[0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each tiny architecture saved with save_pretrained, once per module."""
    out = {}
    for name, (config_cls, model_cls, extra) in ARCHITECTURES.items():
        torch.manual_seed(0)
        model = model_cls(config_cls(**TINY, **extra)).eval()
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = (model, str(path))
    return out


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_logits_match_transformers(arch, saved):
    model, path = saved[arch]
    graph = load(path, dtype="f32")
    verify(graph)
    assert graph.inputs[0].type == TensorType(DType.i32, ("T",))
    assert graph.outputs[0].type == TensorType(DType.f32, ("T", 128))
    g = torch.Generator().manual_seed(1)
    for n in (1, 7, 13):  # 13 > the Mistral window of 4
        ids = torch.randint(0, 128, (n,), generator=g)
        torch.testing.assert_close(logits(graph, ids), hf_logits(model, ids), atol=ATOL, rtol=0)


def test_eager_attention_traces_to_the_same_function(saved):
    model, path = saved["llama"]
    graph = load_hf(path, attn_implementation="eager")
    assert "core.softmax" in graph.op_counts() and "llm.attention" not in graph.op_counts()
    ids = torch.randint(0, 128, (9,))
    torch.testing.assert_close(logits(graph, ids), hf_logits(model, ids), atol=ATOL, rtol=0)


def test_model_object_and_source_locations(saved):
    model, _ = saved["qwen2"]
    graph = load(model)
    ids = torch.randint(0, 128, (6,))
    torch.testing.assert_close(logits(graph, ids), hf_logits(model, ids), atol=ATOL, rtol=0)
    locs = {op.loc for op in graph.ops if op.name == "llm.linear"}
    assert "model.layers.1.self_attn.q_proj" in locs and "lm_head" in locs
    with pytest.raises(ModelLoadError, match="convert it"):
        load(model, dtype="bf16")


def test_weights_are_bound_lazily_and_read_once(saved, monkeypatch):
    _, path = saved["llama"]
    reads = []
    original = SafetensorsStorage.load
    monkeypatch.setattr(SafetensorsStorage, "load", lambda self: reads.append(self.key) or original(self))
    graph = load(path)
    assert reads == []  # tracing and binding read headers only
    assert all(isinstance(p.storage, SafetensorsStorage) for n, p in graph.params.items() if "inv_freq" not in n)
    exe = reference.compile(graph)
    for _ in range(2):
        exe(torch.tensor([1, 2, 3], dtype=torch.int32), torch.arange(3, dtype=torch.int32))
    assert sorted(reads) == sorted(set(reads)) and len(reads) == len(graph.params) - 2  # not the two rope buffers


def test_bf16_graph_and_dtype_choice(saved):
    model, path = saved["llama"]
    graph = load(path, dtype="bf16")
    assert graph.params["model.layers.0.self_attn.q_proj.weight"].type.dtype is DType.bf16
    assert graph.outputs[0].type.dtype is DType.bf16
    ids = torch.randint(0, 128, (5,))
    ref = hf_logits(model.to(torch.bfloat16), ids).float()
    model.float()
    torch.testing.assert_close(logits(graph, ids).float(), ref, atol=0.05, rtol=0.05)  # bf16 rounding


def test_sharded_safetensors_and_pytorch_bin(saved, tmp_path):
    model, _ = saved["mistral"]
    ids = torch.randint(0, 128, (8,))
    model.save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    torch.testing.assert_close(logits(load(tmp_path / "sharded"), ids), hf_logits(model, ids), atol=ATOL, rtol=0)
    (tmp_path / "bin").mkdir()  # the older PyTorch-pickle layout, read with weights_only=True
    shutil.copy(tmp_path / "sharded" / "config.json", tmp_path / "bin" / "config.json")
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    torch.testing.assert_close(logits(load(tmp_path / "bin"), ids), hf_logits(model, ids), atol=ATOL, rtol=0)


def test_tied_embeddings_are_one_parameter(tmp_path):
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**TINY, tie_word_embeddings=True)).eval()
    model.save_pretrained(tmp_path)
    graph = load(tmp_path)
    assert "lm_head.weight" not in graph.params
    users = [op.name for op in graph.ops if graph.params["model.embed_tokens.weight"] in op.operands]
    assert users == ["llm.embedding", "llm.linear"]
    ids = torch.randint(0, 128, (4,))
    torch.testing.assert_close(logits(graph, ids), hf_logits(model, ids), atol=ATOL, rtol=0)


def test_smollm2_real_weights_match_transformers(smollm2):
    graph, model, _ = smollm2
    assert graph.op_counts()["llm.attention"] == 30
    g = torch.Generator().manual_seed(2)
    for n in (1, 11, 40):
        ids = torch.randint(0, 49152, (n,), generator=g)
        got, want = logits(graph, ids), hf_logits(model, ids)
        # 30 layers of f32 with logits up to ~40: reassociation error grows to ~1e-4 absolute
        torch.testing.assert_close(got, want, atol=3e-4, rtol=1e-5)
        assert torch.equal(got.argmax(-1), want.argmax(-1))


# --- errors -------------------------------------------------------------------------------------

def test_missing_config_or_weights(tmp_path, saved):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load(tmp_path)
    _, path = saved["llama"]
    shutil.copy(os.path.join(path, "config.json"), tmp_path / "config.json")
    with pytest.raises(ModelLoadError, match="no weights"):
        load(tmp_path)


def test_weight_shape_disagreeing_with_config(tmp_path, saved):
    _, path = saved["llama"]
    shutil.copytree(path, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["intermediate_size"] = 96
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.gate_proj.weight.*\[128, 64\].*\[96, 64\]"):
        load(tmp_path / "m")


def test_truncated_safetensors(tmp_path, saved):
    _, path = saved["llama"]
    shutil.copytree(path, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors file.*truncated"):
        load(tmp_path / "m")


def test_unknown_architecture_and_remote_code(tmp_path, saved):
    _, path = saved["llama"]
    shutil.copytree(path, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "model_type": "no-such-arch"}))
    with pytest.raises(ModelLoadError, match="no-such-arch"):
        load(tmp_path / "m")
    remote = {**config, "model_type": "custom-arch", "auto_map": {"AutoConfig": "configuration_x.XConfig",
                                     "AutoModelForCausalLM": "modeling_x.XForCausalLM"}}
    (tmp_path / "m" / "config.json").write_text(json.dumps(remote))
    (tmp_path / "m" / "configuration_x.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(ModelLoadError, match="trust_remote_code=True"):
        load(tmp_path / "m")


def test_an_op_missing_from_the_table_names_op_module_and_fix():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x):
            return torch.cumsum(self.proj(x), 0)

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()

        def forward(self, x):
            return self.block(x)

    ep = torch.export.export(Outer(), (torch.randn(3, 4),))
    with pytest.raises(UnsupportedOpError, match=r"aten.cumsum.default \(from block\) has no conversion.*"
                                                 r"ATEN_OPS in kiln/frontends/aten.py"):
        convert(ep, inputs=[("x", TensorType(DType.f32, (3, 4)))],
                weights={"block.proj.weight": TensorStorage(torch.randn(4, 4)),
                         "block.proj.bias": TensorStorage(torch.randn(4))}, strip=0)
