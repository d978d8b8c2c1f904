"""Where a parameter's data lives. Storage is lazy: nothing is read until a backend asks, and
passes replace a parameter's storage (quantized, sharded, merged) by composing storages."""

from __future__ import annotations

import abc
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .types import DType, TensorType

_SAFETENSORS_DTYPES = {
    "F32": DType.f32, "F16": DType.f16, "BF16": DType.bf16, "F8_E4M3": DType.f8e4m3,
    "F8_E5M2": DType.f8e5m2, "I64": DType.i64, "I32": DType.i32, "I8": DType.i8, "U8": DType.u8,
    "BOOL": DType.bool,
}


class Storage(abc.ABC):
    """The data behind a parameter; `type` is known without reading the data."""

    type: TensorType

    @abc.abstractmethod
    def load(self) -> torch.Tensor:
        """The tensor, in the storage dtype of `type` (i4 packed in u8)."""

    def describe(self) -> str:
        """A one-line account of where the data comes from, for JSON output and error messages."""
        return type(self).__name__


@dataclass(eq=False)
class TensorStorage(Storage):
    """Data already in memory (constants made by passes, tensors handed in by the user)."""

    tensor: torch.Tensor
    type: TensorType = field(init=False)

    def __post_init__(self) -> None:
        self.type = TensorType(DType.from_torch(self.tensor.dtype), tuple(self.tensor.shape))

    def load(self) -> torch.Tensor:
        return self.tensor

    def describe(self) -> str:
        return f"tensor {self.type} in memory"


@dataclass(eq=False)
class SafetensorsStorage(Storage):
    """One tensor of a safetensors file, memory-mapped on load. Its type comes from the file's
    header (read here unless the caller, who read the header once for all tensors, passes it)."""

    path: str
    key: str
    type: TensorType = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.type is None:
            header = safetensors_header(self.path)
            if self.key not in header:
                raise KeyError(f"{self.path} has no tensor named {self.key!r}")
            self.type = header[self.key]

    def load(self) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.path, framework="pt") as f:
            return FILE_READS.count(f.get_tensor(self.key))

    def describe(self) -> str:
        return f"safetensors {os.path.basename(self.path)}:{self.key}"


@dataclass(eq=False)
class SafetensorsSliceStorage(Storage):
    """A box of one tensor of a safetensors file (`region`: [start, end) per dim): only those bytes
    are read, which is how a tensor-parallel rank loads its shard of a checkpoint."""

    path: str
    key: str
    region: tuple[tuple[int, int], ...]
    type: TensorType

    def load(self) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.path, framework="pt") as f:
            return FILE_READS.count(f.get_slice(self.key)[tuple(slice(a, b) for a, b in self.region)])

    def describe(self) -> str:
        box = ",".join(f"{a}:{b}" for a, b in self.region)
        return f"safetensors {os.path.basename(self.path)}:{self.key}[{box}]"


@dataclass
class FileReads:
    """What this process has read from weight files: a tensor-parallel rank must read only its
    shard, and tests and `kiln bench` measure that here."""

    bytes: int = 0
    tensors: int = 0

    def count(self, t: torch.Tensor) -> torch.Tensor:
        self.bytes += t.numel() * t.element_size()
        self.tensors += 1
        return t


FILE_READS = FileReads()


