"""The built-in dialects; importing this package registers their ops."""

from . import core, dist, llm, quant  # noqa: F401
