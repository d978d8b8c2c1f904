"""The shard pass: Before/Expected text of both ranks of a one-layer GQA model (3 KV heads on 2
ranks, a vocabulary that 2 does not divide), the head scheme, and numerics: each sharded graph
runs on the reference backend in 2 real processes (gloo) and gives the unsharded graph's logits
(tiny Llama, MQA, Qwen2 with biases, Qwen3 with q/k norms, quantized weights, a fused quantized
linear op, SmolLM2), before and after kv-cache. Each rank reads about 1/N of the weights."""

import textwrap

import pytest
import torch
import transformers as tf
from kiln.api import compile as kiln_compile
from kiln.api import load as load_artifact
from kiln.backends import reference
from kiln.frontends import load
from kiln.ir import TensorStorage, parse, print_graph
from kiln.ir.registry import _REGISTRY, op
from kiln.ir.storage import FILE_READS
from kiln.ir.types import TensorType
from kiln.passes.calibrate import calibrate
from kiln.passes.manager import PassError, run_pipeline
from kiln.passes.quantize import quantize_with
from kiln.passes.tensor_parallel import ShardError, head_shard
from kiln.runtime.distributed import PortableGraph, Ranks, run_shard, run_sharded
from kiln.tools import irdump

BEFORE = """
param @embed : f32[11,12]
param @norm1 : f32[12]
param @qkv : f32[24,12]
param @inv_freq : f32[1]
param @o : f32[12,12]
param @norm2 : f32[12]
param @gate_up : f32[16,12]
param @down : f32[12,8]
param @norm : f32[12]
param @head : f32[11,12]
func @main(%tokens: i32[T], %positions: i32[T]) -> (f32[T,11]) {
  %0 = core.reshape(%tokens) {shape=[1,T]} : i32[1,T]
  %1 = llm.embedding(@embed, %0) : f32[1,T,12]
  %2 = llm.rms_norm(%1, @norm1) {eps=1e-05} : f32[1,T,12]
  %3 = llm.linear(%2, @qkv) : f32[1,T,24]
  %4 = core.slice(%3) {dim=2, end=12} : f32[1,T,12]
  %5 = core.slice(%3) {dim=2, start=12, end=18} : f32[1,T,6]
  %6 = core.slice(%3) {dim=2, start=18} : f32[1,T,6]
  %7 = core.reshape(%4) {shape=[1,T,6,2]} : f32[1,T,6,2]
  %8 = core.reshape(%5) {shape=[1,T,3,2]} : f32[1,T,3,2]
  %9 = core.reshape(%6) {shape=[1,T,3,2]} : f32[1,T,3,2]
  %10 = core.reshape(%positions) {shape=[1,T]} : i32[1,T]
  %11 = llm.rope(%7, %10, @inv_freq) : f32[1,T,6,2]
  %12 = llm.rope(%8, %10, @inv_freq) : f32[1,T,3,2]
  %13 = core.permute(%11) {dims=[0,2,1,3]} : f32[1,6,T,2]
  %14 = core.permute(%12) {dims=[0,2,1,3]} : f32[1,3,T,2]
  %15 = core.permute(%9) {dims=[0,2,1,3]} : f32[1,3,T,2]
  %16 = llm.attention(%13, %14, %15) {causal=true, scale=0.5} : f32[1,6,T,2]
  %17 = core.permute(%16) {dims=[0,2,1,3]} : f32[1,T,6,2]
  %18 = core.reshape(%17) {shape=[1,T,12]} : f32[1,T,12]
  %19 = llm.linear(%18, @o) : f32[1,T,12]
  %20 = core.add(%1, %19) : f32[1,T,12]
  %21 = llm.rms_norm(%20, @norm2) {eps=1e-05} : f32[1,T,12]
  %22 = llm.linear(%21, @gate_up) : f32[1,T,16]
  %23 = core.slice(%22) {dim=2, end=8} : f32[1,T,8]
  %24 = core.slice(%22) {dim=2, start=8} : f32[1,T,8]
  %25 = llm.silu_mul(%23, %24) : f32[1,T,8]
  %26 = llm.linear(%25, @down) : f32[1,T,12]
  %27 = core.add(%20, %26) : f32[1,T,12]
  %28 = llm.rms_norm(%27, @norm) {eps=1e-05} : f32[1,T,12]
  %29 = llm.linear(%28, @head) : f32[1,T,11]
  %30 = core.reshape(%29) {shape=[T,11]} : f32[T,11]
  return %30
}
"""

