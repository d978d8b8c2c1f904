"""Quantized checkpoints: an AutoAWQ folder and an FP8 (ModelOpt / HF convention) folder, written
here from a tiny random Llama with the test's own quantization and packing code, load without
calibration and without dequantizing, and give the logits of transformers running the
dequantized weights; a folder's quant_config.json is read in every form kiln supports, and the
configurations kiln cannot honour fail before tracing."""

import json

import pytest
import torch
import transformers as tf
from kiln.frontends import load
from kiln.frontends.prequantized import QuantizedCheckpointError, read_checkpoint_quant
from kiln.ir import SafetensorsStorage, interpreter
from kiln.ir.ops.quant import AwqUnpackedStorage
from kiln.passes.manager import run_pipeline
from safetensors.torch import save_file

CONFIG = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
          "tie_word_embeddings": False}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ORDER = [0, 2, 4, 6, 1, 3, 5, 7]   # AutoAWQ's GEMM packing: nibble i of a word holds column ORDER[i]


def awq_quantize(w: torch.Tensor, group: int):
    """AutoAWQ's pseudo-quantization of an nn.Linear weight [N, K] (asymmetric, groups along K) and
    WQLinear_GEMM's packing, written out independently of kiln: (qweight, qzeros, scales, dequantized)."""
    n, k = w.shape
    g = w.reshape(n, k // group, group)
    hi, lo = g.amax(-1, keepdim=True), g.amin(-1, keepdim=True)
    scales = ((hi - lo).clamp(min=1e-5) / 15).half()
    zeros = (-torch.round(lo / scales.float())).clamp(0, 15)
    q = (torch.round(g / scales.float()) + zeros).clamp(0, 15)
    dequant = ((q - zeros) * scales.float()).reshape(n, k)

    def pack(cols: torch.Tensor) -> torch.Tensor:             # [R, C] ints -> int32 [R, C/8]
        out = torch.zeros(cols.shape[0], cols.shape[1] // 8, dtype=torch.int64)
        for i, c in enumerate(ORDER):
            out |= cols[:, c::8].long() << (4 * i)
        return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)

    qweight = pack(q.reshape(n, k).t().contiguous())             # [K, N/8]
    qzeros = pack(zeros[..., 0].t().contiguous())                # [K/G, N/8]
    return qweight, qzeros, scales[..., 0].t().contiguous(), dequant


def fp8_quantize(w: torch.Tensor):
    scale = w.abs().amax() / 448
    q = (w / scale).to(torch.float8_e4m3fn)
    return q, scale.reshape(()), q.float() * scale


def _model(seed=0):
    torch.manual_seed(seed)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**CONFIG)).eval()


def _linears(model):
    for i, layer in enumerate(model.model.layers):
        for name in LINEARS:
            part = layer.self_attn if name in LINEARS[:4] else layer.mlp
            yield f"model.layers.{i}.{'self_attn' if part is layer.self_attn else 'mlp'}.{name}", getattr(part, name)


def _logits(graph, tokens):
    return interpreter.run(graph, tokens.int(), torch.arange(len(tokens), dtype=torch.int32))[0]


@pytest.fixture(scope="module")
def awq_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-awq")
    model = _model()
    model.config.quantization_config = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                                        "version": "gemm"}
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    for name, linear in _linears(model):
        qweight, qzeros, scales, dequant = awq_quantize(linear.weight.detach(), 32)
        del state[f"{name}.weight"]
        state.update({f"{name}.qweight": qweight, f"{name}.qzeros": qzeros, f"{name}.scales": scales})
        with torch.no_grad():
            linear.weight.copy_(dequant)                      # the reference runs the dequantized weights
    save_file(state, str(folder / "model.safetensors"))
    model.config.save_pretrained(folder)
    return folder, model


