"""Element types, symbolic dims and tensor types."""

import pytest
import torch

from kiln.ir import DType, TensorType, bf16, boolean, f32, i4, i32, u8
from kiln.ir.types import (canonical_dim, dim_add, dim_div, dim_mul, dim_product, dim_sub, dim_symbols,
                           eval_dim)


@pytest.mark.parametrize("dtype, torch_dtype, bits", [
    (DType.f32, torch.float32, 32), (DType.f16, torch.float16, 16), (DType.bf16, torch.bfloat16, 16),
    (DType.f8e4m3, torch.float8_e4m3fn, 8), (DType.f8e5m2, torch.float8_e5m2, 8),
    (DType.i64, torch.int64, 64), (DType.i32, torch.int32, 32), (DType.i8, torch.int8, 8),
    (DType.u8, torch.uint8, 8), (DType.bool, torch.bool, 8),
])
def test_dtype_torch_mapping_round_trips(dtype, torch_dtype, bits):
    assert dtype.torch is torch_dtype
    assert DType.from_torch(torch_dtype) is dtype
    assert dtype.bits == bits
    assert DType.parse(str(dtype)) is dtype


def test_i4_is_held_unpacked_in_int8_and_int8_maps_back_to_i8():
    assert DType.i4.bits == 4 and DType.i4.torch is torch.int8
    assert DType.from_torch(torch.int8) is DType.i8
    assert DType.i4.is_int and not DType.i4.is_float
    assert DType.bf16.is_float and not DType.bool.is_int and not DType.bool.is_float


def test_dtype_errors_name_the_bad_type():
    with pytest.raises(ValueError, match=r"unknown dtype 'f33'.*bf16"):
        DType.parse("f33")
    with pytest.raises(TypeError, match="complex64"):
        DType.from_torch(torch.complex64)


@pytest.mark.parametrize("text, canonical", [
    ("T", "T"), ("T*2", "2*T"), ("2 * T", "2*T"), ("T+T", "2*T"), ("S*B", "B*S"), ("T-T", 0), ("4", 4), (7, 7),
])
def test_canonical_dim(text, canonical):
    assert canonical_dim(text) == canonical


@pytest.mark.parametrize("bad", ["f32", "none", "x y", "", "-3", "1.5", -1])
def test_malformed_or_reserved_dims_are_rejected(bad):
    with pytest.raises(ValueError):
        canonical_dim(bad)


def test_bool_is_not_a_dim():
    with pytest.raises(TypeError):
        canonical_dim(True)


def test_dim_arithmetic():
    assert dim_add("T", "T") == "2*T"
    assert dim_add("T", 1) == "T+1"
    assert dim_add(3, 4) == 7
    assert dim_sub("T+1", 1) == "T"
    assert dim_mul("T", 2) == "2*T"
    assert dim_mul("T", "S") == "S*T"
    assert dim_product(["B", "T", 4]) == "4*B*T"
    assert dim_div("2*T", 2) == "T"
    assert dim_div("4*B*T", "B") == "4*T"
    assert dim_div(12, 4) == 3
    assert dim_symbols("2*T+S") == {"S", "T"} and dim_symbols(3) == set()


@pytest.mark.parametrize("a, b", [(7, 2), ("T", 2), ("2*T", 4), ("T+1", 2), (6, "T"), (4, 0)])
def test_non_divisible_dims_raise(a, b):
    with pytest.raises(ValueError, match="not divisible"):
        dim_div(a, b)


def test_eval_dim_with_bindings():
    assert eval_dim(5, {}) == 5
    assert eval_dim("T", {"T": 7}) == 7
    assert eval_dim("2*T+S", {"T": 3, "S": 4}) == 10
    assert f32["B", "2*T"].concrete({"B": 2, "T": 5}) == (2, 10)
    assert f32["B", "2*T"].numel({"B": 2, "T": 5}) == 20


def test_eval_dim_names_the_missing_symbol():
    with pytest.raises(KeyError, match="needs a value for S"):
        eval_dim("S*T", {"T": 3})


def test_tensor_type_printing_and_factory():
    t = f32["T", 8]
    assert t == TensorType(DType.f32, ("T", 8)) == TensorType("f32", ["T", 8])
    assert str(t) == "f32[T,8]" and t.rank == 2 and not t.is_static and t.symbols == {"T"}
    assert str(bf16[4]) == "bf16[4]" and bf16[4].is_static
    assert str(f32.scalar()) == "f32[]" and f32.scalar().rank == 0
    assert str(f32["T*2", 3]) == "f32[2*T,3]"
    assert str(boolean[1]) == "bool[1]"
    assert hash(f32["T", 8]) == hash(f32["T", 8]) and f32["T", 8] != f32["T", 9]
    assert t.with_dtype(DType.bf16) == bf16["T", 8] and t.with_shape([2]) == f32[2]


def test_i4_storage_shape_halves_the_last_dim():
    assert i4[16, 128].storage_shape() == (16, 64)
    assert i4["T", "2*K"].storage_shape() == ("T", "K")
    assert i4[4, 6].nbytes() == 12 and f32[4, 6].nbytes() == 96 and u8[3].nbytes() == 3
    assert i32[4, 6].storage_shape() == (4, 6)
    with pytest.raises(ValueError, match="not divisible"):
        i4[4, 7].storage_shape()
    with pytest.raises(ValueError, match="scalar"):
        i4.scalar().storage_shape()
