"""Values, ops and graphs: a flat list of ops in topological order, in SSA form.

Every value is defined once: as a graph input (`%tokens`), a parameter (`@model.w`, whose data
is a lazily loaded `Storage`), or a result of an op (`%5`). Value names are stable across
passes, so a printed diff shows only what a pass touched. All mutation goes through `Graph`
methods so that the cached use lists stay right.
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any, Iterable, Iterator, Mapping, Sequence

from .registry import OpDef, get_op
from .storage import Storage
from .types import TensorType

SIMPLE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.]*\Z")


class Value:
    """An SSA value. `op` is the defining op (None for inputs and parameters)."""

    __slots__ = ("name", "type", "op", "index", "is_param", "storage", "__weakref__")

    def __init__(self, name: str, type: TensorType, op: "Op | None" = None, index: int = 0,
                 is_param: bool = False, storage: Storage | None = None):
        self.name = name
        self.type = type
        self.op = op
        self.index = index
        self.is_param = is_param
        self.storage = storage

    @property
    def is_input(self) -> bool:
        return self.op is None and not self.is_param

    @property
    def loc(self) -> str | None:
        """Where the value came from in the source model (an HF module path), if known."""
        return self.op.loc if self.op is not None else (self.name if self.is_param else None)

    @property
    def ref(self) -> str:
        """The value as it is written in the text format: `%name` or `@name`."""
        sigil = "@" if self.is_param else "%"
        return sigil + (self.name if SIMPLE_NAME.match(self.name) else '"' + _escape(self.name) + '"')

    def __repr__(self) -> str:
        return f"{self.ref}: {self.type}"


class Op:
    """One operation: an op declaration, operands, normalised attributes and result values."""

    __slots__ = ("opdef", "operands", "attrs", "results", "loc", "__weakref__")

    def __init__(self, opdef: OpDef, operands: Sequence[Value], attrs: Mapping[str, Any],
                 result_types: Sequence[TensorType], result_names: Sequence[str], loc: str | None = None):
        self.opdef = opdef
        self.operands: tuple[Value, ...] = tuple(operands)
        self.attrs: dict[str, Any] = dict(attrs)
        self.results: tuple[Value, ...] = tuple(
            Value(n, t, self, i) for i, (n, t) in enumerate(zip(result_names, result_types, strict=True)))
        self.loc = loc

    @property
    def name(self) -> str:
        return self.opdef.name

    @property
    def result(self) -> Value:
        """The single result of a one-result op."""
        if len(self.results) != 1:
            raise ValueError(f"{self.name} has {len(self.results)} results; use .results")
        return self.results[0]

    def __repr__(self) -> str:
        from .printer import format_op

        return format_op(self)


class Graph:
    """A function: inputs, parameters, ops in topological order, outputs."""

    def __init__(self, name: str = "main"):
        self.name = name
        self.inputs: list[Value] = []
        self.params: dict[str, Value] = {}
        self.ops: list[Op] = []
        self.outputs: list[Value] = []
        self._names: set[str] = set()
        self._counter = itertools.count()
        self._users: dict[Value, list[Op]] | None = None

    # -- definitions ----------------------------------------------------------------------------

    def fresh_name(self, hint: str | None = None) -> str:
        """A value name not yet used in this graph: the hint if free, else the next number."""
        if hint is not None and hint not in self._names:
            return hint
        while True:
            name = str(next(self._counter)) if hint is None else f"{hint}.{next(self._counter)}"
            if name not in self._names:
                return name

    def _claim(self, name: str) -> str:
        if name in self._names:
            raise ValueError(f"value name %{name} is already defined in @{self.name}")
        self._names.add(name)
        return name

    def add_input(self, name: str, type: TensorType) -> Value:
        v = Value(self._claim(name), type)
        self.inputs.append(v)
        self._invalidate()
        return v

    def add_param(self, name: str, type: TensorType | None = None, storage: Storage | None = None) -> Value:
        """Declare a parameter; its type comes from the storage when not given."""
        if name in self.params:
            raise ValueError(f"parameter @{name} is already declared")
        if type is None:
            if storage is None:
                raise ValueError(f"parameter @{name} needs a type or a storage")
            type = storage.type
        v = Value(name, type, is_param=True, storage=storage)
        self.params[name] = v
        self._invalidate()
        return v

    def create_op(self, name: str | OpDef, operands: Sequence[Value], attrs: Mapping[str, Any] | None = None,
                  *, loc: str | None = None, result_names: Sequence[str] | None = None,
                  index: int | None = None) -> Op:
        """Build an op (attributes checked, result types inferred) and insert it at `index`
        (default: the end)."""
        opdef = name if isinstance(name, OpDef) else get_op(name)
        attrs = opdef.normalise_attrs(attrs or {})
        types = opdef.infer_types([v.type for v in operands], attrs)
        if result_names is None:
            result_names = [self.fresh_name() for _ in types]
        names = [self._claim(n) for n in result_names]
        op = Op(opdef, operands, attrs, types, names, loc)
        self.ops.insert(len(self.ops) if index is None else index, op)
        self._invalidate()
        return op

    def set_outputs(self, values: Iterable[Value]) -> None:
        self.outputs = list(values)
        self._invalidate()

    # -- queries --------------------------------------------------------------------------------

    def values(self) -> Iterator[Value]:
        """Every defined value, in definition order: inputs, parameters, op results."""
        yield from self.inputs
        yield from self.params.values()
        for op in self.ops:
            yield from op.results

    def users(self, value: Value) -> list[Op]:
        """The ops that use `value` (once per use)."""
        if self._users is None:
            users: dict[Value, list[Op]] = {}
            for op in self.ops:
                for v in op.operands:
                    users.setdefault(v, []).append(op)
            self._users = users
        return self._users.get(value, [])

    def num_uses(self, value: Value) -> int:
        """Uses by ops plus uses as a graph output."""
        return len(self.users(value)) + sum(o is value for o in self.outputs)

    def index(self, op: Op) -> int:
        for i, o in enumerate(self.ops):
            if o is op:
                return i
        raise ValueError(f"{op.name} is not in @{self.name}")

    # -- mutation -------------------------------------------------------------------------------

    def set_operands(self, op: Op, operands: Sequence[Value]) -> None:
        op.operands = tuple(operands)
        self._invalidate()

    def replace_all_uses(self, old: Value, new: Value, *, after: Op | None = None) -> int:
        """Make every use of `old` (ops and outputs) use `new`; returns the number replaced."""
        n = 0
        for op in self.users(old):
            if op is after:
                continue
            op.operands = tuple(new if v is old else v for v in op.operands)
            n += 1
        for i, v in enumerate(self.outputs):
            if v is old:
                self.outputs[i] = new
                n += 1
        self._invalidate()
        return n

    def erase_op(self, op: Op) -> None:
        """Remove an op whose results are unused."""
        for r in op.results:
            if self.num_uses(r):
                raise ValueError(f"cannot erase {op.name} defining {r.ref}: it still has {self.num_uses(r)} uses")
        del self.ops[self.index(op)]
        self._invalidate()

    def remove_param(self, name: str) -> None:
        v = self.params[name]
        if self.num_uses(v):
            raise ValueError(f"cannot remove @{name}: it is still used")
        del self.params[name]
        self._invalidate()

    def _invalidate(self) -> None:
        self._users = None

    # -- conveniences ---------------------------------------------------------------------------

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for op in self.ops:
            counts[op.name] = counts.get(op.name, 0) + 1
        return dict(sorted(counts.items()))

    def clone(self) -> "Graph":
        """A structural copy (storages are shared, they are immutable)."""
        g = Graph(self.name)
        vmap: dict[Value, Value] = {}
        for v in self.inputs:
            vmap[v] = g.add_input(v.name, v.type)
        for name, v in self.params.items():
            vmap[v] = g.add_param(name, v.type, v.storage)
        for op in self.ops:
            new = g.create_op(op.opdef, [vmap[v] for v in op.operands], op.attrs, loc=op.loc,
                              result_names=[r.name for r in op.results])
            vmap.update(zip(op.results, new.results))
        g.set_outputs(vmap[v] for v in self.outputs)
        g._counter = itertools.count(_next_number(g._names))
        return g

    def __str__(self) -> str:
        from .printer import print_graph

        return print_graph(self)

    def __repr__(self) -> str:
        return f"<Graph @{self.name}: {len(self.inputs)} inputs, {len(self.params)} params, {len(self.ops)} ops>"


def _next_number(names: Iterable[str]) -> int:
    return 1 + max((int(n) for n in names if n.isdigit()), default=-1)


def _escape(s: str) -> str:
    """The body of a JSON string literal (the parser reads quoted names and locs with json.loads)."""
    return json.dumps(s, ensure_ascii=False)[1:-1]