def test_autoawq_folder_matches_transformers_on_dequantized_weights(awq_folder):
    folder, reference = awq_folder
    graph = load(folder)
    values = graph.params["model.layers.0.self_attn.q_proj.weight.int4"]
    assert isinstance(values.storage, AwqUnpackedStorage)                # bound, not unpacked or dequantized
    assert isinstance(values.storage.source, SafetensorsStorage) and values.storage.source.key.endswith(".qweight")
    run_pipeline(graph, "stateless,fuse-quantized-linear,dce")
    assert graph.op_counts()["quant.linear_awq"] == 14 and "llm.linear" in graph.op_counts()   # lm_head stays
    qweight = graph.params["model.layers.1.mlp.down_proj.weight.qweight"]
    assert qweight.storage.load() is not None and torch.equal(
        qweight.storage.load(), SafetensorsStorage(str(folder / "model.safetensors"),
                                                   "model.layers.1.mlp.down_proj.qweight").load())
    tokens = torch.randint(0, 96, (11,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = reference(tokens[None]).logits[0]
    torch.testing.assert_close(_logits(graph, tokens), want, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def fp8_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-fp8")
    model = _model(seed=1)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    input_scales = {}
    for name, linear in _linears(model):
        q, scale, dequant = fp8_quantize(linear.weight.detach())
        input_scales[name] = torch.tensor(0.02 + 0.001 * len(input_scales))
        state.update({f"{name}.weight": q, f"{name}.weight_scale": scale, f"{name}.input_scale": input_scales[name]})
        with torch.no_grad():
            linear.weight.copy_(dequant)
    save_file(state, str(folder / "model.safetensors"))
    model.config.save_pretrained(folder)

    def fake_quantized_input(scale):
        def hook(module, args):
            x = args[0]
            return ((x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale,)
        return hook

    for name, linear in _linears(model):
        linear.register_forward_pre_hook(fake_quantized_input(input_scales[name]))
    return folder, model


def test_fp8_checkpoint_with_static_scales_matches_transformers(fp8_folder):
    folder, reference = fp8_folder
    assert read_checkpoint_quant(str(folder)) is None                     # nothing in the config files ...
    graph = load(folder)                                                  # ... the e4m3 tensors say it
    q = graph.params["model.layers.0.mlp.up_proj.weight.fp8"]
    assert isinstance(q.storage, SafetensorsStorage) and str(q.type) == "f8e4m3[128,64]"
    assert "model.layers.0.mlp.up_proj.weight.input_scale" in graph.params
    run_pipeline(graph, "stateless,fuse-quantized-linear,dce")
    assert graph.op_counts()["quant.linear_fp8"] == 14
    tokens = torch.randint(0, 96, (9,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = reference(tokens[None]).logits[0]
    torch.testing.assert_close(_logits(graph, tokens), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("files, algo, from_float", [
    ({"quant_config.json": {"zero_point": True, "q_group_size": 128, "w_bit": 4, "version": "GEMM"}},
     "w4a16-awq", False),                                                         # AutoAWQ's own file
    ({"quant_config.json": {"w_bit": 8, "q_group_size": 128, "zero_point": False, "version": "gemm",
                            "quant_mode": "smoothquant", "from_float": True}}, "w8a8-sq", True),
    ({"config.json": {"quantization_config": {"w_bit": 8, "quant_mode": "llm.int8", "from_float": True}}},
     "llm.int8", True),
    ({"config.json": {"quantization_config": {"w_bit": 4, "q_group_size": 64, "zero_point": True, "version": "gemm",
                                              "quant_mode": "weight_only", "from_float": True}}}, "w4a16-awq", True),
    ({"config.json": {"quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic"}}},
     "fp8-per-channel", False),
])
def test_quant_config_forms(tmp_path, files, algo, from_float):
    for name, data in files.items():
        (tmp_path / name).write_text(json.dumps(data))
    found = read_checkpoint_quant(str(tmp_path))
    assert (found.algo, found.from_float) == (algo, from_float)


@pytest.mark.parametrize("data, message", [
    ({"w_bit": 4, "q_group_size": 128, "zero_point": True, "version": "gemv"},
     "AWQ version 'gemv' is not one kiln reads; it reads gemm"),
    ({"w_bit": 4, "q_group_size": 128, "zero_point": True}, "AWQ version None"),
    ({"w_bit": 3, "version": "gemm"}, "w_bit/bits=3"),
    ({"w_bit": 4, "quant_mode": "smoothquant", "version": "gemm"}, "quant_mode 'smoothquant' with w_bit 4"),
    ({"w_bit": 8, "quant_mode": "llm.int8"}, "LLM.int8.* from_float=true"),
    ({"quant_method": "gptq", "bits": 4}, "quant_method 'gptq'"),
])
def test_configs_kiln_cannot_honour_fail_before_tracing(tmp_path, data, message):
    (tmp_path / "quant_config.json").write_text(json.dumps(data))
    with pytest.raises(QuantizedCheckpointError, match=message):
        read_checkpoint_quant(str(tmp_path))


def test_an_awq_folder_without_its_tensors(tmp_path):
    model = _model()
    model.config.quantization_config = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                                        "version": "gemm"}
    model.save_pretrained(tmp_path)           # float weights under an AWQ config
    with pytest.raises(QuantizedCheckpointError, match="no quantized linear weights"):
        load(tmp_path)


def test_compile_serves_quantized_checkpoints_fused_and_without_recalibration(awq_folder, fp8_folder):
    from kiln import api

    awq = api.compile(awq_folder[0], target="reference", progress=False)
    assert awq.graph.op_counts()["quant.linear_awq"] == 14 and "calibrate" not in awq.pipeline
    assert awq.quant == {"checkpoint": "w4a16-awq", "source": f"{awq_folder[0]}/config.json:quantization_config"}
    fp8 = api.compile(fp8_folder[0], target="reference", progress=False)
    assert fp8.graph.op_counts()["quant.linear_fp8"] == 14 and fp8.quant["checkpoint"] == "fp8"
    with pytest.raises(ValueError, match=r"is quantized already \(w4a16-awq\); compile it with quant=None"):
        api.compile(awq_folder[0], target="reference", quant="fp8", progress=False)
