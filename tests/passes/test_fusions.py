"""Before/Expected text and numerics for the fusion passes: fuse-rms-norm, fuse-rope,
fuse-silu-mul and merge-linears, and the cases each must leave alone."""

import pytest
import torch

from kiln.ir import TensorStorage

CASES = {
    # normalised in f32, cast back, then scaled by the weight (Llama's spelling in bf16)
    "rms_norm_bf16": ("fuse-rms-norm", """
        param @w : bf16[8]
        func @main(%x: bf16[T,8]) -> (bf16[T,8]) {
          %0 = core.cast(%x) {dtype=f32} : f32[T,8]
          %1 = core.constant() {value=2.0, dtype=f32} : f32[]
          %2 = core.pow(%0, %1) : f32[T,8]
          %3 = core.mean(%2) {dims=[-1], keepdim=true} : f32[T,1]
          %4 = core.constant() {value=1e-05, dtype=f32} : f32[]
          %5 = core.add(%3, %4) : f32[T,1]
          %6 = core.rsqrt(%5) : f32[T,1]
          %7 = core.mul(%0, %6) : f32[T,8]
          %8 = core.cast(%7) {dtype=bf16} : bf16[T,8]
          %9 = core.mul(@w, %8) : bf16[T,8]
          return %9
        }
        """, """
        param @w : bf16[8]
        func @main(%x: bf16[T,8]) -> (bf16[T,8]) {
          %10 = llm.rms_norm(%x, @w) {eps=1e-05} : bf16[T,8]
          return %10
        }
        """),
    # q*cos + rotate_half(q)*sin, cos/sin from positions * inv_freq, heads in dim 1
    "rope_rotate_half": ("fuse-rope", """
        param @inv_freq : f32[4]
        func @main(%q: f32[1,2,T,8], %positions: i32[T]) -> (f32[1,2,T,8]) {
          %0 = core.reshape(%positions) {shape=[1,T,1]} : i32[1,T,1]
          %1 = core.cast(%0) {dtype=f32} : f32[1,T,1]
          %2 = core.mul(%1, @inv_freq) : f32[1,T,4]
          %3 = core.concat(%2, %2) {dim=2} : f32[1,T,8]
          %4 = core.cos(%3) : f32[1,T,8]
          %5 = core.sin(%3) : f32[1,T,8]
          %6 = core.reshape(%4) {shape=[1,1,T,8]} : f32[1,1,T,8]
          %7 = core.reshape(%5) {shape=[1,1,T,8]} : f32[1,1,T,8]
          %8 = core.mul(%q, %6) : f32[1,2,T,8]
          %9 = core.slice(%q) {dim=3, end=4} : f32[1,2,T,4]
          %10 = core.slice(%q) {dim=3, start=4} : f32[1,2,T,4]
          %11 = core.neg(%10) : f32[1,2,T,4]
          %12 = core.concat(%11, %9) {dim=3} : f32[1,2,T,8]
          %13 = core.mul(%12, %7) : f32[1,2,T,8]
          %14 = core.add(%8, %13) : f32[1,2,T,8]
          return %14
        }
        """, """
        param @inv_freq : f32[4]
        func @main(%q: f32[1,2,T,8], %positions: i32[T]) -> (f32[1,2,T,8]) {
          %15 = core.permute(%q) {dims=[0,2,1,3]} : f32[1,T,2,8]
          %16 = core.reshape(%positions) {shape=[1,T]} : i32[1,T]
          %17 = llm.rope(%15, %16, @inv_freq) : f32[1,T,2,8]
          %18 = core.permute(%17) {dims=[0,2,1,3]} : f32[1,2,T,8]
          return %18
        }
        """),
    # silu(gate) * up, in either operand order
    "silu_mul": ("fuse-silu-mul", """
        func @main(%g: f32[T,16], %u: f32[T,16]) -> (f32[T,16]) {
          %0 = core.silu(%g) : f32[T,16]
          %1 = core.mul(%u, %0) : f32[T,16]
          return %1
        }
        """, """
        func @main(%g: f32[T,16], %u: f32[T,16]) -> (f32[T,16]) {
          %2 = llm.silu_mul(%g, %u) : f32[T,16]
          return %2
        }
        """),
}



@pytest.mark.parametrize("name", CASES)
def test_fusion(check_pass, name):
    pipeline, before, expected = CASES[name]
    check_pass(before, pipeline, expected, {"T": 6})

LEFT_ALONE = {
    # the mean runs over the wrong axis: not an RMSNorm
    "rms_norm_other_axis": ("fuse-rms-norm", CASES["rms_norm_bf16"][1].replace("dims=[-1]", "dims=[0]")
                            .replace(": f32[T,1]", ": f32[1,8]")),
    # cos/sin of something other than positions * inv_freq: not rope
    "rope_without_positions": ("fuse-rope", CASES["rope_rotate_half"][1].replace(
        "%2 = core.mul(%1, @inv_freq) : f32[1,T,4]", "%2 = core.add(%1, @inv_freq) : f32[1,T,4]")),
    # silu(gate) * up where up broadcasts: the fused op takes two operands of one type
    "silu_mul_broadcast": ("fuse-silu-mul", CASES["silu_mul"][1].replace("%u: f32[T,16]", "%u: f32[16]")),
}


