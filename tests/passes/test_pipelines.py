"""The named pipelines on every frontend's graph: after `stateless`, each decoder layer has
exactly one llm.attention and the fused norm, rope and silu_mul ops, no softmax is left, and the
logits still match transformers (or onnxruntime's view of the same model)."""

import importlib.util
import os

import pytest
import torch
import transformers as tf

from kiln.backends import reference
from kiln.frontends import load
from kiln.passes.manager import PipelineError, parse_pipeline, run_pipeline
from kiln.passes.pipelines import PIPELINES

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
HF = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": 4}),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {"head_dim": 16}),
}


def fused_counts(graph, layers, norms_per_layer=2):
    counts = graph.op_counts()
    assert counts.get("llm.attention") == layers and "core.softmax" not in counts and "core.matmul" not in counts
    assert counts.get("llm.rms_norm", 0) >= norms_per_layer * layers + 1
    assert counts.get("llm.rope") == 2 * layers and counts.get("llm.silu_mul") == layers
    assert counts.get("llm.linear") == 4 * layers + 1  # merged qkv, o, merged gate/up, down; lm_head
    return counts


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids[None].long()).logits[0]


@pytest.mark.parametrize("arch", list(HF))
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_hf_graphs_fuse_and_keep_their_logits(arch, dtype, tmp_path):
    config_cls, model_cls, extra = HF[arch]
    torch.manual_seed(0)
    model = model_cls(config_cls(**TINY, **extra)).eval()
    model.save_pretrained(tmp_path)
    graph = load(tmp_path, dtype=dtype)
    run_pipeline(graph, "stateless")
    fused_counts(graph, 2, norms_per_layer=4 if arch == "qwen3" else 2)  # qwen3 norms q and k too
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    for n in (1, 9):
        ids = torch.randint(0, 128, (n,))
        got = reference.run(graph, ids.int(), torch.arange(n, dtype=torch.int32))[0]
        want = hf_logits(model, ids)
        tol = dict(atol=2e-5, rtol=0) if dtype == "f32" else dict(atol=3e-2, rtol=3e-2)  # bf16 rounding
        torch.testing.assert_close(got.float(), want.float(), **tol)


def test_smollm2_stateless_pipeline(smollm2):
    graph, model, _ = smollm2
    graph = graph.clone()
    run_pipeline(graph, "stateless")
    fused_counts(graph, 30)
    ids = torch.randint(0, 49152, (12,))
    got = reference.run(graph, ids.int(), torch.arange(12, dtype=torch.int32))[0]
    torch.testing.assert_close(got, hf_logits(model, ids), atol=3e-4, rtol=1e-5)


def test_meta_checkpoint_fuses(tmp_path):
    spec = importlib.util.spec_from_file_location("meta_tests", os.path.join(os.path.dirname(__file__), "..",
                                                                             "frontends", "test_meta.py"))
    meta_tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(meta_tests)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**TINY, rms_norm_eps=1e-5, tie_word_embeddings=False)).eval()
    graph = load(meta_tests.write_meta(model, tmp_path / "meta", 2))
    run_pipeline(graph, "stateless")
    fused_counts(graph, 2)
    ids = torch.randint(0, 128, (7,))
    got = reference.run(graph, ids.int(), torch.arange(7, dtype=torch.int32))[0]
    torch.testing.assert_close(got, hf_logits(model, ids), atol=2e-5, rtol=0)


@pytest.mark.parametrize("exporter", ["legacy", "dynamo", "dynamo23"])
def test_onnx_graphs_fuse(exporter, tmp_path):
    pytest.importorskip("onnxscript")
    spec = importlib.util.spec_from_file_location("onnx_tests", os.path.join(os.path.dirname(__file__), "..",
                                                                             "frontends", "test_onnx.py"))
    onnx_tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(onnx_tests)
    wrapper = onnx_tests.hf_model("mistral" if exporter == "dynamo" else "llama")
    graph = load(onnx_tests.export(wrapper, str(tmp_path / "model.onnx"), exporter))
    run_pipeline(graph, "stateless")
    fused_counts(graph, 2)
    ids, pos = onnx_tests.tokens(11, seed=3)
    with torch.no_grad():
        want = wrapper(ids, pos)
    torch.testing.assert_close(reference.run(graph, ids, pos)[0], want, atol=1e-5, rtol=1e-5)


def test_named_pipelines_expand_and_refuse_options():
    assert [str(s) for s in parse_pipeline("serving")] == [str(s) for s in parse_pipeline(PIPELINES["serving"])]
    assert str(parse_pipeline("cleanup,kv-cache{block=32}")[-1]) == "kv-cache{block=32}"
    with pytest.raises(PipelineError, match="pipeline 'serving' takes no options"):
        parse_pipeline("serving{block=32}")
