"""Declarative rewrites: patterns, rules, rule sets and the greedy driver.

A pattern is a tree that matches the definition chain of a value:

    x = Var("x")
    rule = Rule("mul-one", P("core.mul", x, Const(1.0)), lambda m, b: m.x,
                where=lambda m: m.x.type == m.root.type)

- `Var(name)` matches any value and binds it; a name used twice must bind the same value.
- `P(op, *operands, attrs={...}, name=..., one_use=..., where=...)` matches a value defined by
  an op (a name, a tuple of names, or None for any op). Attribute constraints are values (equal),
  predicates (`lambda v: ...`) or `Attr("name")` to bind the attribute. Commutative ops are
  tried in both operand orders.
- `Const(value)` matches a `core.constant` (with that value, if given); `OneOf(p, q)` either.

A rule's rewrite gets the match and a Builder placed before the root op, and returns the
replacement value(s), or None to decline. `apply_greedily` applies a rule set until nothing
matches; rule sets compose with `+`.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from ..ir.builder import Builder
from ..ir.graph import Graph, Op, Value
from ..ir.registry import Trait, get_op


class Match:
    """Bindings of a successful match: `m.x` / `m["x"]`; `m.root` is the matched root value."""

    def __init__(self, graph: Graph, root: Value, bindings: Mapping[str, Any]):
        self.graph, self.root, self._b = graph, root, dict(bindings)

    def __getitem__(self, name: str) -> Any:
        try:
            return self._b[name]
        except KeyError:
            raise KeyError(f"pattern bound no {name!r}; it bound {', '.join(self._b) or 'nothing'}") from None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return self[name]

    def __contains__(self, name: str) -> bool:
        return name in self._b

    def op(self, name: str) -> Op:
        """The op whose result was bound to `name`."""
        v = self[name]
        if not isinstance(v, Value) or v.op is None:
            raise KeyError(f"{name!r} is not bound to an op result")
        return v.op


class Pattern:
    def match(self, graph: Graph, value: Value, bindings: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Yield every extension of `bindings` under which this pattern matches `value`."""
        raise TypeError(f"{type(self).__name__} must define match()")


def _bind(bindings: dict[str, Any], name: str | None, thing: Any) -> dict[str, Any] | None:
    if name is None:
        return bindings
    if name in bindings:
        same = bindings[name] is thing or (not isinstance(thing, Value) and bindings[name] == thing)
        return bindings if same else None
    return {**bindings, name: thing}


@dataclass(frozen=True)
class Var(Pattern):
    """Any value, bound to `name`; `where(value)` narrows it."""

    name: str | None = None
    where: Callable[[Value], bool] | None = None

    def match(self, graph, value, bindings):
        if self.where is None or self.where(value):
            b = _bind(bindings, self.name, value)
            if b is not None:
                yield b


@dataclass(frozen=True)
class Attr:
    """In an attribute constraint: bind the attribute's value to `name`."""

    name: str


@dataclass(frozen=True, init=False)
class P(Pattern):
    """A value defined by an op matching `op` whose operands match `operands`."""

    op: str | tuple[str, ...] | None
    operands: tuple[Pattern, ...]
    attrs: Mapping[str, Any]
    name: str | None
    one_use: bool
    where: Callable[[Match], bool] | None
    variadic: bool

    def __init__(self, op: str | Sequence[str] | None, *operands: Pattern, attrs: Mapping[str, Any] | None = None,
                 name: str | None = None, one_use: bool = False, where: Callable[[Match], bool] | None = None,
                 variadic: bool = False):
        names = (op,) if isinstance(op, str) else tuple(op) if op is not None else None
        for n in names or ():
            get_op(n)  # a typo in a pattern fails when the rule is written, not silently never matching
        object.__setattr__(self, "op", names)
        object.__setattr__(self, "operands", tuple(operands))
        object.__setattr__(self, "attrs", dict(attrs or {}))
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "one_use", one_use)
        object.__setattr__(self, "where", where)
        object.__setattr__(self, "variadic", variadic)

    def match(self, graph, value, bindings):
        if value.op is not None:
            yield from self.match_op(graph, value.op, bindings, value)

    def match_op(self, graph: Graph, op: Op, bindings: dict[str, Any], value: Value | None = None
                 ) -> Iterator[dict[str, Any]]:
        if self.op is not None and op.name not in self.op:
            return
        value = value if value is not None else op.results[0]
        if self.one_use and graph.num_uses(value) != 1:
            return
        b: dict[str, Any] | None = bindings
        for key, want in self.attrs.items():
            if key not in op.attrs:
                return
            have = op.attrs[key]
            if isinstance(want, Attr):
                b = _bind(b, want.name, have)
            elif callable(want) and not isinstance(want, (type, tuple)):
                b = b if want(have) else None
            else:
                b = b if have == want else None
            if b is None:
                return
        b = _bind(b, self.name, value)
        if b is None:
            return
        if not self.operands and not self.variadic:
            orders = [op.operands]
        elif self.variadic:
            orders = [op.operands] if len(op.operands) >= len(self.operands) else []
        elif len(op.operands) != len(self.operands):
            return
        elif op.opdef.has(Trait.COMMUTATIVE) and len(op.operands) == 2:
            orders = [op.operands, op.operands[::-1]]
        else:
            orders = [op.operands]
        for operands in orders:
            for m in _match_seq(graph, self.operands, operands, b):
                if self.where is None or self.where(Match(graph, value, m)):
                    yield m


