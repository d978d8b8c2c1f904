"""The reference backend: running graphs, binding symbolic dims, parameters (safetensors, packed
i4, missing), the per-op result check, and freeing intermediates."""

import textwrap
import weakref

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from kiln.backends import reference
from kiln.backends.reference import ExecutionError
from kiln.ir import SafetensorsStorage, TensorStorage, define, parse
from kiln.ir.ops.infer import same_as_first
from kiln.ir.ops.quant import pack_i4
from kiln.ir.registry import _REGISTRY

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA device"))]


def ir(text: str):
    return parse(textwrap.dedent(text).lstrip("\n"))


def randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


MLP = """
    param @w : f32[8,4]
    param @norm : f32[4]
    func @main(%x: f32[T,4], %pos: i64[T]) -> (f32[T,8], f32[T,2,4], i64[T]) {
      %0 = llm.rms_norm(%x, @norm) {eps=1e-06} : f32[T,4]
      %1 = llm.linear(%0, @w) : f32[T,8]
      %2 = core.constant() {value=0.5, dtype=f32, shape=[T,8]} : f32[T,8]
      %3 = core.mul(%1, %2) : f32[T,8]
      %4 = core.reshape(%3) {shape=[T,2,4]} : f32[T,2,4]
      %5 = core.arange() {end=T} : i64[T]
      %6 = core.add(%pos, %5) : i64[T]
      return %3, %4, %6
    }
    """


@pytest.mark.parametrize("device", DEVICES)
def test_runs_a_graph_and_resolves_symbols_per_call(device):
    g = ir(MLP)
    w, norm = randn(8, 4, seed=1), randn(4, seed=2)
    exe = reference.compile(g, device=device, params={"w": w, "norm": norm})
    for t in (3, 5):   # one executable, two values of T
        x, pos = randn(t, 4, seed=t), torch.randint(0, 100, (t,))
        y, y3, p = exe(x, pos)
        assert y.device.type == y3.device.type == device
        want = 0.5 * F.linear(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm, w)
        torch.testing.assert_close(y.cpu(), want)
        torch.testing.assert_close(y3.cpu(), want.reshape(t, 2, 4))
        assert torch.equal(p.cpu(), pos + torch.arange(t))


def test_symbolic_dims_bind_from_inputs():
    g = ir("""
        func @main(%a: f32[T,4], %b: f32[2*T], %c: f32[B,T]) -> (f32[2*T]) {
          return %b
        }
        """)
    assert reference.bind_symbols(g, [randn(3, 4), randn(6), randn(2, 3)]) == {"T": 3, "B": 2}


@pytest.mark.parametrize("inputs, message", [
    ((randn(3, 4), randn(6)), r"@main takes 3 inputs \(%a, %b, %c\), got 2"),
    ((randn(3, 4), randn(6), [[1.0]]), r"input %c must be a torch.Tensor, got list"),
    ((randn(3, 4).half(), randn(6), randn(2, 3)), r"input %a must be f32 \(torch.float32\), got torch.float16"),
    ((randn(3, 4, 1), randn(6), randn(2, 3)), r"input %a: f32\[T,4\] has rank 2, got shape \(3, 4, 1\)"),
    ((randn(3, 5), randn(6), randn(2, 3)), r"input %a: dim 1 must be 4 for f32\[T,4\], got 5"),
    ((randn(3, 4), randn(6), randn(2, 4)), r"input %c: dim 1 is T=4, but another input set T=3"),
    ((randn(3, 4), randn(7), randn(2, 3)), r"input %b: dim 0 is 2\*T=6 here, got 7"),
])
def test_inputs_that_do_not_fit_the_signature(inputs, message):
    g = ir("""
        func @main(%a: f32[T,4], %b: f32[2*T], %c: f32[B,T]) -> (f32[2*T]) {
          %0 = core.neg(%b) : f32[2*T]
          return %0
        }
        """)
    with pytest.raises(ExecutionError, match=message):
        reference.run(g, *inputs)


