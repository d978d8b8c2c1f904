"""The kv-cache rewrite: Before/Expected text, the serving graph computing the stateless graph's
logits, and a minimal paged decode loop (its own pool and block tables) that gives transformers'
greedy tokens for SmolLM2 with prefill chunks and decode tokens mixed in the same steps."""

import textwrap

import pytest
import torch

from kiln.backends import reference
from kiln.ir import TensorStorage, parse, print_graph
from kiln.passes.kv_cache import ServingGraphError
from kiln.passes.manager import PassError, run_pipeline

BEFORE = """
param @wq : f32[8,8]
param @wk : f32[4,8]
param @wv : f32[4,8]
param @head : f32[16,8]
func @main(%tokens: i32[T], %positions: i32[T]) -> (f32[T,16]) {
  %0 = core.reshape(%tokens) {shape=[1,T]} : i32[1,T]
  %1 = core.constant() {value=0.5, dtype=f32} : f32[]
  %2 = core.cast(%0) {dtype=f32} : f32[1,T]
  %3 = core.reshape(%2) {shape=[1,T,1]} : f32[1,T,1]
  %4 = core.expand(%3) {shape=[1,T,8]} : f32[1,T,8]
  %5 = core.mul(%4, %1) : f32[1,T,8]
  %6 = llm.linear(%5, @wq) : f32[1,T,8]
  %7 = llm.linear(%5, @wk) : f32[1,T,4]
  %8 = llm.linear(%5, @wv) : f32[1,T,4]
  %9 = core.reshape(%6) {shape=[1,T,2,4]} : f32[1,T,2,4]
  %10 = core.permute(%9) {dims=[0,2,1,3]} : f32[1,2,T,4]
  %11 = core.reshape(%7) {shape=[1,T,1,4]} : f32[1,T,1,4]
  %12 = core.permute(%11) {dims=[0,2,1,3]} : f32[1,1,T,4]
  %13 = core.reshape(%8) {shape=[1,T,1,4]} : f32[1,T,1,4]
  %14 = core.permute(%13) {dims=[0,2,1,3]} : f32[1,1,T,4]
  %15 = llm.attention(%10, %12, %14) {causal=true, scale=0.5} : f32[1,2,T,4]
  %16 = core.permute(%15) {dims=[0,2,1,3]} : f32[1,T,2,4]
  %17 = core.reshape(%16) {shape=[1,T,8]} : f32[1,T,8]
  %18 = llm.linear(%17, @head) : f32[1,T,16]
  %19 = core.reshape(%18) {shape=[T,16]} : f32[T,16]
  return %19
}
"""

EXPECTED = """
param @wq : f32[8,8]
param @wk : f32[4,8]
param @wv : f32[4,8]
param @head : f32[16,8]
func @main(%tokens: i32[T], %positions: i32[T], %slot_mapping: i64[T], %block_tables: i32[B,MB], %context_lens: i32[B], %query_start: i32[B+1], %logits_indices: i64[N], %k_cache.0: f32[NB,4,1,4], %v_cache.0: f32[NB,4,1,4]) -> (f32[N,16]) {
  %0 = core.reshape(%tokens) {shape=[1,T]} : i32[1,T]
  %1 = core.constant() {value=0.5, dtype=f32} : f32[]
  %2 = core.cast(%0) {dtype=f32} : f32[1,T]
  %3 = core.reshape(%2) {shape=[1,T,1]} : f32[1,T,1]
  %4 = core.expand(%3) {shape=[1,T,8]} : f32[1,T,8]
  %5 = core.mul(%4, %1) : f32[1,T,8]
  %6 = llm.linear(%5, @wq) : f32[1,T,8]
  %7 = llm.linear(%5, @wk) : f32[1,T,4]
  %8 = llm.linear(%5, @wv) : f32[1,T,4]
  %36 = core.reshape(%6) {shape=[T,2,4]} : f32[T,2,4]
  %37 = core.reshape(%7) {shape=[T,1,4]} : f32[T,1,4]
  %38 = core.reshape(%8) {shape=[T,1,4]} : f32[T,1,4]
  %26 = llm.paged_attention(%36, %37, %38, %k_cache.0, %v_cache.0, %slot_mapping, %block_tables, %context_lens, %query_start) {scale=0.5} : f32[T,2,4]
  %39 = core.reshape(%26) {shape=[1,T,8]} : f32[1,T,8]
  %29 = core.gather(%39, %logits_indices) {dim=1} : f32[1,N,8]
  %30 = llm.linear(%29, @head) : f32[1,N,16]
  %31 = core.reshape(%30) {shape=[N,16]} : f32[N,16]
  return %31
}
"""


