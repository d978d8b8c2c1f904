"""ONNX files from tiny random HF models (both torch exporters, opset 17/18 and 23) import, verify,
and compute what onnxruntime computes at two sequence lengths; weights load lazily; bad input
gets an error that names the file or the op.

Tolerance for f32: atol = rtol = 1e-5. The IR's reference backend and onnxruntime run the same
f32 arithmetic in different summation orders (GEMMs, reductions, softmax), which moves logits of
magnitude ~1 by a few 1e-7; a wrong mask, rope or layout moves them by 1e-2 or more."""

import os
import shutil
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

from kiln.backends import reference
from kiln.frontends.onnx import OnnxImportError, OnnxStorage, load_onnx
from kiln.ir import DType, parse, print_graph, verify

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
ARCHS = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY)),  # q/k/v bias
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**TINY, sliding_window=4)),
}
# (architecture, exporter): legacy = TorchScript exporter at opset 17, dynamo = torch.export at
# opset 18, dynamo23 = torch.export at opset 23 (Attention, RMSNormalization, RotaryEmbedding),
# packed = torch.export at opset 18 without an attention mask, so that transformers derives
# per-sequence masks from the position ids (CumSum, GatherND); the TorchScript exporter cannot
# export that path (aten::diff)
EXPORTS = [("llama", "legacy"), ("llama", "dynamo"), ("llama", "dynamo23"), ("llama", "packed"),
           ("qwen2", "legacy"), ("qwen2", "dynamo"), ("mistral", "legacy"), ("mistral", "dynamo")]
LENGTHS = (5, 11)  # 11 > mistral's window of 4, so the sliding-window mask matters


class LogitsOnly(torch.nn.Module):
    """forward(input_ids, position_ids) -> logits without a cache. With `mask`, an all-ones
    attention mask keeps transformers off its packed-sequence detection (torch.diff, which the
    TorchScript exporter cannot export); without, position ids that restart at 0 start a new
    sequence in the same row."""

    def __init__(self, model, mask: bool = True):
        super().__init__()
        self.model, self.mask = model, mask

    def forward(self, input_ids, position_ids):
        mask = torch.ones_like(input_ids) if self.mask else None
        return self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                          use_cache=False).logits


_models: dict[str, torch.nn.Module] = {}


def hf_model(arch: str, mask: bool = True) -> torch.nn.Module:
    """A tiny random model; norm weights and biases are randomised too, so that no two
    initializers are equal (the TorchScript exporter would merge them)."""
    if arch not in _models:
        torch.manual_seed(0)
        model = ARCHS[arch]().eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 1:
                    p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
        _models[arch] = model
    return LogitsOnly(_models[arch], mask)