# rank 0: query heads 0-3 and KV heads 0-1 (whole KV groups: 3 KV heads on 2 ranks), MLP columns
# 0-3, vocabulary rows 0-5 (the embedding looks up ids < 6, the lm_head's 6 rows are gathered)
EXPECTED_RANK0 = """
param @embed : f32[6,12]
param @norm1 : f32[12]
param @qkv : f32[16,12]
param @inv_freq : f32[1]
param @o : f32[12,8]
param @norm2 : f32[12]
param @gate_up : f32[8,12]
param @down : f32[12,4]
param @norm : f32[12]
param @head : f32[6,12]
func @main(%tokens: i32[T], %positions: i32[T]) -> (f32[T,11]) {
  %0 = core.reshape(%tokens) {shape=[1,T]} : i32[1,T]
  %31 = core.constant() {value=6, dtype=i32} : i32[]
  %32 = core.lt(%0, %31) : bool[1,T]
  %33 = core.constant() {value=0, dtype=i32} : i32[]
  %34 = core.where(%32, %0, %33) : i32[1,T]
  %35 = llm.embedding(@embed, %34) : f32[1,T,12]
  %36 = core.reshape(%32) {shape=[1,T,1]} : bool[1,T,1]
  %37 = core.constant() {value=0, dtype=f32} : f32[]
  %38 = core.where(%36, %35, %37) : f32[1,T,12]
  %39 = dist.all_reduce(%38) : f32[1,T,12]
  %2 = llm.rms_norm(%39, @norm1) {eps=1e-05} : f32[1,T,12]
  %3 = llm.linear(%2, @qkv) : f32[1,T,16]
  %4 = core.slice(%3) {dim=2, end=8} : f32[1,T,8]
  %5 = core.slice(%3) {dim=2, start=8, end=12} : f32[1,T,4]
  %6 = core.slice(%3) {dim=2, start=12} : f32[1,T,4]
  %7 = core.reshape(%4) {shape=[1,T,4,2]} : f32[1,T,4,2]
  %8 = core.reshape(%5) {shape=[1,T,2,2]} : f32[1,T,2,2]
  %9 = core.reshape(%6) {shape=[1,T,2,2]} : f32[1,T,2,2]
  %10 = core.reshape(%positions) {shape=[1,T]} : i32[1,T]
  %11 = llm.rope(%7, %10, @inv_freq) : f32[1,T,4,2]
  %12 = llm.rope(%8, %10, @inv_freq) : f32[1,T,2,2]
  %13 = core.permute(%11) {dims=[0,2,1,3]} : f32[1,4,T,2]
  %14 = core.permute(%12) {dims=[0,2,1,3]} : f32[1,2,T,2]
  %15 = core.permute(%9) {dims=[0,2,1,3]} : f32[1,2,T,2]
  %16 = llm.attention(%13, %14, %15) {causal=true, scale=0.5} : f32[1,4,T,2]
  %17 = core.permute(%16) {dims=[0,2,1,3]} : f32[1,T,4,2]
  %18 = core.reshape(%17) {shape=[1,T,8]} : f32[1,T,8]
  %19 = llm.linear(%18, @o) : f32[1,T,12]
  %40 = dist.all_reduce(%19) : f32[1,T,12]
  %20 = core.add(%39, %40) : f32[1,T,12]
  %21 = llm.rms_norm(%20, @norm2) {eps=1e-05} : f32[1,T,12]
  %22 = llm.linear(%21, @gate_up) : f32[1,T,8]
  %23 = core.slice(%22) {dim=2, end=4} : f32[1,T,4]
  %24 = core.slice(%22) {dim=2, start=4} : f32[1,T,4]
  %25 = llm.silu_mul(%23, %24) : f32[1,T,4]
  %26 = llm.linear(%25, @down) : f32[1,T,12]
  %41 = dist.all_reduce(%26) : f32[1,T,12]
  %27 = core.add(%20, %41) : f32[1,T,12]
  %28 = llm.rms_norm(%27, @norm) {eps=1e-05} : f32[1,T,12]
  %29 = llm.linear(%28, @head) : f32[1,T,6]
  %42 = dist.all_gather(%29) {dim=2, world_size=2} : f32[1,T,12]
  %43 = core.slice(%42) {dim=2, end=11} : f32[1,T,11]
  %30 = core.reshape(%43) {shape=[T,11]} : f32[T,11]
  return %30
}
"""

