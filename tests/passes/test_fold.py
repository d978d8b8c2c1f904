"""fold-constants: splats fold through elementwise ops and views; pure ops over parameters with
storage become new parameters computed lazily (DerivedStorage); symbolic results never fold."""

import pytest
import torch

from kiln.backends import reference
from kiln.ir import DerivedStorage, TensorStorage, parse
from kiln.ir.ops.quant import pack_i4
from kiln.passes.manager import run_pipeline


class CountingStorage(TensorStorage):
    """Tensor data that counts how often it is loaded."""

    loads = 0

    def load(self):
        self.loads += 1
        return super().load()


def test_splats_fold_through_elementwise_chains(check_pass):
    check_pass("""
        func @main(%x: f32[4]) -> (f32[4], bool[]) {
          %0 = core.constant() {value=3.0, dtype=f32} : f32[]
          %1 = core.constant() {value=0.75, dtype=f32} : f32[]
          %2 = core.mul(%0, %1) : f32[]
          %3 = core.sqrt(%2) : f32[]
          %4 = core.add(%x, %3) : f32[4]
          %5 = core.gt(%2, %1) : bool[]
          return %4, %5
        }
        """, "fold-constants", """
        func @main(%x: f32[4]) -> (f32[4], bool[]) {
          %7 = core.constant() {value=1.5, dtype=f32} : f32[]
          %4 = core.add(%x, %7) : f32[4]
          %8 = core.constant() {value=true, dtype=bool} : bool[]
          return %4, %8
        }
        """)


def test_splats_fold_through_views_and_casts(check_pass):
    check_pass("""
        func @main(%x: f32[T,2,4]) -> (f32[T,2,4]) {
          %0 = core.constant() {value=2.5, dtype=bf16, shape=[8]} : bf16[8]
          %1 = core.reshape(%0) {shape=[2,4]} : bf16[2,4]
          %2 = core.expand(%1) {shape=[T,2,4]} : bf16[T,2,4]
          %3 = core.cast(%2) {dtype=f32} : f32[T,2,4]
          %4 = core.mul(%x, %3) : f32[T,2,4]
          return %4
        }
        """, "fold-constants", """
        func @main(%x: f32[T,2,4]) -> (f32[T,2,4]) {
          %7 = core.constant() {value=2.5, dtype=f32, shape=[T,2,4]} : f32[T,2,4]
          %4 = core.mul(%x, %7) : f32[T,2,4]
          return %4
        }
        """, {"T": 3})


def test_ops_over_parameters_become_lazy_derived_parameters(check_pass):
    w, b1, b2 = CountingStorage(torch.randn(4, 6)), CountingStorage(torch.randn(2)), CountingStorage(torch.randn(4))
    after = check_pass("""
        param @w : f32[4,6]
        param @b1 : f32[2]
        param @b2 : f32[4]
        func @main(%x: f32[T,4]) -> (f32[T,6]) {
          %0 = core.permute(@w) {dims=[1,0]} : f32[6,4]
          %1 = core.concat(@b1, @b2) {dim=0} : f32[6]
          %2 = llm.linear(%x, %0, %1) : f32[T,6]
          return %2
        }
        """, "fold-constants,dce", """
        param @w.permute : f32[6,4]
        param @b1.concat : f32[6]
        func @main(%x: f32[T,4]) -> (f32[T,6]) {
          %2 = llm.linear(%x, @w.permute, @b1.concat) : f32[T,6]
          return %2
        }
        """, {"T": 3}, storages={"w": w, "b1": b1, "b2": b2})
    wt, bc = after.params["w.permute"].storage, after.params["b1.concat"].storage
    assert isinstance(wt, DerivedStorage) and wt.op_name == "core.permute" and wt.inputs == [w]
    torch.testing.assert_close(wt.load(), w.tensor.T)
    torch.testing.assert_close(bc.load(), torch.cat([b1.tensor, b2.tensor]))


