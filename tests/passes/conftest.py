"""Shared helper of the pass tests: run a pipeline on IR text, compare the printed result with
the expected text, and check numerically that the graph still computes the same function."""

import textwrap
from types import SimpleNamespace

import pytest
import torch

from kiln.ir import TensorStorage, parse, print_graph
from kiln.passes.manager import run_pipeline
from kiln.testing import assert_same_function


def ir(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


@pytest.fixture
def check_pass():
    def check(before: str, pipeline: str, expected: str, bindings=None, storages=None):
        original = parse(ir(before))
        for name, storage in (storages or {}).items():
            original.params[name].storage = storage
        after = original.clone()
        run_pipeline(after, pipeline)
        assert print_graph(after) == ir(expected)
        assert_same_function(original, after, bindings or {})
        return after
    return check


# -- a fused decoder layer for the quantization passes' tests ------------------------------------------

LAYER = textwrap.dedent("""
    param @emb : f32[32,8]
    param @ln1.weight : f32[8]
    param @qkv.weight : f32[16,8]
    param @o.weight : f32[8,8]
    param @ln2.weight : f32[8]
    param @gate_up.weight : f32[24,8]
    param @down.weight : f32[8,12]
    func @main(%tokens: i32[T]) -> (f32[1,T,8]) {
      %0 = llm.embedding(@emb, %tokens) : f32[T,8]
      %1 = core.reshape(%0) {shape=[1,T,8]} : f32[1,T,8]
      %2 = llm.rms_norm(%1, @ln1.weight) {eps=1e-05} : f32[1,T,8]
      %3 = llm.linear(%2, @qkv.weight) : f32[1,T,16]
      %4 = core.slice(%3) {dim=2, end=8} : f32[1,T,8]
      %5 = core.slice(%3) {dim=2, start=8, end=12} : f32[1,T,4]
      %6 = core.slice(%3) {dim=2, start=12} : f32[1,T,4]
      %7 = core.reshape(%4) {shape=[1,T,2,4]} : f32[1,T,2,4]
      %8 = core.permute(%7) {dims=[0,2,1,3]} : f32[1,2,T,4]
      %9 = core.reshape(%5) {shape=[1,T,1,4]} : f32[1,T,1,4]
      %10 = core.permute(%9) {dims=[0,2,1,3]} : f32[1,1,T,4]
      %11 = core.reshape(%6) {shape=[1,T,1,4]} : f32[1,T,1,4]
      %12 = core.permute(%11) {dims=[0,2,1,3]} : f32[1,1,T,4]
      %13 = llm.attention(%8, %10, %12) {causal=true} : f32[1,2,T,4]
      %14 = core.permute(%13) {dims=[0,2,1,3]} : f32[1,T,2,4]
      %15 = core.reshape(%14) {shape=[1,T,8]} : f32[1,T,8]
      %16 = llm.linear(%15, @o.weight) : f32[1,T,8]
      %17 = core.add(%1, %16) : f32[1,T,8]
      %18 = llm.rms_norm(%17, @ln2.weight) {eps=1e-05} : f32[1,T,8]
      %19 = llm.linear(%18, @gate_up.weight) : f32[1,T,24]
      %20 = core.slice(%19) {dim=2, end=12} : f32[1,T,12]
      %21 = core.slice(%19) {dim=2, start=12} : f32[1,T,12]
      %22 = llm.silu_mul(%20, %21) : f32[1,T,12]
      %23 = llm.linear(%22, @down.weight) : f32[1,T,8]
      %24 = core.add(%17, %23) : f32[1,T,8]
      return %24
    }
    """).lstrip()


def _layer_graph(seed: int = 0, outlier: float = 1.0):
    """The layer with random weights; `outlier` scales embedding channel 3 (an activation outlier)."""
    g = parse(LAYER)
    gen = torch.Generator().manual_seed(seed)
    for v in g.params.values():
        v.storage = TensorStorage(torch.randn(*v.type.shape, generator=gen))
    emb = g.params["emb"].storage.tensor
    emb[:, 3] *= outlier
    g.params["ln1.weight"].storage.tensor[3] = 4.0 * outlier
    return g


def _layer_windows(n: int = 4, length: int = 12, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 32, (length,), generator=gen) for _ in range(n)]


@pytest.fixture
def decoder_layer():
    """A decoder layer in the fused form the quantization passes meet (merged q/k/v and gate/up,
    grouped-query attention, 2 query heads per kv head): its text, graph(seed, outlier) with random
    weights (`outlier` scales embedding channel 3, an activation outlier), and windows(n, length, seed)
    of token ids."""
    return SimpleNamespace(text=LAYER, graph=_layer_graph, windows=_layer_windows)
