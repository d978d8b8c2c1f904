"""The onnx backend: every graph exported is valid ONNX (onnx.checker, full_check) and, run by
onnxruntime, computes what the reference backend computes: stateless graphs of every frontend
architecture before and after the passes, SmolLM2, quantized graphs of every quantization
algorithm, and serving steps over a paged KV pool (logits and the updated caches); greedy decoding
through the runtime gives the reference's tokens."""

import dataclasses

import kiln
import numpy as np
import onnx
import pytest
import torch
import transformers as tf
from kiln.backends import onnx as kiln_onnx
from kiln.backends import reference
from kiln.backends.onnx import NOT_EXPORTABLE, OnnxExecutable, OnnxExportError, export
from kiln.frontends import load
from kiln.ir import TensorStorage, parse, registered_ops
from kiln.passes.calibrate import calibrate
from kiln.passes.manager import run_pipeline
from kiln.passes.pipelines import PIPELINES
from kiln.passes.quantize import quantize_with
from kiln.runtime.config import KvCacheConfig
from kiln.tools import irdump

pytest.importorskip("onnxruntime")

TINY = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 256}
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
ARCHITECTURES = {   # the frontend tests' tiny models
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {"rope_parameters": LLAMA3_ROPE}),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": 4}),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
    "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, {"head_dim": 16}),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, {"pad_token_id": 0}),
    "gpt_neox": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, {}),
}


def tiny(arch: str):
    config_cls, model_cls, extra = ARCHITECTURES[arch]
    torch.manual_seed(0)
    return model_cls(config_cls(**TINY, **extra)).eval()


def ort_run(graph, path, *inputs, **export_options):
    exported = export(graph, path, progress=False, **export_options)
    onnx.checker.check_model(str(exported.path), full_check=True)
    return OnnxExecutable(exported)(*inputs), exported


def tokens(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (n,), generator=g).int(), torch.arange(n, dtype=torch.int32)


def test_every_op_has_a_lowering_or_says_why_not():
    missing = [name for name in registered_ops() if name not in kiln_onnx.LOWERINGS]
    assert missing == [], f"ops without an ONNX lowering: {missing}"
    assert set(NOT_EXPORTABLE) == {n for n in registered_ops() if n.startswith("dist.")}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_architecture_before_and_after_the_passes(arch, tmp_path):
    traced = load(tiny(arch))
    fused = traced.clone()
    run_pipeline(fused, "stateless")
    for name, graph in (("traced", traced), ("stateless", fused)):
        for n in (1, 7):   # 7 > Mistral's window
            ids, pos = tokens(n, seed=n)
            (got,), _ = ort_run(graph, tmp_path / f"{name}.onnx", ids, pos)
            torch.testing.assert_close(got, reference.run(graph, ids, pos)[0], atol=2e-5, rtol=0)


def test_symbolic_dims_are_dim_params_and_reshapes_stay_static(tmp_path):
    graph = load(tiny("llama"))
    run_pipeline(graph, "serving")
    exported = export(graph, tmp_path / "serving.onnx", progress=False)
    model = onnx.load(str(exported.path))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims["tokens"] == ["T"] and dims["block_tables"] == ["B", "MB"] and dims["query_start"] == ["B+1"]
    assert dims["k_cache.0"] == ["NB", 16, 2, 16]
    outputs = [o.name for o in model.graph.output]
    assert outputs[1:] == ["k_cache.0.out", "v_cache.0.out", "k_cache.1.out", "v_cache.1.out"]
    assert exported.state == {f"{c}.{i}.out": f"{c}.{i}" for i in range(2) for c in ("k_cache", "v_cache")}
    # one symbolic dim of a reshape is written as -1: a constant shape, as TensorRT likes them
    reshapes = {op.results[0].name for op in graph.ops if op.name == "core.reshape"}
    constants = {t.name for t in model.graph.initializer}
    shapes = [n.input[1] for n in model.graph.node if n.op_type == "Reshape" and n.output[0] in reshapes]
    assert len(shapes) == len(reshapes) and all(s in constants for s in shapes)


