"""Where a parameter's data lives. Storage is lazy: nothing is read until a backend asks, and
passes replace a parameter's storage (quantized, sharded, merged) by composing storages."""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

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
            return f.get_tensor(self.key)

    def describe(self) -> str:
        return f"safetensors {os.path.basename(self.path)}:{self.key}"


def safetensors_header(path: str) -> dict[str, TensorType]:
    """The type of every tensor in a safetensors file, from its header alone."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            out = {}
            for key in f.keys():
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