@pytest.mark.parametrize("name", LEFT_ALONE)
def test_fusion_leaves_other_spellings_alone(check_pass, name):
    pipeline, before = LEFT_ALONE[name]
    check_pass(before, pipeline, before, {"T": 6})


MERGE = """
    param @q.weight : f32[8,8]
    param @q.bias : f32[8]
    param @k.weight : f32[4,8]
    param @k.bias : f32[4]
    param @o.weight : f32[4,8]
    func @main(%x: f32[T,8]) -> (f32[T,8], f32[T,4], f32[T,4]) {
      %0 = llm.linear(%x, @q.weight, @q.bias) : f32[T,8]
      %1 = core.exp(%0) : f32[T,8]
      %2 = llm.linear(%x, @k.weight, @k.bias) : f32[T,4]
      %3 = llm.linear(%1, @o.weight) : f32[T,4]
      return %1, %2, %3
    }
    """


def test_merge_linears_concatenates_weights_and_biases_lazily(check_pass):
    g = torch.Generator().manual_seed(0)
    storages = {n: TensorStorage(torch.randn(*shape, generator=g)) for n, shape in
                {"q.weight": (8, 8), "q.bias": (8,), "k.weight": (4, 8), "k.bias": (4,), "o.weight": (4, 8)}.items()}
    after = check_pass(MERGE, "merge-linears,canonicalize,dce", """
        param @o.weight : f32[4,8]
        param @q.weight.concat : f32[12,8]
        param @q.bias.concat : f32[12]
        func @main(%x: f32[T,8]) -> (f32[T,8], f32[T,4], f32[T,4]) {
          %6 = llm.linear(%x, @q.weight.concat, @q.bias.concat) : f32[T,12]
          %7 = core.slice(%6) {dim=1, end=8} : f32[T,8]
          %9 = core.slice(%6) {dim=1, start=8} : f32[T,4]
          %1 = core.exp(%7) : f32[T,8]
          %3 = llm.linear(%1, @o.weight) : f32[T,4]
          return %1, %9, %3
        }
        """, {"T": 5}, storages)
    merged = after.params["q.weight.concat"].storage
    torch.testing.assert_close(merged.load(), torch.cat([storages["q.weight"].tensor, storages["k.weight"].tensor]))


def test_merge_linears_says_why_it_skips_mixed_biases(check_pass):
    import io

    from kiln.ir import parse
    from kiln.passes.manager import run_pipeline

    text = MERGE.replace("llm.linear(%x, @k.weight, @k.bias)", "llm.linear(%x, @k.weight)")
    out = io.StringIO()
    run_pipeline(parse(__import__("textwrap").dedent(text)), "merge-linears", print_after_all=True,
                 print_changed=True, stream=out)
    assert out.getvalue() == ("// merge-linears: no change\n"
                              "//   linears reading %x are not merged: some have a bias and some do not\n")


def test_a_fusion_that_cannot_apply_says_why():
    import io
    import textwrap

    from kiln.ir import parse
    from kiln.passes.manager import run_pipeline

    out = io.StringIO()
    run_pipeline(parse(textwrap.dedent(LEFT_ALONE["rms_norm_other_axis"][1]).lstrip()), "fuse-rms-norm",
                 print_after_all=True, print_changed=True, stream=out)
    assert out.getvalue() == ("// fuse-rms-norm: no change\n//   rule rms-norm: none of the 2 core.mul ops is the "
                              "root of its pattern (or its where= check failed)\n")


def test_rope_from_the_outer_product_spelling():
    """transformers' rotary modules before 5.2x: inv_freq[None, :, None] @ positions[:, None, :], transposed."""
    import textwrap

    from kiln.ir import parse
    from kiln.passes.manager import run_pipeline
    from kiln.testing import assert_same_function

    before = CASES["rope_rotate_half"][1].replace(
        "  %2 = core.mul(%1, @inv_freq) : f32[1,T,4]\n",
        "  %20 = core.reshape(@inv_freq) {shape=[1,4,1]} : f32[1,4,1]\n"
        "  %21 = core.reshape(%positions) {shape=[1,1,T]} : i32[1,1,T]\n"
        "  %23 = core.cast(%21) {dtype=f32} : f32[1,1,T]\n"
        "  %22 = core.matmul(%20, %23) : f32[1,4,T]\n"
        "  %2 = core.permute(%22) {dims=[0,2,1]} : f32[1,T,4]\n")
    graph = parse(textwrap.dedent(before).lstrip())
    original = graph.clone()
    run_pipeline(graph, "canonicalize,fuse-rope,canonicalize,dce")
    assert graph.op_counts().get("llm.rope") == 1 and "core.matmul" not in graph.op_counts()
    assert_same_function(original, graph, {"T": 6})