def export(model: torch.nn.Module, path: str, exporter: str) -> str:
    ids, pos = torch.randint(0, 128, (1, 7)), torch.arange(7)[None]
    names = dict(input_names=["input_ids", "position_ids"], output_names=["logits"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "legacy":  # the TorchScript exporter
            torch.onnx.export(model, (ids, pos), path, dynamo=False, opset_version=17, **names,
                              dynamic_axes={"input_ids": {1: "T"}, "position_ids": {1: "T"}, "logits": {1: "T"}})
        else:
            T = torch.export.Dim("T", min=2, max=256)
            torch.onnx.export(model, (ids, pos), path, dynamo=True, verbose=False, **names,  # torch.export
                              opset_version=23 if exporter == "dynamo23" else 18,
                              dynamic_shapes={"input_ids": {1: T}, "position_ids": {1: T}})
    return path


@pytest.fixture(scope="module", params=EXPORTS, ids=[f"{a}-{e}" for a, e in EXPORTS])
def exported(request, tmp_path_factory):
    arch, exporter = request.param
    path = str(tmp_path_factory.mktemp(f"{arch}-{exporter}") / "model.onnx")
    return arch, exporter, export(hf_model(arch, mask=exporter != "packed"), path, exporter)


def run_ort(path: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)


def tokens(T: int, seed: int, packed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids and their positions; packed: two sequences of 3 and T - 3 tokens in one row."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.cat([torch.arange(3), torch.arange(T - 3)]) if packed else torch.arange(T)
    return torch.randint(0, 128, (1, T), generator=g), pos[None]


# --- exported HF models ---------------------------------------------------------------------

def test_exported_model_matches_onnxruntime(exported):
    arch, exporter, path = exported
    g = load_onnx(path)
    verify(g)
    assert [(v.name, str(v.type)) for v in g.inputs] == [("input_ids", "i64[1,T]"), ("position_ids", "i64[1,T]")]
    assert str(g.outputs[0].type) == "f32[1,T,128]"
    for T in LENGTHS:
        ids, pos = tokens(T, seed=T, packed=exporter == "packed")
        (out,) = reference.run(g, ids, pos)
        (want,) = run_ort(path, {"input_ids": ids.numpy(), "position_ids": pos.numpy()})
        torch.testing.assert_close(out, torch.from_numpy(want), atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            hf = hf_model(arch, mask=exporter != "packed")(ids, pos)
        torch.testing.assert_close(out, hf, atol=1e-5, rtol=1e-5)
    if exporter == "packed":  # the second sequence must not see the first
        ids, pos = tokens(8, seed=0, packed=True)
        (alone,) = reference.run(g, ids[:, 3:], pos[:, 3:])
        torch.testing.assert_close(reference.run(g, ids, pos)[0][:, 3:], alone, atol=1e-5, rtol=1e-5)


def test_exported_model_structure(exported):
    """Shape arithmetic is gone, weights feed llm.linear in [out, in] layout, locs are kept."""
    arch, exporter, path = exported
    g = load_onnx(path)
    counts = g.op_counts()
    assert counts["llm.linear"] == 2 * 7 + 1 and counts["llm.embedding"] == 1
    linears = [op for op in g.ops if op.name == "llm.linear"]
    assert all(op.operands[1].is_param for op in linears)
    assert sum(len(op.operands) == 3 for op in linears) == (6 if arch == "qwen2" else 0)  # q/k/v bias joined
    hf = hf_model(arch).model
    q_proj = next(op for op in linears if "layers.0/self_attn/q_proj" in (op.loc or ""))
    torch.testing.assert_close(q_proj.operands[1].storage.load(), hf.model.layers[0].self_attn.q_proj.weight,
                               atol=0, rtol=0)
    assert print_graph(parse(print_graph(g))) == print_graph(g)
    reshapes = {op.attrs["shape"] for op in g.ops if op.name == "core.reshape"}
    assert (1, "T", 4, 16) in reshapes and (1, "T", 2, 16) in reshapes
    assert "core.dims" not in counts
    assert counts.get("core.matmul", 0) == (0 if exporter == "dynamo23" else 4)  # q @ k^T and p @ v, twice
    if exporter == "dynamo23":
        assert counts["llm.attention"] == 2 and counts["llm.rms_norm"] == 5
        assert "core.softmax" not in counts


def tiny_model(path, nodes, inputs, outputs, inits=(), opset=18) -> str:
    """A hand-written model; IR version 10 because onnxruntime 1.31 reads up to 13 and onnx 1.23 writes 14."""
    graph = oh.make_graph(nodes, "g", inputs, outputs, list(inits))
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)], ir_version=10), str(path))
    return str(path)


# --- opset 23 -------------------------------------------------------------------------------

def opset23_block(path: str, *, interleaved: int) -> str:
    """RMSNormalization -> q/k/v -> RotaryEmbedding (with position_ids) -> Attention with 4 query
    heads over 2 kv heads, causal, on 3-D [batch, seq, hidden] tensors with symbolic batch and seq."""
    rng = np.random.default_rng(0)
    D, H, KV, hd = 64, 4, 2, 16

    def w(name, *shape, mean=0.0):
        return nh.from_array((rng.standard_normal(shape) * 0.2 + mean).astype(np.float32), name)
    angles = np.outer(np.arange(64), 1 / 10000 ** (np.arange(0, hd, 2) / hd))
    inits = [w("wq", D, H * hd), w("wk", D, KV * hd), w("wv", D, KV * hd), w("norm", D, mean=1.0),
             nh.from_array(np.cos(angles).astype(np.float32), "cos"),
             nh.from_array(np.sin(angles).astype(np.float32), "sin")]
    nodes = [
        oh.make_node("RMSNormalization", ["x", "norm"], ["n"], epsilon=1e-5, name="/block/norm"),
        *(oh.make_node("MatMul", ["n", f"w{p}"], [p], name=f"/block/{p}_proj") for p in "qkv"),
        oh.make_node("RotaryEmbedding", ["q", "cos", "sin", "pos"], ["qr"], num_heads=H, interleaved=interleaved),
        oh.make_node("RotaryEmbedding", ["k", "cos", "sin", "pos"], ["kr"], num_heads=KV, interleaved=interleaved),
        oh.make_node("Attention", ["qr", "kr", "v"], ["y"], q_num_heads=H, kv_num_heads=KV, is_causal=1,
                     name="/block/attn"),
    ]
    inputs = [oh.make_tensor_value_info("x", TP.FLOAT, ["batch", "seq", D]),
              oh.make_tensor_value_info("pos", TP.INT64, ["batch", "seq"])]
    outputs = [oh.make_tensor_value_info("y", TP.FLOAT, ["batch", "seq", H * hd])]
    return tiny_model(path, nodes, inputs, outputs, inits, opset=23)


