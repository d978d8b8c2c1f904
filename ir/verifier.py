"""Checks the invariants every pass must keep. Each diagnostic names the op, the value and the
line of the op in the printed graph, so that `irdump` output leads straight to it."""

from __future__ import annotations

from dataclasses import dataclass

from .graph import Graph, Op, Value
from .printer import format_op, op_line_numbers, return_line_number
from .registry import OpError
from .types import DType


@dataclass(frozen=True)
class Diagnostic:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


class VerificationError(ValueError):
    """A malformed graph; `diagnostics` lists every problem found, in line order."""

    def __init__(self, graph: Graph, diagnostics: list[Diagnostic]):
        self.diagnostics = diagnostics
        shown = "\n  ".join(map(str, diagnostics[:20]))
        more = f"\n  ... and {len(diagnostics) - 20} more" if len(diagnostics) > 20 else ""
        super().__init__(f"@{graph.name} is malformed ({len(diagnostics)} problem"
                         f"{'s' if len(diagnostics) != 1 else ''}):\n  {shown}{more}")


def verify(graph: Graph) -> None:
    """Raise VerificationError if the graph breaks an invariant; return quietly otherwise."""
    diagnostics = check(graph)
    if diagnostics:
        raise VerificationError(graph, diagnostics)


def check(graph: Graph) -> list[Diagnostic]:
    lines = op_line_numbers(graph)
    out: list[Diagnostic] = []
    defined: set[int] = set()
    names: dict[str, Value] = {}
    header = len(graph.params) + 1

    def define(v: Value, line: int) -> None:
        if id(v) in defined or v.name in names and names[v.name] is not v:
            out.append(Diagnostic(line, f"{v.ref} is defined more than once (SSA values are defined once)"))
        names[v.name] = v
        defined.add(id(v))

    for i, (name, p) in enumerate(graph.params.items()):
        if not p.is_param or p.name != name:
            out.append(Diagnostic(i + 1, f"parameter table entry @{name} holds {p.ref}"))
        if p.storage is not None:
            problem = _storage_mismatch(p)
            if problem:
                out.append(Diagnostic(i + 1, f"parameter {p.ref}: {problem}"))
        defined.add(id(p))
    for v in graph.inputs:
        define(v, header)

    later = {id(r): op for op in graph.ops for r in op.results}
    for op in graph.ops:
        line = lines[id(op)]
        where = f"in '{format_op(op)}'"
        for v in op.operands:
            if id(v) in defined:
                continue
            if id(v) in later:
                out.append(Diagnostic(line, f"{op.name} uses {v.ref} before its definition on line "
                                            f"{lines[id(later[id(v)])]} {where}"))
            elif v.is_param:
                out.append(Diagnostic(line, f"{op.name} uses parameter {v.ref}, which is not declared in the graph {where}"))
            else:
                out.append(Diagnostic(line, f"{op.name} uses {v.ref}, which no op or input of the graph defines "
                                            f"(a dangling value, left by an erased op?) {where}"))
        out.extend(Diagnostic(line, m) for m in _check_op(op, where))
        for r in op.results:
            if r.op is not op:
                out.append(Diagnostic(line, f"{r.ref} is listed as a result of {op.name} but belongs to another op"))
            define(r, line)

    ret = return_line_number(graph)
    for v in graph.outputs:
        if id(v) not in defined:
            out.append(Diagnostic(ret, f"return uses {v.ref}, which the graph does not define (dangling)"))
    return sorted(out, key=lambda d: d.line)


def _check_op(op: Op, where: str) -> list[str]:
    try:
        attrs = op.opdef.normalise_attrs(op.attrs)
    except OpError as e:
        return [f"{e} {where}"]
    if attrs != op.attrs or any(type(v) is not type(op.attrs[k]) for k, v in attrs.items()):
        return [f"{op.name} attributes are not normalised ({op.attrs} vs {attrs}) {where}"]
    try:
        types = op.opdef.infer_types([v.type for v in op.operands], op.attrs)
    except OpError as e:
        return [f"{e} {where}"]
    if len(types) != len(op.results):
        return [f"{op.name} infers {len(types)} results but has {len(op.results)} {where}"]
    return [f"{r.ref}: {op.name} infers {t} but the value has type {r.type} (stale type) {where}"
            for r, t in zip(op.results, types) if r.type != t]


def _storage_mismatch(p: Value) -> str | None:
    st = p.storage.type
    want = p.type
    if want.dtype is DType.i4:
        if st.dtype is DType.u8 and st.shape == want.storage_shape():
            return None
        if st.dtype is DType.i8 and st.shape == want.shape:
            return None
        return f"an i4 {want} needs u8[{','.join(map(str, want.storage_shape()))}] packed storage, found {st}"
    if st != want:
        return f"declared {want} but its storage holds {st} ({p.storage.describe()})"
    return None