def _match_seq(graph: Graph, patterns: Sequence[Pattern], values: Sequence[Value], b: dict[str, Any]
               ) -> Iterator[dict[str, Any]]:
    if not patterns:
        yield b
        return
    for b1 in patterns[0].match(graph, values[0], b):
        yield from _match_seq(graph, patterns[1:], values[1:], b1)


@dataclass(frozen=True)
class Const(Pattern):
    """A `core.constant` splat, with `value` if given (NaN matches NaN); binds the value."""

    value: float | int | bool | None = None
    name: str | None = None

    def match(self, graph, value, bindings):
        op = value.op
        if op is None or op.name != "core.constant":
            return
        have = op.attrs["value"]
        if self.value is not None and not (have == self.value or _both_nan(have, self.value)):
            return
        b = _bind(bindings, self.name, value)
        if b is not None:
            yield b


def _both_nan(a: Any, b: Any) -> bool:
    return isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)


@dataclass(frozen=True)
class OneOf(Pattern):
    """Any of several alternatives: each is tried in order, with backtracking into the rest of the pattern."""

    alternatives: tuple[Pattern, ...]

    def __init__(self, *alternatives: Pattern):
        object.__setattr__(self, "alternatives", alternatives)

    def match(self, graph, value, bindings):
        for alt in self.alternatives:
            yield from alt.match(graph, value, bindings)


# ---------------------------------------------------------------------------------------------

Rewrite = Callable[[Match, Builder], "Value | Sequence[Value] | None"]


@dataclass(frozen=True)
class Rule:
    """Replace the root of `pattern` with what `rewrite` returns, where `where` holds."""

    name: str
    pattern: P
    rewrite: Rewrite
    where: Callable[[Match], bool] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, P):
            raise TypeError(f"rule {self.name}: the root of a pattern must be an op pattern P(...)")

    def matches(self, graph: Graph, op: Op) -> Iterator[Match]:
        for b in self.pattern.match_op(graph, op, {}):
            m = Match(graph, op.results[0], b)
            if self.where is None or self.where(m):
                yield m


def rule(pattern: P, *, name: str | None = None, where: Callable[[Match], bool] | None = None):
    """Decorator: `@rule(P(...))` over a rewrite function makes a Rule named after the function."""
    def wrap(fn: Rewrite) -> Rule:
        return Rule(name or fn.__name__.replace("_", "-"), pattern, fn, where)
    return wrap


@dataclass(frozen=True)
class RuleSet:
    """An ordered collection of rules; `a + b` composes."""

    rules: tuple[Rule, ...] = ()
    _by_op: dict[str | None, tuple[Rule, ...]] = field(default_factory=dict, compare=False, repr=False)

    def __init__(self, *rules: Rule | "RuleSet"):
        flat: list[Rule] = []
        for r in rules:
            flat.extend(r.rules if isinstance(r, RuleSet) else [r])
        names = [r.name for r in flat]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"rule names must be unique in a rule set: {', '.join(sorted(dupes))}")
        object.__setattr__(self, "rules", tuple(flat))
        by_op: dict[str | None, list[Rule]] = {}
        for r in flat:
            for name in r.pattern.op or (None,):
                by_op.setdefault(name, []).append(r)
        object.__setattr__(self, "_by_op", {k: tuple(v) for k, v in by_op.items()})

    def __add__(self, other: "RuleSet | Rule") -> "RuleSet":
        return RuleSet(self, other)

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def for_op(self, name: str) -> tuple[Rule, ...]:
        specific = self._by_op.get(name, ())
        generic = self._by_op.get(None, ())
        return specific + generic if generic else specific