@pytest.mark.parametrize("interleaved", [0, 1])
def test_opset23_attention_and_rms_norm_match_onnxruntime(tmp_path, interleaved):
    path = opset23_block(str(tmp_path / "block.onnx"), interleaved=interleaved)
    g = load_onnx(path)
    (attn,) = [op for op in g.ops if op.name == "llm.attention"]
    assert attn.attrs["causal"] and str(attn.operands[0].type) == "f32[batch,4,seq,16]"
    assert str(attn.operands[1].type) == "f32[batch,2,seq,16]" and attn.loc == "/block/attn"
    assert g.op_counts()["llm.rms_norm"] == 1
    rng = np.random.default_rng(1)
    for T in LENGTHS:
        x = rng.standard_normal((2, T, 64)).astype(np.float32)
        pos = np.stack([np.arange(T), np.arange(7, 7 + T)])  # the second row starts past a prefix
        (want,) = run_ort(path, {"x": x, "pos": pos})
        (out,) = reference.run(g, torch.from_numpy(x), torch.from_numpy(pos))
        torch.testing.assert_close(out, torch.from_numpy(want), atol=1e-5, rtol=1e-5)


def test_layer_norm_gelu_gemm_match_onnxruntime(tmp_path):
    """The other normalisation and MLP spellings: LayerNormalization, Gelu (tanh), Gemm with transB."""
    rng = np.random.default_rng(2)
    inits = [nh.from_array((rng.standard_normal(s) * 0.3 + m).astype(np.float32), n)
             for n, s, m in (("g", (32,), 1.0), ("b", (32,), 0.0), ("w", (16, 32), 0.0), ("c", (16,), 0.0))]
    path = tiny_model(tmp_path / "m.onnx", [
        oh.make_node("LayerNormalization", ["x", "g", "b"], ["n"], epsilon=1e-5),
        oh.make_node("Gelu", ["n"], ["a"], approximate="tanh"),
        oh.make_node("Gemm", ["a", "w", "c"], ["y"], transB=1)],
        [oh.make_tensor_value_info("x", TP.FLOAT, ["n", 32])], [oh.make_tensor_value_info("y", TP.FLOAT, ["n", 16])],
        inits, opset=20)
    g = load_onnx(path)
    assert g.op_counts() == {"core.gelu": 1, "llm.layer_norm": 1, "llm.linear": 1}
    x = rng.standard_normal((6, 32)).astype(np.float32)
    (want,) = run_ort(path, {"x": x})
    torch.testing.assert_close(reference.run(g, torch.from_numpy(x))[0], torch.from_numpy(want), atol=1e-5, rtol=1e-5)


def test_other_table_entries_match_onnxruntime(tmp_path):
    """Split, ReduceSum, Max, Tanh, LogSoftmax, CumSum, Trilu, GatherElements, Greater, Not, Where."""
    def f32(name, shape):
        return oh.make_tensor_value_info(name, TP.FLOAT, shape)
    consts = [nh.from_array(np.array(v, dtype=np.int64), n) for n, v in (("sizes", [2, 4]), ("axes", [1]), ("zero", 0))]
    path = tiny_model(tmp_path / "m.onnx", [
        oh.make_node("Split", ["x", "sizes"], ["a", "b"], axis=1),
        oh.make_node("ReduceSum", ["b", "axes"], ["rs"], keepdims=1),
        oh.make_node("Max", ["a", "rs"], ["m"]),
        oh.make_node("Tanh", ["m"], ["t"]),
        oh.make_node("LogSoftmax", ["t"], ["ls"], axis=-1),
        oh.make_node("CumSum", ["ls", "zero"], ["cs"], exclusive=1),
        oh.make_node("Trilu", ["b"], ["tb"], upper=0),
        oh.make_node("GatherElements", ["b", "idx"], ["ge"], axis=1),
        oh.make_node("Greater", ["cs", "ls"], ["gt"]),
        oh.make_node("Not", ["gt"], ["ng"]),
        oh.make_node("Where", ["ng", "cs", "ls"], ["w"])],
        [f32("x", ["n", 6]), oh.make_tensor_value_info("idx", TP.INT64, ["n", 3])],
        [f32("w", ["n", 2]), f32("tb", ["n", 4]), f32("ge", ["n", 3])], consts)
    g = load_onnx(path)
    assert {"core.cumsum", "core.tril", "core.gather_elements", "core.logical_not"} <= set(g.op_counts())
    rng = np.random.default_rng(3)
    x, idx = rng.standard_normal((5, 6)).astype(np.float32), rng.integers(-4, 4, (5, 3))
    outs = reference.run(g, torch.from_numpy(x), torch.from_numpy(idx))
    for out, want in zip(outs, run_ort(path, {"x": x, "idx": idx}), strict=True):
        torch.testing.assert_close(out, torch.from_numpy(want), atol=1e-5, rtol=1e-5)