def ir(text):
    return textwrap.dedent(text).lstrip()


def single_sequence_inputs(n, block, num_blocks, dtype=torch.float32, kv_heads=1, head_dim=4, layers=1):
    """Metadata for one sequence prefilled in one step, its blocks in reverse order (so a wrong
    block-table lookup cannot pass by accident), logits for every row."""
    blocks = list(range(num_blocks - 1, num_blocks - 1 - (n + block - 1) // block, -1))
    slots = torch.tensor([blocks[p // block] * block + p % block for p in range(n)])
    caches = [torch.zeros(num_blocks, block, kv_heads, head_dim, dtype=dtype) for _ in range(2 * layers)]
    return [slots, torch.tensor([blocks], dtype=torch.int32), torch.tensor([n], dtype=torch.int32),
            torch.tensor([0, n], dtype=torch.int32), torch.arange(n), *caches]


def test_kv_cache_rewrite_text_and_numerics():
    graph = parse(ir(BEFORE))
    stateless = graph.clone()
    run_pipeline(graph, "kv-cache{block=4},canonicalize,cse,dce")
    assert print_graph(graph) == ir(EXPECTED)
    g = torch.Generator().manual_seed(0)
    params = {n: torch.randn(p.type.concrete({}), generator=g) for n, p in stateless.params.items()}
    n = 7
    tokens, positions = torch.randint(0, 9, (n,), generator=g, dtype=torch.int32), torch.arange(n, dtype=torch.int32)
    want = reference.run(stateless, tokens, positions, params=params)[0]
    got = reference.run(graph, tokens, positions, *single_sequence_inputs(n, 4, 5), params=params)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_kv_cache_refuses_unfused_attention_and_says_why():
    text = ir(BEFORE).replace("{causal=true, scale=0.5}", "{scale=0.5}")
    with pytest.raises(PassError, match="without causal=true cannot be paged; run fuse-attention first"):
        run_pipeline(parse(text), "kv-cache")
    assert issubclass(ServingGraphError, ValueError)


# --- a minimal paged decode loop ---------------------------------------------------------------------

class PagedDecodeLoop:
    """Drives a serving graph: one pool of blocks shared by every sequence, block tables grown on
    demand, prefill in chunks, and new sequences admitted while others decode."""

    def __init__(self, graph, num_blocks: int):
        self.exe = reference.compile(graph)
        caches = [v for v in graph.inputs if v.name.startswith(("k_cache.", "v_cache."))]
        _, self.block, kv_heads, dim = caches[0].type.shape
        self.caches = [torch.zeros(num_blocks, self.block, kv_heads, dim, dtype=c.type.dtype.torch) for c in caches]
        self.free = list(range(num_blocks))[::-1]

    def generate(self, prompts, max_new_tokens, chunk, admit_every, eos):
        seqs = [{"tokens": list(p), "new": [], "blocks": [], "cached": 0, "done": False} for p in prompts]
        active, step, mixed_steps = [], 0, 0
        while any(not s["done"] for s in seqs):
            if step % admit_every == 0 and len(active) < len(seqs):
                active.append(seqs[len(active)])
            batch = [s for s in active if not s["done"]]
            tokens, positions, slots, starts, lens, rows, tables = [], [], [], [0], [], [], []
            for s in batch:
                todo = s["tokens"][s["cached"]: s["cached"] + chunk]
                first = s["cached"]
                while len(s["blocks"]) * self.block < first + len(todo):
                    s["blocks"].append(self.free.pop())
                tokens += todo
                positions += range(first, first + len(todo))
                slots += [s["blocks"][p // self.block] * self.block + p % self.block for p in range(first, first + len(todo))]
                starts.append(starts[-1] + len(todo))
                lens.append(first + len(todo))
                s["ends"] = first + len(todo) == len(s["tokens"])
                if s["ends"]:
                    rows.append(starts[-1] - 1)
                s["cached"] += len(todo)
                tables.append(s["blocks"])
            width = max(len(t) for t in tables)
            mixed_steps += any(len(s["tokens"]) - s["cached"] == 0 and s["new"] for s in batch) and any(
                not s["new"] for s in batch)
            logits = self.exe(torch.tensor(tokens, dtype=torch.int32), torch.tensor(positions, dtype=torch.int32),
                              torch.tensor(slots), torch.tensor([t + [0] * (width - len(t)) for t in tables],
                                                                dtype=torch.int32),
                              torch.tensor(lens, dtype=torch.int32), torch.tensor(starts, dtype=torch.int32),
                              torch.tensor(rows), *self.caches)[0]
            for s, row in zip([s for s in batch if s["ends"]], logits):
                token = int(row.argmax())
                s["new"].append(token)
                s["tokens"].append(token)
                if token == eos or len(s["new"]) == max_new_tokens:
                    s["done"] = True
                    self.free += s["blocks"]
            step += 1
        return [s["new"] for s in seqs], mixed_steps


def test_paged_decode_matches_transformers_generate(smollm2):
    stateless, model, tokenizer = smollm2
    graph = stateless.clone()
    run_pipeline(graph, "serving")
    counts = graph.op_counts()
    assert counts["llm.paged_attention"] == 30 and "llm.attention" not in counts and "core.softmax" not in counts
    assert counts["llm.rms_norm"] == 61 and counts["llm.rope"] == 60 and counts["llm.silu_mul"] == 30
    prompts = ["The capital of France is", "def fibonacci(n):",
               "Once upon a time, in a land far away, there lived a dragon who loved to read books about",
               "1, 2, 3, 4,", "Water boils at a temperature of one hundred degrees Celsius at sea level, and"]
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    assert len({len(i) for i in ids}) == 5
    new, mixed = PagedDecodeLoop(graph, num_blocks=24).generate(ids, max_new_tokens=8, chunk=8, admit_every=2,
                                                                 eos=tokenizer.eos_token_id)
    assert mixed > 0  # some steps held both prefill chunks and decode tokens
    for prompt, got in zip(ids, new):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)
        assert got == out[0, len(prompt):].tolist(), tokenizer.decode(prompt)


@pytest.mark.parametrize("algo", ["fp8-per-channel", "fp8", "w8a8-sq"])
def test_a_quantized_lm_head_gets_its_rows_before_its_activation_qdq(algo):
    """The logits rows are taken before the lm_head input's quantize-dequantize (which is redone on them), so
    the fusion still sees Q/DQ + linear and the lm_head stays an 8-bit GEMM in the serving graph."""
    from kiln.passes.calibrate import InputStats
    from kiln.passes.quantize import quantize_with

    graph = parse(ir(BEFORE))
    g = torch.Generator().manual_seed(0)
    for p in graph.params.values():
        p.storage = TensorStorage(torch.randn(p.type.concrete({}), generator=g))
    quantize_with(graph, algo, {"head": InputStats(torch.full((8,), 3.0))}, exclude_modules=("wq", "wk", "wv"))
    stateless = graph.clone()
    run_pipeline(graph, "kv-cache{block=4},canonicalize,cse,dce")
    text = print_graph(graph)
    gather = text.index("core.gather(")
    assert gather < text.index("quant.quantize(")   # rows first, then their Q/DQ
    run_pipeline(graph, "fuse-quantized-linear,dce")
    fused = "quant.linear_int8" if algo == "w8a8-sq" else "quant.linear_fp8"
    assert graph.op_counts()[fused] == 1 and "llm.linear(" not in print_graph(graph).split("core.gather(")[1]
    n = 7
    tokens, positions = torch.randint(0, 9, (n,), generator=g, dtype=torch.int32), torch.arange(n, dtype=torch.int32)
    want = reference.run(stateless, tokens, positions)[0]
    got = reference.run(graph, tokens, positions, *single_sequence_inputs(n, 4, 5))[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