class RewriteError(RuntimeError):
    """A rule produced something that does not fit, or the rule set does not converge."""


def apply_greedily(graph: Graph, rules: RuleSet | Iterable[Rule], *, max_rewrites: int = 100_000,
                   explain: bool = False) -> int:
    """Apply rules until none matches; returns the number of rewrites. Ops left without uses by a
    rewrite are erased when pure, so matched chains disappear with their root. With `explain`, a
    rule that found candidate roots but never applied says so in a pass remark."""
    rules = rules if isinstance(rules, RuleSet) else RuleSet(*rules)
    worklist: deque[Op] = deque(graph.ops)
    alive = {id(op) for op in graph.ops}
    count = 0
    tried: dict[str, set[int]] = {}
    applied: set[str] = set()
    from .manager import _REMARKS, remark

    said = len(_REMARKS.get() or ())
    while worklist:
        op = worklist.popleft()
        if id(op) not in alive:
            continue
        for r in rules.for_op(op.name):
            tried.setdefault(r.name, set()).add(id(op))
            if _try_rule(graph, r, op, worklist, alive):
                applied.add(r.name)
                count += 1
                if count > max_rewrites:
                    raise RewriteError(f"rule set did not converge after {max_rewrites} rewrites "
                                       f"(last rule: {r.name}); two rules may undo each other")
                break
    if explain and len(_REMARKS.get() or ()) == said:  # a rule that explained itself needs no generic note
        for r in rules:
            if r.name not in applied and tried.get(r.name):
                roots = "/".join(r.pattern.op) if r.pattern.op else "candidate"
                remark(f"rule {r.name}: none of the {len(tried[r.name])} {roots} ops is the root of its pattern "
                       f"(or its where= check failed)")
    return count


def _try_rule(graph: Graph, r: Rule, op: Op, worklist: deque[Op], alive: set[int]) -> bool:
    for m in r.matches(graph, op):
        before = {id(o) for o in graph.ops}
        new = r.rewrite(m, Builder(graph, before=op, loc=op.loc))
        created = [o for o in graph.ops if id(o) not in before]
        if new is None:
            _erase_dead(graph, created, alive)
            continue
        new_values = (new,) if isinstance(new, Value) else tuple(new)
        if len(new_values) != len(op.results):
            raise RewriteError(f"rule {r.name} replaced {len(op.results)} results of {op.name} with {len(new_values)}")
        for old, nv in zip(op.results, new_values):
            if old.type != nv.type:
                raise RewriteError(f"rule {r.name} replaced {old.ref}: {old.type} with {nv.ref}: {nv.type}; "
                                   f"a rewrite must keep the type (add a where= check)")
        alive.update(id(o) for o in created)
        users = []
        for old, nv in zip(op.results, new_values):
            if old is not nv:
                users.extend(graph.users(old))
                graph.replace_all_uses(old, nv)
        worklist.extend(created)
        worklist.extend(u for u in users if id(u) in alive)
        for nv in new_values:
            if nv.op is not None and id(nv.op) in alive:
                worklist.append(nv.op)
        _erase_dead(graph, [op], alive, worklist, replaced=op)  # the root is replaced, side effects and all
        return True
    return False


def _erase_dead(graph: Graph, ops: Iterable[Op], alive: set[int], worklist: deque[Op] | None = None,
                replaced: Op | None = None) -> None:
    """Erase the pure ops among `ops` (and then their operands' ops) that have no uses. With a
    worklist, the other users and the definitions of their operands are revisited: a value
    that lost a use may now satisfy a `one_use` pattern."""
    stack = list(ops)
    while stack:
        op = stack.pop()
        if id(op) not in alive and op not in graph.ops:
            continue
        if (op.opdef.is_pure or op is replaced) and all(graph.num_uses(r) == 0 for r in op.results):
            graph.erase_op(op)
            alive.discard(id(op))
            stack.extend(v.op for v in op.operands if v.op is not None)
            if worklist is not None:
                worklist.extend(o for v in op.operands for o in (*graph.users(v), v.op)
                                if o is not None and id(o) in alive)
