"""kiln.compile(model, quant=...) on the reference target: quantization runs on the stateless fused
graph before kv-cache (calibration on pydoc_data.topics with the model's tokenizer), the target's
fusion folds Q/DQ into the quantized linears, the FP8 KV cache is e4m3 in the serving graph, the
artifact keeps the quantized weights and the config and loads back without calibration, LLM takes
quant_config=, and a model folder's quant_config.json needs no option at all."""

import json
import shutil
from dataclasses import replace

import kiln
import pytest
import torch
from kiln import api
from kiln.frontends import load
from kiln.frontends.hf import tokenizer_for
from kiln.ir import interpreter
from kiln.passes.calibrate import calib_windows, calibrate, pydoc_tokens
from kiln.passes.manager import run_pipeline
from kiln.passes.quantize import QuantConfig, apply_quantization

SMALL_CALIB = {"calib_size": 6, "calib_seq_len": 32, "calib_rows": 64}


@pytest.fixture(scope="module")
def traced(pydoc_llama):
    """The folder's model traced once (raw), and calibration of its fused graph on pydoc text read
    with its tokenizer, rows kept (for AWQ)."""
    raw = load(pydoc_llama)
    fused = raw.clone()
    run_pipeline(fused, "stateless")
    stream = pydoc_tokens(tokenizer_for(pydoc_llama))
    return raw, calibrate(fused, calib_windows(stream, 6, 32), rows=64, progress=False)


