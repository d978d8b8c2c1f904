"""The trt backend without TensorRT: the network in TensorRT's conventions with kiln's plugin nodes,
every node checked against the plugin contract, the whole network executed (onnx's reference
evaluator for the standard nodes, each plugin's own body over kiln's Triton kernels for the
plugin nodes, under TRITON_INTERPRET on a CPU) against the reference backend, each plugin body
against the IR op it implements on fresh random inputs, the optimization profile and trtexec
command, and target="trt" stopping with the way out. The engine build and executor need
TensorRT and a GPU: those tests skip, and no test here builds an engine."""

import importlib.util
import json

import kiln
import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
import transformers as tf
from kiln.backends import reference, select
from kiln.backends import trt as kiln_trt
from kiln.backends.onnx import OnnxExecutable
from kiln.frontends import load
from kiln.ir import TensorStorage, get_op, parse
from kiln.kernels.trt_plugins import NAMESPACE, PLUGINS, VERSION, contract_markdown
from kiln.passes.calibrate import calibrate
from kiln.passes.manager import run_pipeline
from kiln.passes.pipelines import PIPELINES
from kiln.passes.quantize import quantize_with
from kiln.runtime.config import BuildConfig
from kiln.tools import irdump
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

pytest.importorskip("triton")

TINY = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 256}
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
NO_TENSORRT = "TensorRT (tensorrt) does not import here: the engine build and executor run only where it does"


def tiny_llama():
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**TINY)).eval()


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    """The tiny Llama's serving graph through the trt pipeline (blocks of 4), and its network folder."""
    graph = load(tiny_llama())
    run_pipeline(graph, PIPELINES["trt"].replace("block=16", "block=4"))
    folder = kiln_trt.export_network(graph, tmp_path_factory.mktemp("trt"), progress=False,
                                     build_config=BuildConfig(max_batch_size=8, max_num_tokens=64, max_seq_len=32))
    return graph, folder


# -- running a plugin network: standard nodes by onnx.reference, plugin nodes by their bodies ------

def _torch(x) -> torch.Tensor:
    x = np.array(x)
    if x.dtype == ml_dtypes.float8_e4m3fn:
        return torch.from_numpy(x.view(np.uint8)).view(torch.float8_e4m3fn)
    return torch.from_numpy(x)


def _plugin_op(spec):
    def _run(self, *inputs, **_):
        tensors = [_torch(x) for x in inputs]
        out = spec.run(*tensors, **{a.name: a.type(getattr(self, a.name)) for a in spec.attributes})
        outs = out if isinstance(out, tuple) else (out,)
        aliased = [tensors[[i.name for i in spec.inputs].index(o.aliases)] for o in spec.outputs[len(outs):]]
        return tuple(t.numpy() for t in (*outs, *aliased))
    return type(spec.name, (OpRun,), {"op_domain": NAMESPACE, "_run": _run})


def run_network(path, names, inputs):
    evaluator = ReferenceEvaluator(str(path), new_ops=[_plugin_op(p) for p in PLUGINS.values()])
    return [torch.from_numpy(np.array(o)) for o in evaluator.run(None, {n: t.numpy() for n, t in zip(names, inputs)})]