def safetensors_header(path: str) -> dict[str, TensorType]:
    """The type of every tensor in a safetensors file, from its header alone."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            out = {}
            for key in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                sl = f.get_slice(key)
                dtype = sl.get_dtype()
                if dtype not in _SAFETENSORS_DTYPES:
                    raise TypeError(f"{path}:{key} has dtype {dtype}, which kiln cannot hold")
                out[key] = TensorType(_SAFETENSORS_DTYPES[dtype], tuple(sl.get_shape()))
            return out
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}); is it truncated or "
                         f"still downloading?") from None


@dataclass(eq=False)
class DerivedStorage(Storage):
    """A parameter computed from others by an op's reference implementation, on first load:
    constant folding of a transpose or a concat of weights costs nothing until it is used."""

    op_name: str
    inputs: Sequence[Storage]
    attrs: Mapping[str, Any]
    type: TensorType
    result_index: int = 0

    def load(self) -> torch.Tensor:
        from .registry import get_op

        args = [s.load() for s in self.inputs]
        return get_op(self.op_name).run_reference(*args, **self.attrs)[self.result_index]

    def describe(self) -> str:
        return f"{self.op_name} of ({', '.join(s.describe() for s in self.inputs)})"


# -- slices: one rank's shard of a parameter, read lazily and no more than needed -----------------

@dataclass(eq=False)
class SlicedStorage(Storage):
    """Rows [start, end) of `dim` of another storage, for sources that cannot read a part alone
    (the whole source is loaded, then cut)."""

    source: Storage
    dim: int
    start: int
    end: int
    type: TensorType

    def load(self) -> torch.Tensor:
        return self.source.load().narrow(self.dim, self.start, self.end - self.start).contiguous()

    def describe(self) -> str:
        return f"[{self.start}:{self.end} of dim {self.dim}] of ({self.source.describe()})"


def _sliced_type(t: TensorType, dim: int, start: int, end: int) -> TensorType:
    size = t.shape[dim]
    if not (isinstance(size, int) and 0 <= start < end <= size):
        raise ValueError(f"cannot take [{start}:{end}] of dim {dim} of {t}")
    return t.with_shape([end - start if i == dim else d for i, d in enumerate(t.shape)])


@functools.singledispatch
def slice_storage(storage: Storage, dim: int, start: int, end: int) -> Storage:
    """Rows [start, end) of `dim`, in the coordinates of `storage.type` (i4 stays packed in u8
    where the storage holds it so); each kind of storage reads as little as it can."""
    t = _sliced_type(storage.type, dim, start, end)
    return storage if t == storage.type else SlicedStorage(storage, dim, start, end, t)


@slice_storage.register
def _(storage: TensorStorage, dim: int, start: int, end: int) -> Storage:
    t = _sliced_type(storage.type, dim, start, end)
    return storage if t == storage.type else TensorStorage(storage.tensor.narrow(dim, start, end - start))


def _slice_file(storage: SafetensorsStorage | SafetensorsSliceStorage, dim: int, start: int, end: int) -> Storage:
    t = _sliced_type(storage.type, dim, start, end)
    if t == storage.type:
        return storage
    region = getattr(storage, "region", None) or tuple((0, d) for d in storage.type.shape)
    base = region[dim][0]
    region = tuple((base + start, base + end) if i == dim else r for i, r in enumerate(region))
    return SafetensorsSliceStorage(storage.path, storage.key, region, t)


slice_storage.register(SafetensorsStorage, _slice_file)
slice_storage.register(SafetensorsSliceStorage, _slice_file)


@slice_storage.register
def _(storage: DerivedStorage, dim: int, start: int, end: int) -> Storage:
    t = _sliced_type(storage.type, dim, start, end)
    if t == storage.type:
        return storage
    if storage.op_name == "core.concat" and storage.result_index == 0:
        return _slice_concat(storage, dim, start, end, t)
    rule = row_rule(storage.op_name, storage.attrs, [s.type for s in storage.inputs], storage.type, dim)
    if rule is None or any(r is not None and (start % r[1] or end % r[1]) for r in rule):
        return SlicedStorage(storage, dim, start, end, t)
    inputs = [s if r is None else slice_storage(s, r[0], start // r[1], end // r[1])
              for s, r in zip(storage.inputs, rule)]
    return DerivedStorage(storage.op_name, inputs, storage.attrs, t, storage.result_index)


def _slice_concat(storage: DerivedStorage, dim: int, start: int, end: int, t: TensorType) -> Storage:
    axis = storage.attrs["dim"] % storage.type.rank
    if axis != dim:
        parts = [slice_storage(s, dim, start, end) for s in storage.inputs]
        return DerivedStorage("core.concat", parts, storage.attrs, t)
    parts, offset = [], 0
    for s in storage.inputs:
        size = s.type.shape[dim]
        lo, hi = max(start, offset), min(end, offset + size)
        if lo < hi:
            parts.append(slice_storage(s, dim, lo - offset, hi - offset))
        offset += size
    return parts[0] if len(parts) == 1 else DerivedStorage("core.concat", parts, storage.attrs, t)


def take(storage: Storage, dim: int, segments: Sequence[tuple[int, int]], pad: int = 0) -> Storage:
    """The `segments` ([start, end) ranges) of `dim`, in order, then `pad` rows of zeros: one
    rank's shard of a parameter, still lazy."""
    parts = [slice_storage(storage, dim, a, b) for a, b in segments]
    if pad:
        shape = [pad if i == dim else d for i, d in enumerate(storage.type.shape)]
        parts.append(TensorStorage(torch.zeros(shape, dtype=storage.type.dtype.torch)))
    if len(parts) == 1:
        return parts[0]
    size = sum(p.type.shape[dim] for p in parts)
    t = storage.type.with_shape([size if i == dim else d for i, d in enumerate(storage.type.shape)])
    return DerivedStorage("core.concat", parts, {"dim": dim}, t)