def _prefill(model: api.CompiledModel, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of one sequence prefilled in one step through the serving graph."""
    c, n = model.config, len(tokens)
    block = c["tokens_per_block"]
    blocks = (n + block - 1) // block
    caches = [torch.zeros(blocks, block, c["num_kv_heads"], c["head_dim"], dtype=kiln.DType(c["cache_dtype"]).torch)
              for _ in range(2 * c["num_layers"])]
    return model.executable()(tokens.int(), torch.arange(n, dtype=torch.int32), torch.arange(n),
                              torch.arange(blocks, dtype=torch.int32)[None], torch.tensor([n], dtype=torch.int32),
                              torch.tensor([0, n], dtype=torch.int32), torch.arange(n), *caches)[0]


def _stateless_quantized(raw, config):
    """What the compiled model should compute: the traced graph, fused and quantized."""
    g = raw.clone()
    run_pipeline(g, "stateless")
    apply_quantization(g, config)
    return g


def _logits(graph, tokens):
    return interpreter.run(graph, tokens.int(), torch.arange(len(tokens), dtype=torch.int32))[0]


TOKENS = torch.randint(3, 123, (20,), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("quant, fused", [
    ("int8_sq", "quant.linear_int8"), ("int8_wo", "quant.linear_w8a16"), ("llm.int8", "quant.linear_int8"),
    ("w4a16", "quant.linear_awq"), ("int4_awq", "quant.linear_awq"), ("fp8-per-channel", "quant.linear_fp8"),
])
def test_compile_quantized_serves_what_the_quantized_stateless_graph_computes(traced, quant, fused):
    raw, calibration = traced
    # llm.int8's int8 activations turn the serving graph's other f32 summation order into a flipped rounding
    # or two once the token table is int8 too (1e-3 in the logits): that case keeps the table float
    config = QuantConfig(QuantConfig.of(quant).quant_algo, group_size=32, int8_threshold=3.0, calibration=calibration,
                         embedding=None if quant == "llm.int8" else "int8")
    compiled = api.compile(raw, target="reference", quant=config, progress=False)
    assert compiled.graph.op_counts()[fused] == 8                                 # 2 layers x 4 (merged) linears
    assert compiled.quant == config.to_json()
    stages = compiled.pipeline.split(",")
    assert stages.index("kv-cache{block=16}") > max(i for i, s in enumerate(stages) if s.startswith("quantize"))
    assert stages[-2:] == ["fuse-quantized-linear", "dce"]
    torch.testing.assert_close(_prefill(compiled, TOKENS), _logits(_stateless_quantized(raw, config), TOKENS),
                               rtol=1e-4, atol=1e-4)


def test_compile_calibrates_with_the_models_tokenizer_and_the_artifact_loads_back(pydoc_llama, traced, tmp_path):
    config = QuantConfig("fp8", **SMALL_CALIB)
    compiled = api.compile(pydoc_llama, target="reference", quant=config, progress=False)
    assert compiled.graph.op_counts()["quant.linear_fp8"] == 8
    assert (f",calibrate{{tokenizer={pydoc_llama},samples=6,length=32,rows=0,device=cpu}},quantize{{algo=fp8,"
            in compiled.pipeline)
    want = _logits(_stateless_quantized(traced[0], replace(config, calibration=traced[1])), TOKENS)
    torch.testing.assert_close(_prefill(compiled, TOKENS), want, rtol=1e-4, atol=1e-4)
    loaded = api.load(compiled.save(tmp_path / "q.kiln", progress=False), progress=False)
    manifest = json.loads((tmp_path / "q.kiln" / "kiln.json").read_text())
    assert manifest["quant"] == config.to_json() == loaded.quant
    assert loaded.graph.params["model.layers.0.mlp.down_proj.weight.fp8"].type.dtype.value == "f8e4m3"
    assert torch.equal(_prefill(loaded, TOKENS), _prefill(compiled, TOKENS))


def test_a_model_without_tokenizer_calibrates_on_the_token_ids_it_is_given(pydoc_llama, traced):
    stream = pydoc_tokens(tokenizer_for(pydoc_llama))
    config = QuantConfig("fp8", calib_tokens=stream.tolist(), **SMALL_CALIB)
    compiled = api.compile(traced[0], target="reference", quant=config, progress=False)  # a Graph: no tokenizer
    assert "calib_tokens" not in compiled.quant and compiled.quant == replace(config, calib_tokens=None).to_json()
    want = _logits(_stateless_quantized(traced[0], replace(config, calibration=traced[1])), TOKENS)
    torch.testing.assert_close(_prefill(compiled, TOKENS), want, rtol=1e-4, atol=1e-4)


def test_fp8_kv_cache_is_e4m3_in_the_serving_graph(traced):
    raw, calibration = traced
    config = QuantConfig(None, "fp8-kv", calibration=calibration)
    compiled = api.compile(raw, target="reference", quant=config, progress=False)
    assert compiled.config["cache_dtype"] == "f8e4m3"
    attention = [op for op in compiled.graph.ops if op.name == "llm.paged_attention"]
    assert len(attention) == 2 and all(op.attrs["k_scale"] > 0 and op.attrs["v_scale"] > 0 for op in attention)
    torch.testing.assert_close(_prefill(compiled, TOKENS), _logits(_stateless_quantized(raw, config), TOKENS),
                               rtol=1e-4, atol=1e-4)


def test_llm_takes_quant_config(traced):
    raw, calibration = traced
    llm = kiln.LLM(raw, target="reference", quant_config=QuantConfig("fp8", "fp8-kv", calibration=calibration),
                   skip_tokenizer_init=True)
    out = llm.generate([5, 9, 17, 3], kiln.SamplingParams(max_tokens=5, temperature=0.0))
    assert len(out.outputs[0].token_ids) == 5
    assert llm.model.config["cache_dtype"] == "f8e4m3"


def test_a_folder_that_asks_for_quantization_gets_it(pydoc_llama, tmp_path):
    asks = tmp_path / "asks"
    shutil.copytree(pydoc_llama, asks)
    (asks / "quant_config.json").write_text(json.dumps(
        {"w_bit": 8, "q_group_size": 128, "zero_point": False, "version": "gemm", "quant_mode": "weight_only",
         "from_float": True}))
    compiled = api.compile(asks, target="reference", progress=False)
    assert compiled.graph.op_counts()["quant.linear_w8a16"] == 8
    assert compiled.quant["quant_algo"] == "w8a16"
    with pytest.raises(ValueError, match=r"quant_config.json asks to be quantized with w8a16 at load time; compile it "
                                         r"with quant=None"):
        api.compile(asks, target="reference", quant="fp8", progress=False)


def test_quant_errors_come_before_the_work(pydoc_llama, traced):
    with pytest.raises(ValueError, match=r"quant='int3': unknown quantization algorithm 'int3'.*Short forms: fp8"):
        api.compile("/no/such/model", quant="int3")
    with pytest.raises(ValueError, match=r"group_size=128 does not fit 6 linears.*group_size=64 divides every"):
        api.compile(traced[0], target="reference", quant="w4a16", progress=False)
    with pytest.raises(ValueError, match="needs calibration text, read with the model's tokenizer, and this model "
                                         "came without one"):
        api.compile(traced[0], target="reference", quant="fp8", progress=False)