# rank 1: query heads 4-5 and KV head 2, MLP columns 4-7, vocabulary rows 6-10 and one row of
# zeros, so that every rank's logits have 6 columns to gather
EXPECTED_RANK1 = """
param @embed : f32[5,12]
param @norm1 : f32[12]
param @qkv : f32[8,12]
param @inv_freq : f32[1]
param @o : f32[12,4]
param @norm2 : f32[12]
param @gate_up : f32[8,12]
param @down : f32[12,4]
param @norm : f32[12]
param @head : f32[6,12]
func @main(%tokens: i32[T], %positions: i32[T]) -> (f32[T,11]) {
  %0 = core.reshape(%tokens) {shape=[1,T]} : i32[1,T]
  %31 = core.constant() {value=6, dtype=i32} : i32[]
  %32 = core.ge(%0, %31) : bool[1,T]
  %33 = core.sub(%0, %31) : i32[1,T]
  %34 = core.constant() {value=0, dtype=i32} : i32[]
  %35 = core.where(%32, %33, %34) : i32[1,T]
  %36 = llm.embedding(@embed, %35) : f32[1,T,12]
  %37 = core.reshape(%32) {shape=[1,T,1]} : bool[1,T,1]
  %38 = core.constant() {value=0, dtype=f32} : f32[]
  %39 = core.where(%37, %36, %38) : f32[1,T,12]
  %40 = dist.all_reduce(%39) : f32[1,T,12]
  %2 = llm.rms_norm(%40, @norm1) {eps=1e-05} : f32[1,T,12]
  %3 = llm.linear(%2, @qkv) : f32[1,T,8]
  %4 = core.slice(%3) {dim=2, end=4} : f32[1,T,4]
  %5 = core.slice(%3) {dim=2, start=4, end=6} : f32[1,T,2]
  %6 = core.slice(%3) {dim=2, start=6} : f32[1,T,2]
  %7 = core.reshape(%4) {shape=[1,T,2,2]} : f32[1,T,2,2]
  %8 = core.reshape(%5) {shape=[1,T,1,2]} : f32[1,T,1,2]
  %9 = core.reshape(%6) {shape=[1,T,1,2]} : f32[1,T,1,2]
  %10 = core.reshape(%positions) {shape=[1,T]} : i32[1,T]
  %11 = llm.rope(%7, %10, @inv_freq) : f32[1,T,2,2]
  %12 = llm.rope(%8, %10, @inv_freq) : f32[1,T,1,2]
  %13 = core.permute(%11) {dims=[0,2,1,3]} : f32[1,2,T,2]
  %14 = core.permute(%12) {dims=[0,2,1,3]} : f32[1,1,T,2]
  %15 = core.permute(%9) {dims=[0,2,1,3]} : f32[1,1,T,2]
  %16 = llm.attention(%13, %14, %15) {causal=true, scale=0.5} : f32[1,2,T,2]
  %17 = core.permute(%16) {dims=[0,2,1,3]} : f32[1,T,2,2]
  %18 = core.reshape(%17) {shape=[1,T,4]} : f32[1,T,4]
  %19 = llm.linear(%18, @o) : f32[1,T,12]
  %41 = dist.all_reduce(%19) : f32[1,T,12]
  %20 = core.add(%40, %41) : f32[1,T,12]
  %21 = llm.rms_norm(%20, @norm2) {eps=1e-05} : f32[1,T,12]
  %22 = llm.linear(%21, @gate_up) : f32[1,T,8]
  %23 = core.slice(%22) {dim=2, end=4} : f32[1,T,4]
  %24 = core.slice(%22) {dim=2, start=4} : f32[1,T,4]
  %25 = llm.silu_mul(%23, %24) : f32[1,T,4]
  %26 = llm.linear(%25, @down) : f32[1,T,12]
  %42 = dist.all_reduce(%26) : f32[1,T,12]
  %27 = core.add(%20, %42) : f32[1,T,12]
  %28 = llm.rms_norm(%27, @norm) {eps=1e-05} : f32[1,T,12]
  %29 = llm.linear(%28, @head) : f32[1,T,6]
  %43 = dist.all_gather(%29) {dim=2, world_size=2} : f32[1,T,12]
  %44 = core.slice(%43) {dim=2, end=11} : f32[1,T,11]
  %30 = core.reshape(%44) {shape=[T,11]} : f32[T,11]
  return %30
}
"""