# --- weights --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_legacy(tmp_path_factory):
    return export(hf_model("llama"), str(tmp_path_factory.mktemp("llama") / "model.onnx"), "legacy")


@pytest.fixture(scope="module")
def external(llama_legacy, tmp_path_factory):
    """The legacy Llama export with every initializer in an external data file."""
    out = str(tmp_path_factory.mktemp("external") / "model.onnx")
    onnx.save(onnx.load(llama_legacy), out, save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.weights", size_threshold=0)
    return out


def test_external_data_loads_lazily(external, monkeypatch):
    loaded = []
    real_load = OnnxStorage.load
    monkeypatch.setattr(OnnxStorage, "load", lambda self: loaded.append(self) or real_load(self))
    g = load_onnx(external)
    assert all(s.type.numel() == 1 or not s.type.dtype.is_float for s in loaded)  # only shapes and scalars
    weights = [v for v in g.params.values() if v.type.rank == 2]
    assert len(weights) == 16 and all("model.weights" in v.storage.describe() for v in weights)
    monkeypatch.undo()
    ids, pos = tokens(9, seed=3)
    (out,) = reference.run(g, ids, pos)
    (want,) = run_ort(external, {"input_ids": ids.numpy(), "position_ids": pos.numpy()})
    torch.testing.assert_close(out, torch.from_numpy(want), atol=1e-5, rtol=1e-5)


def test_weights_are_read_after_import(external, tmp_path):
    """Data is read when a backend loads it: a weights file removed after import is missed then."""
    folder = tmp_path / "copy"
    shutil.copytree(os.path.dirname(external), folder)
    g = load_onnx(folder / "model.onnx")
    os.remove(folder / "model.weights")
    with pytest.raises(FileNotFoundError, match="model.weights"):
        reference.run(g, *tokens(5, seed=0))


def test_dtype_casts_float_weights_lazily(llama_legacy):
    path = llama_legacy
    g = load_onnx(path, dtype=DType.bf16)
    assert {v.type.dtype for v in g.params.values() if v.type.rank == 2} == {DType.bf16}
    assert str(g.outputs[0].type) == "bf16[1,T,128]"
    ids, pos = tokens(9, seed=1)
    (out,) = reference.run(g, ids, pos)
    (want,) = run_ort(path, {"input_ids": ids.numpy(), "position_ids": pos.numpy()})
    # bf16 keeps 8 significant bits: each rounding is ~0.4% and logits are ~0.5 here
    torch.testing.assert_close(out.float(), torch.from_numpy(want), atol=2e-2, rtol=2e-2)
    assert not torch.allclose(out.float(), torch.from_numpy(want), atol=1e-6, rtol=0)


# --- errors ---------------------------------------------------------------------------------

def test_unsupported_op_names_op_node_and_table(tmp_path):
    x = oh.make_tensor_value_info("x", TP.FLOAT, ["n", 4])
    path = tiny_model(tmp_path / "m.onnx", [oh.make_node("Relu", ["x"], ["r"], name="/act/Relu"),
                                            oh.make_node("Det", ["r"], ["y"], name="/head/Det")],
                      [x], [oh.make_tensor_value_info("y", TP.FLOAT, [])])
    with pytest.raises(OnnxImportError) as e:
        load_onnx(path)
    msg = str(e.value)
    assert "Det" in msg and "/head/Det" in msg and "ONNX_OPS in kiln/frontends/onnx.py" in msg and path in msg
    assert e.value.__cause__ is None and e.value.__context__ is None


def test_custom_domain_op_is_refused(tmp_path):
    x = oh.make_tensor_value_info("x", TP.FLOAT, [2, 4])
    path = tiny_model(tmp_path / "m.onnx", [oh.make_node("FastGelu", ["x"], ["y"], name="fg", domain="com.microsoft")],
                      [x], [oh.make_tensor_value_info("y", TP.FLOAT, [2, 4])])
    with pytest.raises(OnnxImportError, match=r"'fg' \(FastGelu\).*com\.microsoft"):
        load_onnx(path)


def test_runtime_shape_is_a_clear_error(tmp_path):
    """A Reshape whose target shape is data (not shape arithmetic) cannot become core.reshape."""
    path = tiny_model(tmp_path / "m.onnx", [oh.make_node("Reshape", ["x", "s"], ["y"], name="/r")],
                      [oh.make_tensor_value_info("x", TP.FLOAT, [2, 4]), oh.make_tensor_value_info("s", TP.INT64, [2])],
                      [oh.make_tensor_value_info("y", TP.FLOAT, [4, 2])])
    with pytest.raises(OnnxImportError, match=r"'/r' \(Reshape\).*must be known when the model is imported"):
        load_onnx(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        load_onnx(tmp_path / "nope.onnx")


@pytest.mark.parametrize("content", [b"", b"this is not an onnx model\n" * 20])
def test_not_an_onnx_file(tmp_path, content):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(OnnxImportError, match="bad.onnx.*not .*ONNX model"):
        load_onnx(path)


def test_truncated_file(llama_legacy, tmp_path):
    data = open(llama_legacy, "rb").read()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(OnnxImportError, match=r"cut\.onnx is not a readable ONNX model"):
        load_onnx(cut)


def test_missing_or_truncated_external_data(external, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(os.path.dirname(external), folder)
    weights = folder / "model.weights"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(OnnxImportError, match=r"model\.onnx: external data file .*model\.weights is truncated"):
        load_onnx(folder / "model.onnx")
    os.remove(weights)
    with pytest.raises(OnnxImportError, match=r"model\.weights, which does not exist"):
        load_onnx(folder / "model.onnx")


def test_symbolic_dims_from_dim_params_and_unnamed_dims(tmp_path):
    x = oh.make_tensor_value_info("x", TP.FLOAT, ["batch", None, "f32"])  # no name; a reserved word
    path = tiny_model(tmp_path / "m.onnx", [oh.make_node("Shape", ["x"], ["s"]),
                                            oh.make_node("Reshape", ["x", "s"], ["y"]),
                                            oh.make_node("Sigmoid", ["y"], ["z"])],
                      [x], [oh.make_tensor_value_info("z", TP.FLOAT, None)])
    g = load_onnx(path)
    (t,) = g.inputs
    assert t.type.shape[0] == "batch" and len({*t.type.shape}) == 3 and all(isinstance(d, str) for d in t.type.shape)
    assert g.op_counts() == {"core.sigmoid": 1}  # Reshape to its own Shape folds away
    x_in = torch.randn(2, 3, 5)
    torch.testing.assert_close(reference.run(g, x_in)[0], torch.sigmoid(x_in))


def test_symbolic_dim_reaching_data(tmp_path):
    """x / seq_len: a dim used as data becomes core.dims, which the backend fills in at run time."""
    one = nh.from_array(np.array(1, dtype=np.int64), "one")
    path = tiny_model(tmp_path / "m.onnx", [oh.make_node("Shape", ["x"], ["s"]),
                                            oh.make_node("Gather", ["s", "one"], ["n"], axis=0),
                                            oh.make_node("Cast", ["n"], ["nf"], to=TP.FLOAT),
                                            oh.make_node("Div", ["x", "nf"], ["y"])],
                      [oh.make_tensor_value_info("x", TP.FLOAT, [2, "seq"])],
                      [oh.make_tensor_value_info("y", TP.FLOAT, [2, "seq"])], [one])
    g = load_onnx(path)
    (dims,) = [op for op in g.ops if op.name == "core.dims"]
    assert dims.attrs["dims"] == ("seq",)
    for T in (3, 8):
        x = torch.randn(2, T)
        torch.testing.assert_close(reference.run(g, x)[0], x / T)
