"""Calibration's X^T X (GPTQ's Hessian): kept only when asked, equal to the mean x x^T of the inputs
the graph computed, shared by the linears that read one input, scaled like the input by smoothing's
division, and kept through a calibration file."""

import textwrap

import torch
import torch.nn.functional as F
from kiln.ir import TensorStorage, parse
from kiln.passes.calibrate import (
    calibrate,
    describe,
    load_calibration,
    save_calibration,
)

GRAPH = textwrap.dedent("""
    param @emb : f32[16,8]
    param @up.weight : f32[12,8]
    param @gate.weight : f32[12,8]
    param @down.weight : f32[8,12]
    func @main(%tokens: i32[T]) -> (f32[T,8]) {
      %0 = llm.embedding(@emb, %tokens) : f32[T,8]
      %1 = llm.linear(%0, @up.weight) : f32[T,12]
      %2 = llm.linear(%0, @gate.weight) : f32[T,12]
      %3 = core.silu(%1) : f32[T,12]
      %4 = core.mul(%3, %2) : f32[T,12]
      %5 = llm.linear(%4, @down.weight) : f32[T,8]
      return %5
    }
    """).lstrip("\n")

WINDOWS = [torch.tensor([1, 2, 3]), torch.tensor([4, 5, 3, 9])]


def _graph():
    g = parse(GRAPH)
    gen = torch.Generator().manual_seed(0)
    for v in g.params.values():
        v.storage = TensorStorage(torch.randn(*v.type.shape, generator=gen))
    return g


def test_hessian_is_the_mean_outer_product_of_each_linear_input_and_only_kept_when_asked(tmp_path):
    g = _graph()
    emb, up, gate = (g.params[n].storage.load() for n in ("emb", "up.weight", "gate.weight"))
    assert all(s.gram is None for s in calibrate(g, WINDOWS, progress=False).values())
    calib = calibrate(g, WINDOWS, progress=False, hessian=True)
    x = emb[torch.cat(WINDOWS)]
    hidden = F.silu(F.linear(x, up)) * F.linear(x, gate)
    torch.testing.assert_close(calib["up.weight"].gram, x.t() @ x / len(x))
    torch.testing.assert_close(calib["down.weight"].gram, hidden.t() @ hidden / len(x))
    assert torch.equal(calib["gate.weight"].gram, calib["up.weight"].gram)   # one input, one X^T X
    assert "X^T X kept for 3 linear inputs" in describe(calib)
    s = torch.rand(8) + 0.5                          # what smooth / awq do to the input: x / s
    torch.testing.assert_close(calib["up.weight"].divided(s).gram, (x / s).t() @ (x / s) / len(x))
    save_calibration(calib, tmp_path / "calib.safetensors")
    loaded = load_calibration(tmp_path / "calib.safetensors")
    assert loaded.keys() == calib.keys() and all(torch.equal(loaded[n].gram, calib[n].gram) for n in calib)