# -- which operand rows make which result rows ---------------------------------------------------

RowRule = list["tuple[int, int] | None"]
"""Per operand: None (the whole operand is used for any rows of the result), or (dim, divisor):
rows [start, end) of the result's dim need rows [start // divisor, end // divisor) of this dim."""


def _quant_rows(attrs: Mapping[str, Any], types: Sequence[TensorType], result: TensorType, dim: int) -> RowRule:
    axis, group = attrs.get("axis"), attrs.get("group_size")
    params: tuple[int, int] | None
    if axis is None:
        params = None                                   # one scale for the tensor: the same on every rank
    elif axis % result.rank != dim:
        params = (dim, 1) if group is not None else None  # grouped scales have every dim; per-channel ones only axis
    else:
        params = (0, 1) if group is None else (dim, group)
    return [(dim, 1), *[params] * (len(types) - 1)]


def _elementwise_rows(attrs: Mapping[str, Any], types: Sequence[TensorType], result: TensorType,
                      dim: int) -> RowRule:
    rule: RowRule = []
    for t in types:
        d = dim - (result.rank - t.rank)
        rule.append(None if d < 0 or t.shape[d] == 1 else (d, 1))
    return rule


def _leading_rows(attrs: Mapping[str, Any], types: Sequence[TensorType], result: TensorType,
                  dim: int) -> RowRule | None:
    """Ops over the last dim (norms, rope over head_dim): any other dim of x is independent."""
    return [(dim, 1), *[None] * (len(types) - 1)] if dim < result.rank - 1 else None


_ROW_RULES: dict[str, Callable[..., RowRule | None]] = {
    "quant.quantize": _quant_rows,
    "quant.dequantize": _quant_rows,
    "core.permute": lambda attrs, types, result, dim: [(attrs["dims"][dim] % result.rank, 1)],
    "llm.silu_mul": _elementwise_rows,
    "llm.rms_norm": _leading_rows,
    "llm.rope": lambda attrs, types, result, dim: None if dim == result.rank - 1 else [
        (dim, 1), (dim, 1) if dim < result.rank - 2 else None, None],   # positions are [*P] for x [*P, heads, D]
}


def row_rule(op_name: str, attrs: Mapping[str, Any], types: Sequence[TensorType], result: TensorType,
             dim: int) -> RowRule | None:
    """How rows of `dim` of an op's result come from rows of its operands, for ops that compute
    them independently (elementwise ops, quantize/dequantize, permute, norms and rope over other
    dims); None for the others."""
    from .registry import Trait, get_op

    rule = _ROW_RULES.get(op_name)
    if rule is None and get_op(op_name).has(Trait.ELEMENTWISE):
        rule = _elementwise_rows
    return None if rule is None else rule(attrs, types, result, dim)
