"""Writing graphs in Python. Ops are called by their dotted names, with operands positionally and
attributes as keywords; result types are inferred at once, so a mistake fails on its own line:

    b = Builder()
    x = b.input("x", f32["T", 576])
    w = b.param("w", f32[576], storage=TensorStorage(torch.ones(576)))
    y = b.llm.rms_norm(x, w, eps=1e-5)
    g = b.build(y)

The same builder inserts before an op of an existing graph, which is how rewrites create ops.
"""

from __future__ import annotations

from typing import Any

from .graph import Graph, Op, Value
from .registry import OpDef, get_op, registered_ops
from .storage import Storage
from .types import DType, Dim, TensorType


class Builder:
    def __init__(self, graph: Graph | None = None, *, name: str = "main", before: Op | None = None,
                 loc: str | None = None):
        self.graph = graph if graph is not None else Graph(name)
        self.before = before
        self.loc = loc

    # -- definitions ----------------------------------------------------------------------------

    def input(self, name: str, type: TensorType) -> Value:
        return self.graph.add_input(name, type)

    def param(self, name: str, type: TensorType | None = None, storage: Storage | None = None) -> Value:
        return self.graph.add_param(name, type, storage)

    def create(self, name: str | OpDef, *operands: Value, loc: str | None = None, **attrs: Any) -> Op:
        """Create an op at the insertion point and return it (for ops with several results)."""
        for i, v in enumerate(operands):
            if not isinstance(v, Value):
                opname = name if isinstance(name, str) else name.name
                raise TypeError(f"{opname}: operand {i} is {type(v).__name__}, not a Value "
                                f"(make constants with b.constant(...))")
        index = None if self.before is None else self.graph.index(self.before)
        return self.graph.create_op(name, operands, attrs, loc=loc or self.loc, index=index)

    def op(self, name: str | OpDef, *operands: Value, loc: str | None = None, **attrs: Any) -> Value | tuple[Value, ...]:
        """Create an op; returns its result (or a tuple of results)."""
        op = self.create(name, *operands, loc=loc, **attrs)
        return op.results[0] if len(op.results) == 1 else op.results

    def constant(self, value: float | int | bool, dtype: DType | str, shape: tuple[Dim, ...] = ()) -> Value:
        return self.op("core.constant", value=value, dtype=dtype, shape=shape)  # type: ignore[return-value]

    def build(self, *outputs: Value, verify: bool = True) -> Graph:
        """Set the outputs (if given) and return the verified graph."""
        if outputs:
            self.graph.set_outputs(outputs)
        if verify:
            from .verifier import verify as _verify

            _verify(self.graph)
        return self.graph

    # -- `b.core.add(x, y)` ---------------------------------------------------------------------

    def __getattr__(self, dialect: str) -> "_Dialect":
        if dialect.startswith("_"):
            raise AttributeError(dialect)
        if not any(n.startswith(dialect + ".") for n in registered_ops()):
            raise AttributeError(f"no dialect {dialect!r}; known: "
                                 f"{', '.join(sorted({n.split('.')[0] for n in registered_ops()}))}")
        return _Dialect(self, dialect)


class _Dialect:
    def __init__(self, builder: Builder, dialect: str):
        self._builder, self._dialect = builder, dialect

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            opdef = get_op(f"{self._dialect}.{name}")
        except KeyError as e:  # getattr/hasattr expect AttributeError
            raise AttributeError(e.args[0]) from None

        def call(*operands: Value, loc: str | None = None, **attrs: Any):
            return self._builder.op(opdef, *operands, loc=loc, **attrs)

        call.__doc__ = opdef.doc
        call.__name__ = name
        return call
