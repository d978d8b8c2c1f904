"""kiln: a compiler and runtime for large language models."""

__version__ = "0.1.0"

from .ir import Builder, DType, Graph, TensorType, parse, print_graph, verify  # noqa: E402

__all__ = ["__version__", "Builder", "DType", "Graph", "TensorType", "parse", "print_graph", "verify"]
