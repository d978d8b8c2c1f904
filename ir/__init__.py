"""kiln's graph IR: typed SSA values, ops declared once in a registry, a text format that
round-trips exactly, a verifier, and builders for writing graphs in Python."""

from .builder import Builder
from .dot import to_dot
from .graph import Graph, Op, Value
from .json_format import from_json, to_json
from .parser import ParseError, parse, parse_type
from .printer import format_op, print_graph
from .registry import OpDef, OpError, Trait, define, get_op, op, registered_ops
from .storage import DerivedStorage, SafetensorsStorage, Storage, TensorStorage
from .types import (DType, Dim, TensorType, bf16, boolean, f8e4m3, f8e5m2, f16, f32, i4, i8, i32, i64,
                    u8)
from .verifier import Diagnostic, VerificationError, check, verify

__all__ = [
    "Builder", "to_dot", "Graph", "Op", "Value", "from_json", "to_json", "ParseError", "parse",
    "parse_type", "format_op", "print_graph", "OpDef", "OpError", "Trait", "define", "get_op", "op",
    "registered_ops", "DerivedStorage", "SafetensorsStorage", "Storage", "TensorStorage", "DType",
    "Dim", "TensorType", "bf16", "boolean", "f8e4m3", "f8e5m2", "f16", "f32", "i4", "i8", "i32",
    "i64", "u8", "Diagnostic", "VerificationError", "check", "verify",
]