def test_an_expression_dim_needs_its_symbols_bound_elsewhere():
    g = ir("""
        func @main(%b: f32[2*T]) -> (f32[2*T]) {
          return %b
        }
        """)
    with pytest.raises(ExecutionError, match=r"input %b: symbolic dimension '2\*T' needs a value for T"):
        reference.run(g, randn(6))


@pytest.fixture
def checkpoint(tmp_path):
    """A safetensors file with f32, bf16 and packed i4 tensors."""
    q = torch.randint(-8, 8, (4, 8), dtype=torch.int8, generator=torch.Generator().manual_seed(3))
    tensors = {"w": randn(8, 4, seed=4), "b": randn(8, seed=5).bfloat16(), "q": pack_i4(q),
               "s": randn(4, seed=6).abs() + 0.1}
    path = str(tmp_path / "model.safetensors")
    save_file(tensors, path)
    return path, {**tensors, "q": q}


@pytest.mark.parametrize("device", DEVICES)
def test_parameters_from_safetensors_load_once(checkpoint, device, monkeypatch):
    path, data = checkpoint
    g = ir("""
        param @w : f32[8,4]
        param @b : bf16[8]
        param @q : i4[4,8]
        param @s : f32[4]
        func @main(%x: f32[T,4], %y: f32[2,8]) -> (f32[T,8], f32[2,4], i32[4,8]) {
          %0 = core.cast(@b) {dtype=f32} : f32[8]
          %1 = llm.linear(%x, @w, %0) : f32[T,8]
          %2 = quant.dequantize(@q, @s) {axis=0} : f32[4,8]
          %3 = llm.linear(%y, %2) : f32[2,4]
          %4 = core.cast(@q) {dtype=i32} : i32[4,8]
          return %1, %3, %4
        }
        """)
    for name in g.params:
        g.params[name].storage = SafetensorsStorage(path, name)
    assert g.params["q"].storage.type.dtype.value == "u8"   # packed two per byte
    loads = []
    real_load = SafetensorsStorage.load
    monkeypatch.setattr(SafetensorsStorage, "load", lambda self: loads.append(self.key) or real_load(self))
    exe = reference.compile(g, device=device)
    for t in (2, 3):
        x, y = randn(t, 4, seed=t), randn(2, 8, seed=7)
        out1, out2, q = (o.cpu() for o in exe(x, y))
        torch.testing.assert_close(out1, F.linear(x, data["w"], data["b"].float()))
        torch.testing.assert_close(out2, F.linear(y, data["q"].float() * data["s"][:, None]))
        assert torch.equal(q, data["q"].int())
    assert sorted(loads) == ["b", "q", "s", "w"]


def test_missing_parameter_data_is_named():
    g = ir("""
        param @model.w : f32[4]
        func @main(%x: f32[4]) -> (f32[4]) {
          %0 = core.mul(%x, @model.w) : f32[4]
          return %0
        }
        """)
    with pytest.raises(ExecutionError, match=r"parameter @model.w has no data: .*params=\{'model.w': tensor\}"):
        reference.run(g, randn(4))
    with pytest.raises(ExecutionError, match=r"params names @model.v, which @main does not declare"):
        reference.compile(g, params={"model.v": randn(4)})
    w = randn(4, seed=1)
    torch.testing.assert_close(reference.run(g, x := randn(4), params={"model.w": w})[0], x * w)


def test_parameter_data_of_the_wrong_type_is_caught():
    g = ir("""
        param @w : f32[4]
        func @main(%x: f32[4]) -> (f32[4]) {
          %0 = core.mul(%x, @w) : f32[4]
          return %0
        }
        """)
    g.params["w"].storage = TensorStorage(randn(5))
    with pytest.raises(ExecutionError, match=r"parameter @w: result has shape \(5,\) but the IR says f32\[4\]"):
        reference.run(g, randn(4))