def serving_step(graph, block: int, seed: int = 0):
    """A step mixing a chunk of a prompt after 5 cached tokens, a whole prompt, a decode token and a
    padding row (slot -1), over a shuffled pool whose unwritten slots hold NaN."""
    g = torch.Generator().manual_seed(seed)
    cache = graph.inputs[7].type.concrete({"NB": 12})
    order = torch.randperm(12, generator=g).int()
    tables = torch.stack([order[0:4], order[4:8], order[8:12]])
    lens, new = [8, 6, 9], [3, 6, 1]
    positions = [p for n, c in zip(new, lens) for p in range(c - n, c)] + [0]
    slots = [int(tables[b, p // block]) * block + p % block for b, (n, c) in enumerate(zip(new, lens))
             for p in range(c - n, c)] + [-1]
    t = len(positions)
    caches = []
    for _ in graph.inputs[7:]:
        c = torch.full(cache, float("nan"))
        for b, (n, ctx) in enumerate(zip(new, lens)):    # the history already in the pool
            for p in range(ctx - n):
                c[tables[b, p // block], p % block] = torch.randn(cache[2:], generator=g)
        caches.append(c)
    starts = torch.tensor([0, 3, 9, 10], dtype=torch.int32)
    inputs = [torch.randint(0, 128, (t,), generator=g).int(), torch.tensor(positions, dtype=torch.int32),
              torch.tensor(slots), tables, torch.tensor(lens, dtype=torch.int32), starts, torch.tensor([2, 8, 9, 10])]
    return inputs, caches


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_serving_step_logits_and_caches(arch, tmp_path):
    graph = load(tiny(arch))
    run_pipeline(graph, PIPELINES["stateless"] + ",kv-cache{block=4},cse,dce")
    inputs, caches = serving_step(graph, 4)
    want_caches = [c.clone() for c in caches]
    want = reference.run(graph, *inputs, *want_caches)[0]
    (got,), _ = ort_run(graph, tmp_path / "serving.onnx", *inputs, *caches)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    for c, w in zip(caches, want_caches):
        torch.testing.assert_close(c, w, equal_nan=True, atol=1e-6, rtol=0)   # unwritten slots stay NaN


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_greedy_decoding_through_the_runtime(arch, tmp_path):
    model = tiny(arch)
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9], list(range(10, 29))]
    params = kiln.SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    outs = {}
    for target in ("reference", "onnx"):
        compiled = kiln.compile(model, target=target, progress=False, tokens_per_block=4,
                                output_dir=tmp_path if target == "onnx" else None)
        llm = kiln.LLM(compiled, skip_tokenizer_init=True, kv_cache_config=KvCacheConfig(max_tokens=256))
        outs[target] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert outs["onnx"] == outs["reference"]
    assert compiled.target == "onnx" and compiled.backend_options == {"path": str(tmp_path / "model.onnx")}
    onnx.checker.check_model(str(tmp_path / "model.onnx"), full_check=True)


ALGOS = ["fp8", "fp8-per-channel", "w8a16", "w8a8-sq", "llm.int8", "w4a16"]


@pytest.fixture(scope="module")
def calibrated():
    graph = load(tiny("qwen2"))    # q/k/v biases: the quantized linears keep them
    run_pipeline(graph, "stateless")
    windows = [torch.randint(0, 128, (16,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    return graph, calibrate(graph, windows, progress=False)


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("fused", [False, True], ids=["qdq", "fused"])
def test_quantized_graphs_match_the_reference_semantics(algo, fused, calibrated, tmp_path):
    graph, calib = calibrated
    q = graph.clone()
    assert quantize_with(q, algo, calib, **({"group_size": 32} if algo == "w4a16" else {})) > 0
    if fused:
        run_pipeline(q, "fuse-quantized-linear")
        assert q.op_counts()["quant.embedding"] == 1   # the int8 token table, looked up row by row
    ids, pos = tokens(9)
    (got,), exported = ort_run(q, tmp_path / "q.onnx", ids, pos)
    torch.testing.assert_close(got, reference.run(q, ids, pos)[0], atol=1e-5, rtol=0)
    model = onnx.load(str(exported.path))
    ops = {n.op_type for n in model.graph.node}
    if not fused:
        assert "DequantizeLinear" in ops and not any(n.domain for n in model.graph.node)
        types = {t.data_type for t in model.graph.initializer}
        want = {"fp8": onnx.TensorProto.FLOAT8E4M3FN, "fp8-per-channel": onnx.TensorProto.FLOAT8E4M3FN,
                "w4a16": onnx.TensorProto.INT4}.get(algo, onnx.TensorProto.INT8)
        assert want in types
    if algo == "w4a16" and not fused:   # INT4 weights in blocks of 32 along K, in TensorRT's form
        dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
        assert {(a.name, a.i) for n in dq for a in n.attribute} >= {("axis", 1), ("block_size", 32)}


def test_int4_weights_in_blocks_with_zero_points(tmp_path):
    graph = parse("""param @w : i4[16,64]
param @s : f32[16,2]
param @z : i4[16,2]
func @main(%x: f32[T,64]) -> (f32[T,16]) {
  %0 = quant.dequantize(@w, @s, @z) {axis=1, group_size=32} : f32[16,64]
  %1 = llm.linear(%x, %0) : f32[T,16]
  return %1
}
""")
    g = torch.Generator().manual_seed(0)
    for name, t in {"w": torch.randint(-8, 8, (16, 64), generator=g, dtype=torch.int8),
                    "s": torch.rand(16, 2, generator=g), "z": torch.randint(-8, 8, (16, 2), generator=g,
                                                                          dtype=torch.int8)}.items():
        graph.params[name].storage = TensorStorage(t)
    x = torch.randn(5, 64, generator=g)
    (got,), exported = ort_run(graph, tmp_path / "int4.onnx", x)
    torch.testing.assert_close(got, reference.run(graph, x)[0], atol=1e-5, rtol=1e-6)
    packed = next(t for t in onnx.load(str(exported.path)).graph.initializer if t.name == "w")
    assert packed.data_type == onnx.TensorProto.INT4 and len(packed.raw_data) == 16 * 64 // 2


def test_external_data_above_the_threshold(tmp_path, monkeypatch):
    graph = load(tiny("llama"))
    run_pipeline(graph, "stateless")
    ids, pos = tokens(6)
    want = reference.run(graph, ids, pos)[0]
    monkeypatch.setattr(kiln_onnx, "EXTERNAL_DATA_BYTES", 1000)     # this tiny model counts as large
    (got,), exported = ort_run(graph, tmp_path / "big" / "model.onnx", ids, pos)
    assert exported.external_data == "model.onnx.data" and (tmp_path / "big" / "model.onnx.data").stat().st_size > 0
    model = onnx.load(str(exported.path), load_external_data=False)
    big = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert big and all(int(e.value) % 4096 == 0 for t in big for e in t.external_data if e.key == "offset")
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_errors_name_the_op_and_the_way_out(tmp_path):
    text = "func @main(%x: f32[T,4]) -> (f32[T,4]) {\n  %0 = dist.all_reduce(%x) : f32[T,4]\n  return %0\n}\n"
    with pytest.raises(OnnxExportError, match=r"dist.all_reduce at %0: collectives have no ONNX op"):
        export(parse(text), tmp_path / "tp.onnx", progress=False)
    no_data = parse("param @w : f32[4,4]\nfunc @main(%x: f32[T,4]) -> (f32[T,4]) {\n"
                    "  %0 = llm.linear(%x, @w) : f32[T,4]\n  return %0\n}\n")
    with pytest.raises(OnnxExportError, match=r"parameter @w has no data to export"):
        export(no_data, tmp_path / "w.onnx", progress=False)
    with pytest.raises(OnnxExportError, match=r"should end in \.onnx"):
        export(no_data, tmp_path / "w.txt", params={"w": torch.ones(4, 4)}, progress=False)
    bf16 = load(tiny("llama").to(torch.bfloat16))
    with pytest.raises(RuntimeError, match="compile the model in f32"):
        kiln_onnx.compile(bf16, path=tmp_path / "bf16.onnx")
    with pytest.raises(ValueError, match="device='cpu'"):
        kiln_onnx.compile(bf16, device="cuda")


def test_smollm2_stateless_and_greedy_serving(smollm2, tmp_path):
    graph, _, tokenizer = smollm2
    stateless = graph.clone()
    run_pipeline(stateless, "stateless")
    ids = torch.tensor(tokenizer("The capital of France is")["input_ids"], dtype=torch.int32)
    pos = torch.arange(len(ids), dtype=torch.int32)
    (got,), _ = ort_run(stateless, tmp_path / "smol.onnx", ids, pos)
    want = reference.run(stateless, ids, pos)[0]
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    prompts = [tokenizer(p)["input_ids"] for p in ("The capital of France is", "def fibonacci(n):")]
    params = kiln.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    compiled = kiln.compile(graph, target="reference", progress=False, device="cpu")
    outs = {}
    for target in ("reference", "onnx"):   # one serving graph, two executables
        llm = kiln.LLM(dataclasses.replace(compiled, target=target), skip_tokenizer_init=True,
                       kv_cache_config=KvCacheConfig(max_tokens=512))
        outs[target] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert outs["onnx"] == outs["reference"]
    print(f"\nSmolLM2 greedy tokens, onnxruntime == reference: {outs['onnx']}")


def test_irdump_writes_any_stage(tmp_path, capsys):
    tiny("llama").save_pretrained(tmp_path / "llama")
    for stage in ("cleanup", "serving"):
        path = tmp_path / f"{stage}.onnx"
        assert irdump.main([str(tmp_path / "llama"), "-p", stage, "--format", "onnx", "-o", str(path)]) == 0
        assert f"wrote {path}" in capsys.readouterr().out
        onnx.checker.check_model(str(path), full_check=True)
    with pytest.raises(SystemExit):
        irdump.main(["examples/llama_block.ir", "--format", "onnx"])
    assert "--format onnx writes files: name them with -o" in capsys.readouterr().err


def test_nan_in_unwritten_pool_slots_never_reaches_the_logits(tmp_path):
    """The runtime's pool is torch.empty: masked history is zeroed before it meets the probabilities."""
    graph = load(tiny("llama"))
    run_pipeline(graph, "serving")
    inputs, caches = serving_step(graph, 16)
    (got,), _ = ort_run(graph, tmp_path / "s.onnx", *inputs, *caches)
    assert not np.isnan(got.numpy()).any()
