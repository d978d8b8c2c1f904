"""fuse-for-kernels: the residual add joins the next norm, and rope joins paged attention, with
Before/Expected text; the numerics of the rope case are checked end to end in
tests/backends/test_cuda.py (paged attention needs a consistent KV pool, not random inputs)."""

import textwrap

from kiln.ir import parse, print_graph
from kiln.passes.manager import run_pipeline

ADD_NORM_BEFORE = """
    param @w : f32[8]
    func @main(%x: f32[T,8], %r: f32[T,8]) -> (f32[T,8], f32[T,8]) {
      %0 = core.add(%x, %r) : f32[T,8]
      %1 = llm.rms_norm(%0, @w) {eps=1e-05} : f32[T,8]
      %2 = core.mul(%0, %1) : f32[T,8]
      return %1, %2
    }
    """
ADD_NORM_EXPECTED = """
    param @w : f32[8]
    func @main(%x: f32[T,8], %r: f32[T,8]) -> (f32[T,8], f32[T,8]) {
      %3, %4 = llm.add_rms_norm(%x, %r, @w) {eps=1e-05} : (f32[T,8], f32[T,8])
      %2 = core.mul(%4, %3) : f32[T,8]
      return %3, %2
    }
    """


def test_residual_add_joins_the_norm(check_pass):
    check_pass(ADD_NORM_BEFORE, "fuse-for-kernels", ADD_NORM_EXPECTED, {"T": 5})


def test_add_read_before_the_norm_stays_apart(check_pass):
    before = ADD_NORM_BEFORE.replace(
        "%1 = llm.rms_norm(%0, @w) {eps=1e-05} : f32[T,8]\n      %2 = core.mul(%0, %1) : f32[T,8]",
        "%5 = core.neg(%0) : f32[T,8]\n      %1 = llm.rms_norm(%0, @w) {eps=1e-05} : f32[T,8]\n"
        "      %2 = core.mul(%5, %1) : f32[T,8]")
    check_pass(before, "fuse-for-kernels", before, {"T": 5})


ATTENTION = """
    param @inv_freq : f32[2]
    func @main(%tokens: i32[T], %positions: i32[T], %slot_mapping: i64[T], %block_tables: i32[B,MB], %context_lens: i32[B], %query_start: i32[B+1], %q: f32[1,T,2,4], %k: f32[1,T,1,4], %v: f32[T,1,4], %k_cache: f32[NB,16,1,4], %v_cache: f32[NB,16,1,4]) -> (f32[T,2,4]) {
      %0 = core.reshape(%positions) {shape=[1,T]} : i32[1,T]
      %1 = llm.rope(%q, %0, @inv_freq){rope} : f32[1,T,2,4]
      %2 = llm.rope(%k, %0, @inv_freq){rope} : f32[1,T,1,4]
      %3 = core.reshape(%1) {shape=[T,2,4]} : f32[T,2,4]
      %4 = core.reshape(%2) {shape=[T,1,4]} : f32[T,1,4]
      %5 = llm.paged_attention(%3, %4, %v, %k_cache, %v_cache, %slot_mapping, %block_tables, %context_lens, %query_start) {scale=0.5} : f32[T,2,4]
      return %5
    }
    """
ATTENTION_FUSED = """
    param @inv_freq : f32[2]
    func @main(%tokens: i32[T], %positions: i32[T], %slot_mapping: i64[T], %block_tables: i32[B,MB], %context_lens: i32[B], %query_start: i32[B+1], %q: f32[1,T,2,4], %k: f32[1,T,1,4], %v: f32[T,1,4], %k_cache: f32[NB,16,1,4], %v_cache: f32[NB,16,1,4]) -> (f32[T,2,4]) {
      %6 = core.reshape(%q) {shape=[T,2,4]} : f32[T,2,4]
      %7 = core.reshape(%k) {shape=[T,1,4]} : f32[T,1,4]
      %9 = llm.paged_attention(%6, %7, %v, %k_cache, %v_cache, %slot_mapping, %block_tables, %context_lens, %query_start, %positions, @inv_freq) {scale=0.5} : f32[T,2,4]
      return %9
    }
    """


def _ir(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def test_rope_joins_paged_attention():
    graph = parse(_ir(ATTENTION.replace("{rope}", "")))
    run_pipeline(graph, "fuse-for-kernels,canonicalize,dce")
    assert print_graph(graph) == _ir(ATTENTION_FUSED)


def test_rope_the_kernel_does_not_take_stays_apart():
    for attrs in (" {interleaved=true}", " {rotary_dim=2}"):
        text = _ir(ATTENTION.replace("{rope}", attrs).replace("@inv_freq : f32[2]", "@inv_freq : f32[2]"
                                                              if "interleaved" in attrs else "@inv_freq : f32[1]"))
        graph = parse(text)
        run_pipeline(graph, "fuse-for-kernels,canonicalize,dce")
        assert print_graph(graph) == text