def test_weights_are_not_folded_through_compute_or_when_shared(check_pass):
    """Folding dequantize or a cast would undo a quantization; folding a weight that is also
    used elsewhere would keep two copies of it."""
    q, s, w = (CountingStorage(torch.randint(-100, 100, (4, 6), dtype=torch.int8)),
               CountingStorage(torch.rand(4) + 0.1), CountingStorage(torch.randn(6, 4)))
    text = """
        param @q : i8[4,6]
        param @s : f32[4]
        param @w : f32[6,4]
        func @main(%x: f32[T,6]) -> (f32[T,4], f32[4,6]) {
          %0 = quant.dequantize(@q, @s) {axis=0} : f32[4,6]
          %1 = llm.linear(%x, %0) : f32[T,4]
          %2 = core.permute(@w) {dims=[1,0]} : f32[4,6]
          %3 = core.reshape(@w) {shape=[4,6]} : f32[4,6]
          %4 = core.add(%2, %3) : f32[4,6]
          return %1, %4
        }
        """
    check_pass(text, "fold-constants,dce", text, {"T": 3}, storages={"q": q, "s": s, "w": w})


def test_folding_reads_no_weights():
    w = CountingStorage(torch.randn(4, 4))
    g = parse("""param @w : f32[4,4]
func @main(%x: f32[4]) -> (f32[4,4]) {
  %0 = core.permute(@w) {dims=[1,0]} : f32[4,4]
  %1 = core.neg(%0) : f32[4,4]
  %2 = core.add(%1, %x) : f32[4,4]
  return %2
}
""")
    g.params["w"].storage = w
    run_pipeline(g, "fold-constants,dce")
    assert list(g.params) == ["w.permute"] and w.loads == 0
    assert [op.name for op in g.ops] == ["core.neg", "core.add"]
    x = torch.randn(4)
    exe = reference.compile(g)
    torch.testing.assert_close(exe(x)[0], -w.tensor.T + x)
    exe(x)
    assert w.loads == 1   # computed on first use, then kept by the executable


def test_derived_parameter_names_do_not_collide(check_pass):
    check_pass("""
        param @w : f32[8]
        param @w.slice : f32[4]
        func @main(%x: f32[4]) -> (f32[4], f32[4]) {
          %0 = core.slice(@w) {dim=0, end=4} : f32[4]
          %2 = core.add(%x, %0) : f32[4]
          %3 = core.add(%x, @w.slice) : f32[4]
          return %2, %3
        }
        """, "fold-constants,dce", """
        param @w.slice : f32[4]
        param @w.slice.1 : f32[4]
        func @main(%x: f32[4]) -> (f32[4], f32[4]) {
          %2 = core.add(%x, @w.slice.1) : f32[4]
          %3 = core.add(%x, @w.slice) : f32[4]
          return %2, %3
        }
        """, storages={"w": TensorStorage(torch.randn(8)), "w.slice": TensorStorage(torch.randn(4))})


@pytest.mark.parametrize("body, out", [
    # a symbolic result shape cannot become a parameter
    ("%0 = core.expand(@w) {shape=[T,4]} : f32[T,4]", "f32[T,4]"),
    ("""%c = core.constant() {value=2.0, dtype=f32, shape=[T,4]} : f32[T,4]
          %0 = core.mul(@w, %c) : f32[T,4]""", "f32[T,4]"),
    # side effects
    ("%0 = dist.all_reduce(@w) : f32[4]", "f32[4]"),
    # an operand that is neither a parameter with data nor a constant
    ("%0 = core.add(@w, @nodata) : f32[4]", "f32[4]"),
])
def test_what_does_not_fold(check_pass, body, out):
    text = f"""
        param @w : f32[4]
        param @nodata : f32[4]
        func @main(%x: f32[T]) -> ({out}) {{
          {body}
          return %0
        }}
        """
    check_pass(text, "fold-constants", text, {"T": 3}, storages={"w": TensorStorage(torch.randn(4))})


def test_packed_i4_parameters_are_not_folded(check_pass):
    # op references compute on unpacked i4 values; a DerivedStorage would hand them packed bytes
    q = torch.randint(-8, 8, (4, 8), dtype=torch.int8)
    text = """
        param @w : i4[4,8]
        param @s : f32[4]
        func @main(%x: f32[2,8]) -> (f32[2,4]) {
          %0 = quant.dequantize(@w, @s) {axis=0} : f32[4,8]
          %1 = llm.linear(%x, %0) : f32[2,4]
          return %1
        }
        """
    check_pass(text, "fold-constants", text,
               storages={"w": TensorStorage(pack_i4(q)), "s": TensorStorage(torch.rand(4) + 0.5)})