@pytest.fixture
def test_ops():
    """Ops whose references break their declared types, removed from the registry afterwards."""
    def wrong_shape(x):
        return x[:1]

    def wrong_dtype(x):
        return x.double()

    def fails(x):
        raise ValueError("no luck")

    names = {"testref.wrong_shape": wrong_shape, "testref.wrong_dtype": wrong_dtype, "testref.fails": fails}
    for name, fn in names.items():
        define(name, fn, same_as_first)
    yield
    for name in names:
        _REGISTRY.pop(name, None)


@pytest.mark.parametrize("op, message", [
    ("testref.wrong_shape", r"line 3: '%1 = testref.wrong_shape\(%0\) : f32\[T,4\]': result has shape \(1, 4\) "
                            r"but the IR says f32\[T,4\] = \(3, 4\)"),
    ("testref.wrong_dtype", r"line 3: '%1 = testref.wrong_dtype\(%0\) : f32\[T,4\]': result is torch.float64 "
                            r"but the IR says f32\[T,4\]"),
    ("testref.fails", r"line 3: '%1 = testref.fails\(%0\) : f32\[T,4\]': ValueError: no luck"),
])
def test_a_reference_that_breaks_its_type_is_caught(test_ops, op, message):
    g = ir(f"""
        func @main(%x: f32[T,4]) -> (f32[T,4]) {{
          %0 = core.exp(%x) : f32[T,4]
          %1 = {op}(%0) : f32[T,4]
          return %1
        }}
        """)
    with pytest.raises(ExecutionError, match=message):
        reference.run(g, randn(3, 4))
    if op != "testref.fails":
        assert reference.compile(g, check_types=False)(randn(3, 4))[0].shape[1] == 4


@pytest.fixture
def spy():
    """An identity op that records, when it runs, which earlier spy results are still alive."""
    refs, alive = [], []

    def record(x):
        alive.append([r() is not None for r in refs])
        y = x.clone()
        refs.append(weakref.ref(y))
        return y

    define("testref.spy", record, same_as_first)
    yield alive
    _REGISTRY.pop("testref.spy", None)


def test_intermediates_are_freed_after_their_last_use(spy):
    g = ir("""
        func @main(%x: f32[4]) -> (f32[4], f32[4]) {
          %0 = testref.spy(%x) : f32[4]
          %1 = core.exp(%0) : f32[4]
          %2 = testref.spy(%1) : f32[4]
          %3 = core.add(%2, %x) : f32[4]
          %4 = testref.spy(%3) : f32[4]
          %5 = core.mul(%4, %2) : f32[4]
          %6 = testref.spy(%5) : f32[4]
          return %6, %4
        }
        """)
    x = randn(4)
    out, mid = reference.run(g, x)
    # %0 dies after exp; %2 lives until mul; %4 is an output and stays
    assert spy == [[], [False], [False, True], [False, False, True]]
    torch.testing.assert_close(mid, x.exp() + x)
    torch.testing.assert_close(out, (x.exp() + x) * x.exp())


def test_outputs_may_be_inputs_parameters_or_values_used_again():
    g = ir("""
        param @w : f32[4]
        func @main(%x: f32[4]) -> (f32[4], f32[4], f32[4], f32[4]) {
          %0 = core.mul(%x, @w) : f32[4]
          %1 = core.add(%0, %x) : f32[4]
          return %x, @w, %0, %1
        }
        """)
    x, w = randn(4), randn(4, seed=1)
    outs = reference.run(g, x, params={"w": w})
    for got, want in zip(outs, [x, w, x * w, x * w + x]):
        torch.testing.assert_close(got, want)


def test_an_attribute_symbol_no_input_binds_is_an_execution_error():
    g = ir("""
        func @main(%x: f32[T]) -> (i64[N]) {
          %0 = core.arange() {end=N} : i64[N]
          return %0
        }
        """)
    with pytest.raises(ExecutionError, match=r"line 2: '%0 = core.arange\(\) \{end=N\} : i64\[N\]': "
                                             r"symbolic dimension 'N' needs a value for N"):
        reference.run(g, randn(3))