def step(graph, *, decode: bool, seed: int = 0):
    """A prefill step (a chunk after 3 cached tokens and a fresh prompt) or a decode step (one token
    for each of three sequences), over a shuffled pool of blocks of 4 with random history."""
    g = torch.Generator().manual_seed(seed)
    block = graph.inputs[7].type.shape[1]
    shape = graph.inputs[7].type.concrete({"NB": 10})
    tables = torch.randperm(10, generator=g).int()[:9].reshape(3, 3)
    lens, new = ([5, 9, 2], [1, 1, 1]) if decode else ([6, 5, 1], [3, 5, 1])
    positions = [p for n, c in zip(new, lens) for p in range(c - n, c)]
    slots = [int(tables[b, p // block]) * block + p % block for b, (n, c) in enumerate(zip(new, lens))
             for p in range(c - n, c)]
    caches = [torch.randn(shape, generator=g) for _ in graph.inputs[7:]]
    starts = torch.tensor([0, *np.cumsum(new)], dtype=torch.int32)
    inputs = [torch.randint(0, 128, (len(slots),), generator=g).int(), torch.tensor(positions, dtype=torch.int32),
              torch.tensor(slots), tables, torch.tensor(lens, dtype=torch.int32), starts,
              (starts[1:] - 1).long()]
    return inputs, caches


@pytest.mark.parametrize("decode", [False, True], ids=["prefill", "decode"])
def test_the_plugin_network_computes_the_serving_graph(network, decode):
    graph, folder = network
    assert folder.plugin_nodes == {"RmsNorm": 1, "PagedAttention": 2, "AddRmsNorm": 4}
    inputs, caches = step(graph, decode=decode)
    want_caches = [c.clone() for c in caches]
    want = reference.run(graph, *inputs, *want_caches)[0]
    got = run_network(folder.network.path, folder.network.inputs, inputs + caches)
    torch.testing.assert_close(got[0], want, atol=2e-5, rtol=0)
    state = dict(zip(folder.network.outputs, got))
    for v, w in zip(graph.inputs[7:], want_caches):
        torch.testing.assert_close(state[f"{v.name}.out"], w, atol=1e-6, rtol=0)
    # and the standard-op twin that trtexec builds runs in onnxruntime
    (logits,) = OnnxExecutable(folder.standard)(*inputs, *[c.clone() for c in caches])
    torch.testing.assert_close(logits, want, atol=2e-5, rtol=0)


ROPE_ATTENTION = """param @inv_freq : f32[8]
func @main(%q: f32[T,4,16], %k: f32[T,2,16], %v: f32[T,2,16], %slot_mapping: i64[T], %block_tables: i32[B,MB], \
%context_lens: i32[B], %query_start: i32[B+1], %positions: i32[T], %k_cache.0: f32[NB,4,2,16], \
%v_cache.0: f32[NB,4,2,16]) -> (f32[T,4,16]) {
  %0 = llm.paged_attention(%q, %k, %v, %k_cache.0, %v_cache.0, %slot_mapping, %block_tables, %context_lens, \
%query_start, %positions, @inv_freq) {scale=0.25, rope_scale=1.5} : f32[T,4,16]
  return %0
}
""".replace("\\\n", "")


def test_paged_attention_with_rope_fused_in(tmp_path):
    graph = parse(ROPE_ATTENTION)
    graph.params["inv_freq"].storage = TensorStorage(1.0 / 10000 ** (torch.arange(0, 16, 2).float() / 16))
    g = torch.Generator().manual_seed(6)
    tables = torch.tensor([[3, 1], [0, 2]], dtype=torch.int32)
    q, k, v = torch.randn(5, 4, 16, generator=g), torch.randn(5, 2, 16, generator=g), torch.randn(5, 2, 16, generator=g)
    meta = [torch.tensor([14, 15, 4, 5, 6]), tables, torch.tensor([4, 7], dtype=torch.int32),
            torch.tensor([0, 2, 5], dtype=torch.int32), torch.tensor([2, 3, 4, 5, 6], dtype=torch.int32)]
    caches = [torch.randn(4, 4, 2, 16, generator=g) for _ in range(2)]
    want_caches = [c.clone() for c in caches]
    want = reference.run(graph, q, k, v, *meta, *want_caches)[0]
    folder = kiln_trt.export_network(graph, tmp_path, progress=False)
    assert folder.plugin_nodes == {"PagedAttention": 1}
    for path in (folder.network.path, folder.standard.path):
        out = run_network(path, folder.network.inputs, [q, k, v, *meta, *[c.clone() for c in caches]])
        torch.testing.assert_close(out[0], want, atol=2e-5, rtol=1e-5)
        for got, w in zip(out[1:], want_caches):
            torch.testing.assert_close(got, w, atol=1e-5, rtol=1e-5)


def test_every_plugin_node_keeps_the_contract(network):
    graph, folder = network
    for path in (folder.network.path, folder.standard.path):
        onnx.checker.check_model(str(path), full_check=True)   # kiln's schemas: attributes, arity, types
    model = onnx.shape_inference.infer_shapes(onnx.load(str(folder.network.path)), strict_mode=True)
    types = {v.name: v.type.tensor_type for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    types.update({t.name: onnx.helper.make_tensor_type_proto(t.data_type, t.dims).tensor_type
                  for t in model.graph.initializer})
    ir_dtype = {v: k for k, v in kiln.backends.onnx.ONNX_DTYPES.items()}
    nodes = [n for n in model.graph.node if n.domain == NAMESPACE]
    assert nodes and {o.domain: o.version for o in model.opset_import}[NAMESPACE] == int(VERSION)
    for n in nodes:
        spec = PLUGINS[n.op_type]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs.pop("plugin_namespace") == NAMESPACE.encode() and attrs.pop("plugin_version") == VERSION.encode()
        assert {k: type(v) for k, v in attrs.items()} == {a.name: a.type for a in spec.attributes}, n.name
        assert len(n.input) == len(spec.inputs) and len(n.output) == len(spec.outputs)
        for i, name in enumerate(n.input):
            assert ir_dtype[types[name].elem_type].value in spec.input_dtypes(i), (n.name, spec.inputs[i].name)
            if types[name].HasField("shape"):   # unknown after a plugin node (plugins have no shape inference)
                assert rank_fits(spec.inputs[i].shape, len(types[name].shape.dim)), (n.name, spec.inputs[i].name)
        if n.op_type == "PagedAttention":   # the fields agree with the layer's tensors
            cache = graph.inputs[7].type.shape
            assert (attrs["num_heads"], attrs["num_kv_heads"], attrs["head_dim"], attrs["tokens_per_block"]) == \
                (4, cache[2], cache[3], cache[1])
            assert attrs["scale"] == pytest.approx(16 ** -0.5) and attrs["rope_scale"] == 1.0
            assert [n.output[1], n.output[2]] == [o for o in folder.aliased if o in n.output]
    assert folder.aliased == [f"{c}.{i}.out" for i in range(2) for c in ("k_cache", "v_cache")]


def rank_fits(shape: str, rank: int) -> bool:
    """Whether a rank fits a contract shape such as "[T, H, D]", "[..., N]" or "[]"."""
    dims = [d.strip() for d in shape.strip("[]").split(",") if d.strip()]
    return rank >= len(dims) - 1 if "..." in dims else rank == len(dims)


def test_the_contract_document_is_generated_from_the_table():
    with open("docs/trt_plugins.md") as f:
        assert f.read() == contract_markdown(), "regenerate docs/trt_plugins.md (see its header)"


# -- each plugin body, called as the plugin calls it, against the IR op ----------------------------

def test_paged_attention_plugin_matches_the_op():
    g = torch.Generator().manual_seed(3)
    heads, kv_heads, dim, block = 8, 2, 32, 8
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)
    for decode in (False, True):
        lens, new = ([1, 20, 13], [1, 1, 1]) if decode else ([9, 20, 13], [9, 4, 13])
        tables = torch.randperm(12, generator=g).int()[:9].reshape(3, 3)
        positions = torch.tensor([p for n, c in zip(new, lens) for p in range(c - n, c)], dtype=torch.int32)
        slots = torch.tensor([int(tables[b, p // block]) * block + p % block for b, (n, c) in enumerate(zip(new, lens))
                              for p in range(c - n, c)])
        t = len(slots)
        q, k, v = (torch.randn(t, h, dim, generator=g) for h in (heads, kv_heads, kv_heads))
        caches = [torch.randn(12, block, kv_heads, dim, generator=g) for _ in range(2)]
        meta = (slots, tables, torch.tensor(lens, dtype=torch.int32),
                torch.tensor([0, *np.cumsum(new)], dtype=torch.int32))
        want_caches = [c.clone() for c in caches]
        want = get_op("llm.paged_attention").reference(q, k, v, *want_caches, *meta, positions, inv_freq, scale=0.2,
                                                       rope_scale=1.25)
        got = PLUGINS["PagedAttention"].run(q, k, v, *caches, *meta, positions, inv_freq, num_heads=heads,
                                            num_kv_heads=kv_heads, head_dim=dim, tokens_per_block=block, scale=0.2,
                                            rope_scale=1.25)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        for c, w in zip(caches, want_caches):
            torch.testing.assert_close(c, w, atol=1e-5, rtol=1e-5)


def test_norm_plugins_match_the_ops():
    g = torch.Generator().manual_seed(4)
    x, r, w = torch.randn(5, 3, 96, generator=g), torch.randn(5, 3, 96, generator=g), torch.randn(96, generator=g)
    torch.testing.assert_close(PLUGINS["RmsNorm"].run(x, w, eps=1e-5),
                               get_op("llm.rms_norm").reference(x, w, eps=1e-5), atol=1e-5, rtol=1e-5)
    got = PLUGINS["AddRmsNorm"].run(x, r, w, eps=1e-5)
    for a, b in zip(got, get_op("llm.add_rms_norm").reference(x, r, w, eps=1e-5)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def calibrated():
    graph = load(tiny_llama())
    run_pipeline(graph, "stateless")
    windows = [torch.randint(0, 128, (16,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    return graph, calibrate(graph, windows, progress=False)


@pytest.mark.parametrize("algo, plugin", [("fp8", "Fp8Linear"), ("fp8-per-channel", "Fp8RowwiseLinear"),
                                          ("w8a16", "W8A16Linear"), ("w4a16", "W4A16Linear")])
def test_quantized_gemm_plugins_compute_the_quantized_graph(algo, plugin, calibrated, tmp_path):
    graph, calib = calibrated
    q = graph.clone()
    quantize_with(q, algo, calib, **({"group_size": 32} if algo == "w4a16" else {}))
    folder = kiln_trt.export_network(q, tmp_path, progress=False)
    assert folder.plugin_nodes == {"RmsNorm": 5, plugin: 8}                 # every linear but the lm_head
    ids, pos = torch.randint(0, 128, (6,), generator=torch.Generator().manual_seed(5)).int(), \
        torch.arange(6, dtype=torch.int32)
    got = run_network(folder.network.path, folder.network.inputs, [ids, pos])[0]
    torch.testing.assert_close(got, reference.run(q, ids, pos)[0], atol=2e-5, rtol=1e-5)
    if algo == "fp8-per-channel":   # TensorRT's explicit quantization takes constant Q scales only
        assert "scale computed at run time" in folder.standard_unbuildable and folder.trtexec() is None
    else:
        assert folder.trtexec() is not None


# -- profiles, commands, and the target without TensorRT ------------------------------------------

def test_profile_from_build_config_and_trtexec_command(network):
    graph, folder = network
    profile = kiln_trt.optimization_profile(graph, BuildConfig(max_batch_size=8, max_num_tokens=64, max_seq_len=32))
    assert profile["tokens"] == ((1,), (8,), (64,))
    assert profile["block_tables"] == ((1, 1), (8, 8), (8, 8))             # 32 tokens = 8 blocks of 4
    assert profile["query_start"] == ((2,), (9,), (9,))
    assert profile["logits_indices"] == ((1,), (8,), (64,))
    assert profile["k_cache.0"] == ((1, 4, 2, 16), (64, 4, 2, 16), (64, 4, 2, 16))
    assert folder.profile == profile
    command = folder.trtexec()
    assert command.startswith(f"trtexec --onnx={folder.folder}/model.standard.onnx --stronglyTyped "
                              f"--minShapes=tokens:1,positions:1,slot_mapping:1,block_tables:1x1,")
    assert "--maxShapes=tokens:64," in command and command.endswith(f"--saveEngine={folder.folder}/model.engine")
    description = json.loads((folder.folder / "network.json").read_text())
    assert description["build"] == {"kiln": f"python -m kiln.backends.trt_engine {folder.folder}",
                                    "trtexec": command, "trtexec_unavailable": None}
    assert description["profile"]["tokens"] == {"min": [1], "opt": [8], "max": [64]}


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT imports here: target='trt' builds the engine instead")
def test_target_trt_without_tensorrt_writes_the_network_and_says_how_to_build(tmp_path):
    backend, reason = select("trt")
    assert backend.name == "trt" and "does not import here" in reason
    assert "not trt: TensorRT (tensorrt) does not import here" in select("auto")[1]
    with pytest.raises(kiln_trt.TensorRTRequiredError) as err:
        kiln.compile(tiny_llama(), target="trt", output_dir=tmp_path, progress=False,
                     build_config=BuildConfig(max_batch_size=4, max_num_tokens=32, max_seq_len=64))
    message = str(err.value)
    assert f"target='trt' wrote its network to {tmp_path}" in message and "No engine was built" in message
    assert "pip install tensorrt" in message and "nvcr.io/nvidia/tensorrt" in message
    assert f"python -m kiln.backends.trt_engine {tmp_path}" in message
    assert f"trtexec --onnx={tmp_path}/model.standard.onnx --stronglyTyped --minShapes=tokens:1," in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data", "model.standard.onnx",
                                                          "network.json"]
    for name in ("model.onnx", "model.standard.onnx"):
        onnx.checker.check_model(str(tmp_path / name), full_check=True)


def test_irdump_writes_a_trt_network(tmp_path, capsys):
    tiny_llama().save_pretrained(tmp_path / "llama")
    assert irdump.main([str(tmp_path / "llama"), "-p", "trt", "--format", "trt", "-o", str(tmp_path / "net")]) == 0
    out = capsys.readouterr().out
    assert f"wrote the TensorRT network to {tmp_path / 'net'} (kiln plugin nodes: " in out and "trtexec --onnx" in out


def test_plugin_choice_and_unknown_plugins(network, tmp_path):
    graph, _ = network
    only = kiln_trt.export_network(graph, tmp_path, plugins=("PagedAttention",), progress=False)
    assert only.plugin_nodes == {"PagedAttention": 2}
    none = kiln_trt.export_network(graph, tmp_path / "none", plugins=(), progress=False)
    assert none.plugin_nodes == {} and none.standard is None and none.trtexec().startswith(
        f"trtexec --onnx={tmp_path / 'none'}/model.onnx ")
    with pytest.raises(ValueError, match="unknown plugins Attention; kiln's plugins: PagedAttention"):
        kiln_trt.export_network(graph, tmp_path, plugins=("Attention",), progress=False)


# -- with TensorRT ---------------------------------------------------------------------------------

@pytest.mark.skipif(not HAS_TENSORRT or not torch.cuda.is_available(), reason=NO_TENSORRT + " and a CUDA GPU")
def test_engine_build_and_decode_step(network):
    from kiln.backends import trt_engine

    graph, folder = network
    trt_engine.build_engine(folder.folder)
    exe = trt_engine.TrtExecutable(folder.folder)
    inputs, caches = step(graph, decode=True)
    want_caches = [c.clone() for c in caches]
    want = reference.run(graph, *inputs, *want_caches)[0]
    caches = [c.cuda() for c in caches]
    (got,) = exe(*[t.cuda() for t in inputs], *caches)
    torch.testing.assert_close(got.cpu(), want, atol=1e-3, rtol=1e-3)
    for c, w in zip(caches, want_caches):
        torch.testing.assert_close(c.cpu(), w, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not HAS_TENSORRT, reason=NO_TENSORRT)
def test_plugins_register_with_tensorrt():
    import tensorrt as trt
    from kiln.backends import trt_engine

    trt_engine.register_plugins()
    registry = trt.get_plugin_registry()
    for spec in PLUGINS.values():
        creator = registry.get_creator(spec.name, spec.version, spec.namespace)
        assert creator is not None, spec.plugin_id
        fields = {f.name for f in creator.field_names}
        assert {a.name for a in spec.attributes} <= fields
