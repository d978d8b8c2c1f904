"""fuse-attention: the eager and SDPA spellings become one llm.attention; grouped KV heads are
un-repeated; causal and sliding-window masks, bool or additive, become attributes; any other
mask stays, and the pass says why."""

import io
import textwrap

import pytest

from kiln.ir import parse
from kiln.passes.manager import run_pipeline

CAUSAL_ADDITIVE = """
  %10 = core.arange() {end=T} : i64[T]
  %11 = core.reshape(%10) {shape=[1,T]} : i64[1,T]
  %12 = core.reshape(%10) {shape=[T,1]} : i64[T,1]
  %13 = core.le(%11, %12) : bool[T,T]
  %14 = core.logical_not(%13) : bool[T,T]
  %15 = core.constant() {value=-3.4028234663852886e+38, dtype=f32} : f32[]
  %16 = core.constant() {value=0.0, dtype=f32, shape=[1,1,T,T]} : f32[1,1,T,T]
  %17 = core.where(%14, %15, %16) : f32[1,1,T,T]
"""

EAGER_GQA = """
func @main(%q: f32[1,4,T,8], %k: f32[1,2,T,8], %v: f32[1,2,T,8]) -> (f32[1,4,T,8]) {
  %0 = core.reshape(%k) {shape=[1,2,1,T,8]} : f32[1,2,1,T,8]
  %1 = core.expand(%0) {shape=[1,2,2,T,8]} : f32[1,2,2,T,8]
  %2 = core.reshape(%1) {shape=[1,4,T,8]} : f32[1,4,T,8]
  %3 = core.reshape(%v) {shape=[1,2,1,T,8]} : f32[1,2,1,T,8]
  %4 = core.expand(%3) {shape=[1,2,2,T,8]} : f32[1,2,2,T,8]
  %5 = core.reshape(%4) {shape=[1,4,T,8]} : f32[1,4,T,8]
  %6 = core.permute(%2) {dims=[0,1,3,2]} : f32[1,4,8,T]
  %7 = core.matmul(%q, %6) : f32[1,4,T,T]
  %8 = core.constant() {value=0.35, dtype=f32} : f32[]
  %9 = core.mul(%7, %8) : f32[1,4,T,T]""" + CAUSAL_ADDITIVE + """\
  %18 = core.add(%9, %17) : f32[1,4,T,T]
  %19 = core.softmax(%18) {dim=-1} : f32[1,4,T,T]
  %20 = core.matmul(%19, %5) : f32[1,4,T,8]
  return %20
}
"""

SDPA_WINDOW = """
func @main(%q: f32[1,4,T,8], %k: f32[1,4,T,8], %v: f32[1,4,T,8]) -> (f32[1,4,T,8]) {
  %0 = core.arange() {end=T} : i64[T]
  %1 = core.reshape(%0) {shape=[1,T]} : i64[1,T]
  %2 = core.reshape(%0) {shape=[T,1]} : i64[T,1]
  %3 = core.le(%1, %2) : bool[T,T]
  %4 = core.sub(%2, %1) : i64[T,T]
  %5 = core.constant() {value=3, dtype=i64} : i64[]
  %6 = core.lt(%4, %5) : bool[T,T]
  %7 = core.logical_and(%3, %6) : bool[T,T]
  %8 = core.reshape(%7) {shape=[1,1,T,T]} : bool[1,1,T,T]
  %9 = llm.attention(%q, %k, %v, %8) {scale=0.35} : f32[1,4,T,8]
  return %9
}
"""

NOT_CAUSAL = """
func @main(%q: f32[1,2,T,8], %k: f32[1,2,T,8], %v: f32[1,2,T,8], %keep: bool[1,1,T,T]) -> (f32[1,2,T,8]) {
  %0 = llm.attention(%q, %k, %v, %keep) {scale=0.35} : f32[1,2,T,8]
  return %0
}
"""


def test_eager_spelling_with_repeated_kv_heads_and_additive_causal_mask(check_pass):
    check_pass(EAGER_GQA, "fuse-attention,dce", """
        func @main(%q: f32[1,4,T,8], %k: f32[1,2,T,8], %v: f32[1,2,T,8]) -> (f32[1,4,T,8]) {
          %23 = llm.attention(%q, %k, %v) {causal=true, scale=0.35} : f32[1,4,T,8]
          return %23
        }
        """, {"T": 6})


def test_sliding_window_mask_becomes_window_attribute(check_pass):
    check_pass(SDPA_WINDOW, "fuse-attention,dce", """
        func @main(%q: f32[1,4,T,8], %k: f32[1,4,T,8], %v: f32[1,4,T,8]) -> (f32[1,4,T,8]) {
          %10 = llm.attention(%q, %k, %v) {causal=true, scale=0.35, window=3} : f32[1,4,T,8]
          return %10
        }
        """, {"T": 7})


def test_a_mask_that_is_not_causal_stays_and_the_pass_says_why(check_pass):
    check_pass(NOT_CAUSAL, "fuse-attention", NOT_CAUSAL, {"T": 5})
    out = io.StringIO()
    run_pipeline(parse(textwrap.dedent(NOT_CAUSAL).lstrip()), "fuse-attention", print_after_all=True,
                 print_changed=True, stream=out)
    assert out.getvalue() == ("// fuse-attention: no change\n//   llm.attention defining %0 keeps its mask "
                              "%keep: it is not a causal mask over T tokens\n")


@pytest.mark.parametrize("bad, why", [
    ("%3 = core.le(%1, %2) : bool[T,T]", "%3 = core.lt(%1, %2) : bool[T,T]"),   # strictly lower: not causal
])
def test_near_causal_masks_are_not_mistaken(check_pass, bad, why):
    text = SDPA_WINDOW.replace(bad, why)
    check_pass(text, "fuse-attention", text, {"T": 6})