def ir(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


@pytest.fixture(scope="module")
def ranks():
    """Two ranks for the whole module: this process and one worker, joined by gloo."""
    group = Ranks(2)
    yield group
    group.close()


def random_storages(graph, seed=0):
    g = torch.Generator().manual_seed(seed)
    for p in graph.params.values():
        p.storage = TensorStorage(torch.randn(p.type.concrete({}), generator=g) * 0.5)
    return graph


def token_inputs(n, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g, dtype=torch.int32), torch.arange(n, dtype=torch.int32)


def assert_ranks_match(ranks, graph, inputs, atol=1e-5):
    """Every rank's outputs of the sharded graph equal the unsharded graph's."""
    want = reference.run(graph, *inputs)
    for rank, outs in enumerate(run_sharded(ranks, graph, *inputs)):
        for got, expected in zip(outs, want):
            torch.testing.assert_close(got, expected, atol=atol, rtol=atol, msg=lambda m, r=rank: f"rank {r}: {m}")


def test_text_of_both_ranks_and_their_logits(ranks, tmp_path, capsys):
    for rank, expected in ((0, ir(EXPECTED_RANK0)), (1, ir(EXPECTED_RANK1))):
        graph = parse(ir(BEFORE))
        run_pipeline(graph, f"shard{{tp=2,rank={rank}}}")
        assert print_graph(graph) == expected, f"rank {rank}"
    (tmp_path / "before.ir").write_text(ir(BEFORE))  # irdump shows rank 0's graph
    assert irdump.main([str(tmp_path / "before.ir"), "-p", "shard{tp=2}"]) == 0
    assert capsys.readouterr().out == ir(EXPECTED_RANK0)
    assert_ranks_match(ranks, random_storages(parse(ir(BEFORE))), token_inputs(7, 11))


@pytest.mark.parametrize("heads,kv_heads,tp", [(9, 3, 2), (6, 3, 2), (8, 8, 4), (32, 8, 8), (4, 1, 2),
                                               (12, 2, 8), (6, 3, 4), (4, 4, 3), (9, 3, 9)])
def test_head_scheme(heads, kv_heads, tp):
    group = heads // kv_heads
    shards = [head_shard(heads, kv_heads, tp, r) for r in range(tp)]
    covered = [h for s in shards for h in range(*s.q)]
    assert covered == list(range(heads))  # every query head on exactly one rank, in order
    for s in shards:
        q0, q1 = s.q
        assert s.kv == (q0 // group, (q1 - 1) // group + 1)  # exactly the KV heads its query heads read
        assert (q1 - q0) % (s.kv[1] - s.kv[0]) == 0          # the same number of query heads per KV head
    assert max(s.kv[1] - s.kv[0] for s in shards) == shards[0].kv[1] - shards[0].kv[0]  # rank 0's pool is the largest
    if kv_heads >= tp:
        assert sum(s.kv[1] - s.kv[0] for s in shards) == kv_heads  # no KV head held twice


TINY = {"vocab_size": 127, "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 6, "num_key_value_heads": 3, "max_position_embeddings": 256}
ARCHS = {
    "llama-3-kv-heads": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
    "llama-mqa": (tf.LlamaConfig, tf.LlamaForCausalLM, {"num_attention_heads": 4, "num_key_value_heads": 1}),
    "qwen2-biases": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
    "qwen3-qk-norms": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {"head_dim": 16}),
}


def tiny_graph(path, arch="llama-3-kv-heads"):
    config_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(0)
    model_cls(config_cls(**{**TINY, **extra})).eval().save_pretrained(path)
    graph = load(path)
    run_pipeline(graph, "stateless")
    return graph


@pytest.mark.parametrize("arch", list(ARCHS))
def test_tiny_models_logits_match_on_two_ranks(ranks, arch, tmp_path):
    assert_ranks_match(ranks, tiny_graph(tmp_path, arch), token_inputs(9, 127))


@pytest.mark.parametrize("fused", [False, True], ids=["q-dq", "fused-gemm"])
@pytest.mark.parametrize("algo", ["w8a16", "fp8", "fp8-per-channel"])
def test_quantized_weights_shard_with_their_scales(ranks, algo, fused, tmp_path):
    graph = tiny_graph(tmp_path)
    unquantized = graph.clone()
    calibration = calibrate(graph, [token_inputs(16, 127, seed=1)[0]], progress=False) if algo == "fp8" else None
    quantize_with(graph, algo, calibration)
    if fused:  # the quantization passes' own GEMM ops shard by their operands' names and shapes
        run_pipeline(graph, "fuse-quantized-linear,dce")
    rank0 = graph.clone()
    run_pipeline(rank0, "shard{tp=2}")
    weights = {op.operands[1 if fused else 0].name: op for op in rank0.ops
               if op.name.startswith("quant.linear") or (op.name == "quant.dequantize" and op.operands[0].is_param)}
    qkv = next(op for name, op in weights.items() if "q_proj" in name)
    o = next(op for name, op in weights.items() if "o_proj" in name)
    w_scale = (lambda op: op.operands[-1].type.shape) if fused else (lambda op: op.operands[1].type.shape)
    assert qkv.operands[1 if fused else 0].type.shape == (64, 48) and o.operands[1 if fused else 0].type.shape == (48, 32)
    # the int8 token table and its row scales: the rank's 64 of 128 rows, looked up in place (not computed whole)
    table = {n: p.type for n, p in rank0.params.items() if "embed_tokens" in n}
    assert table == {"model.embed_tokens.weight.int8": TensorType("i8", (64, 48)),
                     "model.embed_tokens.weight.scale": TensorType("f32", (64,))}
    assert rank0.op_counts()["quant.embedding" if fused else "llm.embedding"] == 1
    if algo == "fp8":   # one scale per tensor: the same on every rank
        assert w_scale(qkv) == () and w_scale(o) == ()
    else:               # per output channel: the rank's rows of the column-parallel, all of the row-parallel
        assert w_scale(qkv) == (64,) and w_scale(o) == (48,)
    inputs = token_inputs(9, 127)
    if algo == "fp8-per-channel":
        # per-token scales of a row-parallel input are the max over every rank's columns
        assert rank0.op_counts()["dist.all_reduce"] == 1 + 2 * 2 + 2 * 2
        # fp8 rounding of activations can flip on a last-bit difference of the all-reduced sums:
        # bounded by a tenth of what fp8 itself changes
        drift = (reference.run(unquantized, *inputs)[0] - reference.run(graph, *inputs)[0]).abs().max()
        assert_ranks_match(ranks, graph, inputs, atol=float(drift) / 10)
    else:
        assert_ranks_match(ranks, graph, inputs)


def test_shard_before_or_after_kv_cache(ranks, tmp_path):
    stateless = tiny_graph(tmp_path)
    serving = "kv-cache{block=4},canonicalize,cse,dce"
    n = 7   # one sequence prefilled in blocks 2 then 0 of 4 tokens; logits of rows 2 and 6
    tokens, positions = token_inputs(n, 127)
    caches = [torch.zeros(3, 4, 3, 8) for _ in range(4)]
    inputs = [tokens, positions, torch.tensor([8, 9, 10, 11, 0, 1, 2]), torch.tensor([[2, 0]], dtype=torch.int32),
              torch.tensor([n], dtype=torch.int32), torch.tensor([0, n], dtype=torch.int32), torch.tensor([2, 6])]
    before = stateless.clone()
    run_pipeline(before, f"shard{{tp=2}},{serving}")
    after = stateless.clone()
    run_pipeline(after, f"{serving},shard{{tp=2}}")
    assert print_graph(before).count("dist.all_gather") == 1
    for g in (before, after):  # the rank's caches hold its 2 KV heads, and only the asked-for rows are gathered
        assert [v.type for v in g.inputs[7:]] == [TensorType("f32", ("NB", 4, 2, 8))] * 4
        assert g.outputs[0].type == TensorType("f32", ("N", 127))
    unsharded = stateless.clone()
    run_pipeline(unsharded, serving)
    want = reference.run(unsharded, *inputs, *[c.clone() for c in caches])[0]
    for then, graph in ((serving, stateless), ("", unsharded)):
        for rank, outs in enumerate(run_sharded(ranks, graph, *inputs, *caches, then=then)):
            torch.testing.assert_close(outs[0], want, atol=1e-5, rtol=1e-5, msg=lambda m, r=rank: f"rank {r}: {m}")


def test_the_kernel_forms_of_the_cuda_pipeline_shard(ranks, tmp_path):
    graph = tiny_graph(tmp_path)   # the cuda target's serving graph: add_rms_norm, rope fused into paged attention
    run_pipeline(graph, "kv-cache{block=16},cleanup,fuse-for-kernels,cleanup")
    assert graph.op_counts()["llm.add_rms_norm"] == 4
    n = 7
    tokens, positions = token_inputs(n, 127)
    inputs = [tokens, positions, torch.arange(n) + 16, torch.tensor([[1]], dtype=torch.int32),
              torch.tensor([n], dtype=torch.int32), torch.tensor([0, n], dtype=torch.int32), torch.tensor([2, 6])]
    caches = [torch.zeros(2, 16, 3, 8) for _ in range(4)]
    want = reference.run(graph, *inputs, *[c.clone() for c in caches])[0]
    for rank, outs in enumerate(run_sharded(ranks, graph, *inputs, *caches)):
        torch.testing.assert_close(outs[0], want, atol=1e-5, rtol=1e-5, msg=lambda m, r=rank: f"rank {r}: {m}")


# -- a fused quantized linear shards by its declared operands ------------------------------------------

def _qlinear_type(x, qweight, scale, bias=None, *, axis, group_size):
    return x.with_shape((*x.shape[:-1], qweight.shape[0])).with_dtype(scale.dtype)


def qlinear(x, qweight, scale, bias=None, *, axis: int | None = None, group_size: int | None = None):
    """An int8 linear with its scales in one op, as a backend's fusion would make it."""
    from kiln.ir.ops.quant import dequantize

    return torch.nn.functional.linear(x, dequantize(qweight, scale, axis=axis, group_size=group_size), bias)


def register_qlinear():
    if "tptest.qlinear" not in _REGISTRY:
        op("tptest.qlinear", infer=_qlinear_type)(qlinear)


@pytest.fixture
def fused_op():
    """tptest.qlinear, registered for one test (other tests list every registered op)."""
    register_qlinear()
    yield
    _REGISTRY.pop("tptest.qlinear")


FUSED = """
param @up : i8[16,8]
param @up.scale : f32[16]
param @down : i8[8,16]
param @down.scale : f32[8,4]
param @down.bias : f32[8]
func @main(%x: f32[T,8]) -> (f32[T,8]) {
  %0 = tptest.qlinear(%x, @up, @up.scale) {axis=0} : f32[T,16]
  %1 = core.gelu(%0) : f32[T,16]
  %2 = tptest.qlinear(%1, @down, @down.scale, @down.bias) {axis=1, group_size=4} : f32[T,8]
  return %2
}
"""

FUSED_RANK1 = """
param @up : i8[8,8]
param @up.scale : f32[8]
param @down : i8[8,8]
param @down.scale : f32[8,2]
param @down.bias : f32[8]
func @main(%x: f32[T,8]) -> (f32[T,8]) {
  %0 = tptest.qlinear(%x, @up, @up.scale) {axis=0} : f32[T,8]
  %1 = core.gelu(%0) : f32[T,8]
  %2 = tptest.qlinear(%1, @down, @down.scale) {axis=1, group_size=4} : f32[T,8]
  %3 = dist.all_reduce(%2) : f32[T,8]
  %4 = core.add(%3, @down.bias) : f32[T,8]
  return %4
}
"""


def _run_here(state, *args):
    """run_shard after registering tptest.qlinear in the worker too."""
    register_qlinear()
    return run_shard(state, *args)


def test_a_fused_quantized_linear_shards_by_its_operand_names(ranks, fused_op, tmp_path):
    graph = parse(ir(FUSED))
    g = torch.Generator().manual_seed(0)
    for p in graph.params.values():
        data = torch.randint(-127, 128, p.type.concrete({}), generator=g, dtype=torch.int8) if p.type.dtype.is_int \
            else torch.rand(p.type.concrete({}), generator=g) / 64
        p.storage = TensorStorage(data)
    rank1 = graph.clone()
    run_pipeline(rank1, "shard{tp=2,rank=1}")   # group-wise scales cut by group along K; the bias added once
    assert print_graph(rank1) == ir(FUSED_RANK1)
    x = torch.randn(5, 8, generator=g)
    got = ranks.call(_run_here, PortableGraph.of(graph, str(tmp_path)), [x], "")
    want = reference.run(graph, x)[0]
    for outs in got:
        torch.testing.assert_close(outs[0], want, atol=1e-5, rtol=1e-5)


# -- SmolLM2 ---------------------------------------------------------------------------------------

def test_smollm2_logits_match_on_two_ranks(ranks, smollm2):
    traced, _, tokenizer = smollm2
    graph = traced.clone()
    run_pipeline(graph, "stateless")
    rank1 = graph.clone()
    run_pipeline(rank1, "shard{tp=2,rank=1}")
    attention = next(op for op in rank1.ops if op.name == "llm.attention")
    assert attention.operands[0].type.shape[1] == 3 and attention.operands[1].type.shape[1] == 1  # of 9 and 3
    ids = torch.tensor(tokenizer("The capital of France is")["input_ids"], dtype=torch.int32)
    # 30 layers in f32, partial sums added in another order: logits of magnitude ~20 agree to 1e-4
    assert_ranks_match(ranks, graph, (ids, torch.arange(len(ids), dtype=torch.int32)), atol=1e-4)


# -- what each rank reads ---------------------------------------------------------------------------

def bytes_read(graph, tp, rank):
    shard = graph.clone()
    run_pipeline(shard, f"shard{{tp={tp},rank={rank}}}")
    before = FILE_READS.bytes
    reference.compile(shard).load_params()
    return FILE_READS.bytes - before


def test_each_rank_reads_about_its_share_of_the_weights(tmp_path):
    graph = tiny_graph(tmp_path / "model")
    total = bytes_read(graph, 1, 0)
    replicated = sum(p.type.nbytes() for p in graph.params.values() if p.type.rank == 1)  # norms
    reads = [bytes_read(graph, 2, r) for r in range(2)]
    assert sum(reads) <= total + replicated + 48 * 4   # plus the lm_head's row of padding zeros (not read)
    assert all(r < 0.56 * total for r in reads), reads  # 1/2, and rank 0's 4 of the 6 query heads
    # quantized weights saved in an artifact are sliced too: int8 values and per-channel scales
    compiled = kiln_compile(tmp_path / "model", target="reference", progress=False,
                            pipeline="stateless,quantize{algo=w8a16},kv-cache{block=16},cleanup")
    artifact = load_artifact(compiled.save(tmp_path / "artifact", progress=False), progress=False)
    total = bytes_read(artifact.graph, 1, 0)
    assert all(bytes_read(artifact.graph, 2, r) < 0.56 * total for r in range(2))


def test_what_the_pass_refuses(tmp_path):
    with pytest.raises(PassError, match=r"tp=8 is more ranks than the model's 6 query heads: use tp <= 6"):
        run_pipeline(parse(ir(BEFORE)), "shard{tp=8}")
    with pytest.raises(PassError, match=r"need tp >= 1 and 0 <= rank < tp, got tp=2, rank=2"):
        run_pipeline(parse(ir(BEFORE)), "shard{tp=2,rank=2}")
    sharded = parse(ir(BEFORE))
    run_pipeline(sharded, "shard{tp=2}")
    with pytest.raises(PassError, match="it is sharded already"):
        run_pipeline(sharded, "shard{tp=2}")
    assert issubclass(ShardError, ValueError)
    unchanged = parse(ir(BEFORE))
    run_pipeline(unchanged, "shard{tp=1}")
    assert print_graph(unchanged) == ir(BEFORE)
