"""The reference backend: the IR's interpreter (registry reference implementations in torch),
on CPU or GPU. It is the CPU default and the oracle every other backend is checked against."""

from ..ir.interpreter import ExecutionError, ReferenceExecutable, bind_symbols, compile, load_param, run

__all__ = ["ExecutionError", "ReferenceExecutable", "bind_symbols", "compile", "load_param", "run"]
