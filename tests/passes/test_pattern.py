"""The declarative rewrite API: patterns, rules, rule sets and the greedy driver."""

import textwrap

import pytest

from kiln.ir import parse, print_graph
from kiln.passes.pattern import (Attr, Const, OneOf, P, RewriteError, Rule, RuleSet, Var, apply_greedily,
                                 rule)
from kiln.testing import assert_same_function

x, y = Var("x"), Var("y")


def ir(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def rewrite(before: str, rules, expected: str, bindings=None, count=None) -> None:
    """Apply `rules` to the Before text; compare with the Expected text and numerically."""
    original = parse(ir(before))
    g = original.clone()
    n = apply_greedily(g, rules if isinstance(rules, RuleSet) else RuleSet(*rules))
    assert print_graph(g) == ir(expected)
    assert_same_function(original, g, bindings or {})
    if count is not None:
        assert n == count
    assert apply_greedily(g, rules) == 0, "the driver stopped before a fixed point"


def to_exp(m, b):
    return b.core.exp(m.x)


def square(m, b):
    return b.core.mul(m.x, m.x)


def test_var_binds_and_a_repeated_name_must_bind_the_same_value():
    # add(x, x) -> mul(x, 2) is only right when both operands are one value
    double = Rule("double", P("core.add", x, x), lambda m, b: b.core.mul(m.x, b.constant(2.0, "f32")))
    rewrite("""
        func @main(%a: f32[4], %b: f32[4]) -> (f32[4], f32[4]) {
          %0 = core.add(%a, %a) : f32[4]
          %1 = core.add(%a, %b) : f32[4]
          return %0, %1
        }
        """, [double], """
        func @main(%a: f32[4], %b: f32[4]) -> (f32[4], f32[4]) {
          %2 = core.constant() {value=2.0, dtype=f32} : f32[]
          %3 = core.mul(%a, %2) : f32[4]
          %1 = core.add(%a, %b) : f32[4]
          return %3, %1
        }
        """, count=1)


def test_var_where_narrows_the_value():
    abs_of_neg = Rule("abs-of-neg-input", P("core.abs", P("core.neg", Var("x", where=lambda v: v.is_input))),
                      lambda m, b: b.core.abs(m.x))
    rewrite("""
        func @main(%a: f32[4]) -> (f32[4]) {
          %0 = core.neg(%a) : f32[4]
          %1 = core.abs(%0) : f32[4]
          %2 = core.neg(%1) : f32[4]
          %3 = core.abs(%2) : f32[4]
          return %3
        }
        """, [abs_of_neg], """
        func @main(%a: f32[4]) -> (f32[4]) {
          %4 = core.abs(%a) : f32[4]
          %2 = core.neg(%4) : f32[4]
          %3 = core.abs(%2) : f32[4]
          return %3
        }
        """, count=1)


def test_attribute_equality_predicate_and_binding():
    text = """
        func @main(%a: f32[2,3,4]) -> (f32[3,2,4], f32[2,4,3], f32[4,3,2]) {
          %0 = core.permute(%a) {dims=[1,0,2]} : f32[3,2,4]
          %1 = core.permute(%a) {dims=[0,2,1]} : f32[2,4,3]
          %2 = core.permute(%a) {dims=[2,1,0]} : f32[4,3,2]
          return %0, %1, %2
        }
        """
    found: dict[str, list] = {"eq": [], "pred": [], "bind": []}
    rules = [
        Rule("eq", P("core.permute", x, attrs={"dims": (1, 0, 2)}), lambda m, b: found["eq"].append(m.root.name)),
        Rule("pred", P("core.permute", x, attrs={"dims": lambda d: d[0] == 0}),
             lambda m, b: found["pred"].append(m.root.name)),
        Rule("bind", P("core.permute", x, attrs={"dims": Attr("dims")}), lambda m, b: found["bind"].append(m.dims)),
    ]
    g = parse(ir(text))
    assert apply_greedily(g, rules) == 0       # every rewrite declined
    assert print_graph(g) == ir(text)
    # %0 matched "eq", so "pred" and "bind" were still tried on it (each declined in turn)
    assert found == {"eq": ["0"], "pred": ["1"], "bind": [(1, 0, 2), (0, 2, 1), (2, 1, 0)]}


def test_attribute_binding_is_non_linear_too():
    # the same Attr name on two ops: both must hold the same value
    r = Rule("slice-same-dim", P("core.slice", P("core.slice", x, attrs={"dim": Attr("d")}), attrs={"dim": Attr("d")}),
             lambda m, b: b.core.slice(m.x, dim=m.d, start=2))
    rewrite("""
        func @main(%a: f32[4,4]) -> (f32[2,4], f32[3,3]) {
          %0 = core.slice(%a) {dim=0, start=1} : f32[3,4]
          %1 = core.slice(%0) {dim=0, start=1} : f32[2,4]
          %2 = core.slice(%0) {dim=1, start=1} : f32[3,3]
          return %1, %2
        }
        """, [r], """
        func @main(%a: f32[4,4]) -> (f32[2,4], f32[3,3]) {
          %0 = core.slice(%a) {dim=0, start=1} : f32[3,4]
          %3 = core.slice(%a) {dim=0, start=2} : f32[2,4]
          %2 = core.slice(%0) {dim=1, start=1} : f32[3,3]
          return %3, %2
        }
        """, count=1)


def test_where_on_patterns_and_on_rules():
    two = Const(2.0, name="c")
    on_pattern = Rule("pow2", P("core.pow", x, two, where=lambda m: m.x.type.rank == 1), square)
    on_rule = Rule("pow2-2d", P("core.pow", x, two), square, where=lambda m: m.root.type.shape[0] == 3)
    rewrite("""
        func @main(%a: f32[4], %b: f32[3,4], %c: f32[2,4]) -> (f32[4], f32[3,4], f32[2,4]) {
          %0 = core.constant() {value=2.0, dtype=f32} : f32[]
          %1 = core.pow(%a, %0) : f32[4]
          %2 = core.pow(%b, %0) : f32[3,4]
          %3 = core.pow(%c, %0) : f32[2,4]
          return %1, %2, %3
        }
        """, [on_pattern, on_rule], """
        func @main(%a: f32[4], %b: f32[3,4], %c: f32[2,4]) -> (f32[4], f32[3,4], f32[2,4]) {
          %0 = core.constant() {value=2.0, dtype=f32} : f32[]
          %4 = core.mul(%a, %a) : f32[4]
          %5 = core.mul(%b, %b) : f32[3,4]
          %3 = core.pow(%c, %0) : f32[2,4]
          return %4, %5, %3
        }
        """, count=2)


def test_commutative_ops_match_in_both_orders_others_in_one():
    double = Const(2.0)
    rules = [Rule("mul2", P("core.mul", x, double), lambda m, b: b.core.add(m.x, m.x)),
             Rule("sub-from-2", P("core.sub", x, double), lambda m, b: b.core.neg(m.x))]
    rewrite("""
        func @main(%a: f32[4]) -> (f32[4], f32[4], f32[4]) {
          %0 = core.constant() {value=2.0, dtype=f32} : f32[]
          %1 = core.mul(%a, %0) : f32[4]
          %2 = core.mul(%0, %a) : f32[4]
          %3 = core.sub(%0, %a) : f32[4]
          return %1, %2, %3
        }
        """, rules, """
        func @main(%a: f32[4]) -> (f32[4], f32[4], f32[4]) {
          %0 = core.constant() {value=2.0, dtype=f32} : f32[]
          %4 = core.add(%a, %a) : f32[4]
          %5 = core.add(%a, %a) : f32[4]
          %3 = core.sub(%0, %a) : f32[4]
          return %4, %5, %3
        }
        """, count=2)


def test_oneof_and_op_name_tuples():
    r = Rule("exp-of-log", P("core.exp", OneOf(P("core.log", x), P("core.neg", P("core.neg", P("core.log", x))))),
             lambda m, b: m.x)
    r2 = Rule("abs-of-nonneg", P("core.abs", P(("core.exp", "core.relu"), name="nonneg")), lambda m, b: m.nonneg)
    rewrite("""
        func @main(%a: f32[4]) -> (f32[4], f32[4], f32[4], f32[4]) {
          %0 = core.abs(%a) : f32[4]
          %1 = core.log(%0) : f32[4]
          %2 = core.exp(%1) : f32[4]
          %3 = core.neg(%1) : f32[4]
          %4 = core.neg(%3) : f32[4]
          %5 = core.exp(%4) : f32[4]
          %6 = core.relu(%a) : f32[4]
          %7 = core.abs(%6) : f32[4]
          %8 = core.sin(%a) : f32[4]
          %9 = core.abs(%8) : f32[4]
          return %2, %5, %7, %9
        }
        """, [r, r2], """
        func @main(%a: f32[4]) -> (f32[4], f32[4], f32[4], f32[4]) {
          %0 = core.abs(%a) : f32[4]
          %6 = core.relu(%a) : f32[4]
          %8 = core.sin(%a) : f32[4]
          %9 = core.abs(%8) : f32[4]
          return %0, %0, %6, %9
        }
        """, count=3)


def test_one_use():
    r = Rule("fuse-neg-exp", P("core.exp", P("core.neg", x, one_use=True)),
             lambda m, b: b.core.reciprocal(b.core.exp(m.x)))
    rewrite("""
        func @main(%a: f32[4], %b: f32[4]) -> (f32[4], f32[4], f32[4]) {
          %0 = core.neg(%a) : f32[4]
          %1 = core.exp(%0) : f32[4]
          %2 = core.neg(%b) : f32[4]
          %3 = core.exp(%2) : f32[4]
          return %1, %3, %2
        }
        """, [r], """
        func @main(%a: f32[4], %b: f32[4]) -> (f32[4], f32[4], f32[4]) {
          %4 = core.exp(%a) : f32[4]
          %5 = core.reciprocal(%4) : f32[4]
          %2 = core.neg(%b) : f32[4]
          %3 = core.exp(%2) : f32[4]
          return %5, %3, %2
        }
        """, count=1)


def test_variadic_patterns_match_a_prefix_of_the_operands():
    seen = []
    probe = Rule("probe", P("core.concat", Var("first"), Var("second"), variadic=True),
                 lambda m, b: seen.append((m.first.name, m.second.name, len(m.root.op.operands))))
    g = parse(ir("""
        func @main(%a: f32[2], %b: f32[2]) -> (f32[6], f32[2]) {
          %0 = core.concat(%a, %b, %a) {dim=0} : f32[6]
          %1 = core.concat(%a) {dim=0} : f32[2]
          return %0, %1
        }
        """))
    assert apply_greedily(g, [probe]) == 0
    assert seen == [("a", "b", 3)]   # the one-operand concat is too short


def test_greedy_driver_reaches_a_fixed_point():
    # each rewrite makes the next negation pair: five negations become one
    rewrite("""
        func @main(%a: f32[4]) -> (f32[4], f32[4]) {
          %0 = core.neg(%a) : f32[4]
          %1 = core.neg(%0) : f32[4]
          %2 = core.neg(%1) : f32[4]
          %3 = core.neg(%2) : f32[4]
          %4 = core.neg(%3) : f32[4]
          return %3, %4
        }
        """, [Rule("neg-neg", P("core.neg", P("core.neg", x)), lambda m, b: m.x)], """
        func @main(%a: f32[4]) -> (f32[4], f32[4]) {
          %4 = core.neg(%a) : f32[4]
          return %a, %4
        }
        """, count=2)


def test_driver_revisits_ops_whose_operands_lost_a_use():
    # %0 has two uses, so fuse cannot fire on %1 until neg-neg has removed %2
    rules = [Rule("fuse", P("core.exp", P("core.neg", x, one_use=True)),
                  lambda m, b: b.core.reciprocal(b.core.exp(m.x))),
             Rule("neg-neg", P("core.neg", P("core.neg", x)), lambda m, b: m.x)]
    rewrite("""
        func @main(%a: f32[4]) -> (f32[4], f32[4]) {
          %0 = core.neg(%a) : f32[4]
          %1 = core.exp(%0) : f32[4]
          %2 = core.neg(%0) : f32[4]
          return %1, %2
        }
        """, rules, """
        func @main(%a: f32[4]) -> (f32[4], f32[4]) {
          %3 = core.exp(%a) : f32[4]
          %4 = core.reciprocal(%3) : f32[4]
          return %4, %a
        }
        """, count=2)


def test_rewrites_of_new_ops_chain_through_the_worklist():
    # sub(x, y) -> add(x, neg(y)); add(x, neg(y)) of the result is then matched by a second rule
    rules = [Rule("sub-to-add", P("core.sub", x, y), lambda m, b: b.core.add(m.x, b.core.neg(m.y))),
             Rule("add-neg-self", P("core.add", x, P("core.neg", x)),
                  lambda m, b: b.constant(0.0, "f32", m.root.type.shape))]
    rewrite("""
        func @main(%a: f32[4]) -> (f32[4]) {
          %0 = core.sub(%a, %a) : f32[4]
          return %0
        }
        """, rules, """
        func @main(%a: f32[4]) -> (f32[4]) {
          %3 = core.constant() {value=0.0, dtype=f32, shape=[4]} : f32[4]
          return %3
        }
        """, count=2)


def test_rule_sets_compose_and_reject_duplicate_names():
    a = Rule("a", P("core.exp", x), to_exp)
    b = Rule("b", P("core.neg", x), to_exp)
    c = Rule("c", P("core.exp", x), to_exp)
    s = RuleSet(a) + b + RuleSet(c)
    assert [r.name for r in s] == ["a", "b", "c"] and len(s) == 3
    assert s.for_op("core.exp") == (a, c) and s.for_op("core.neg") == (b,) and s.for_op("core.log") == ()
    with pytest.raises(ValueError, match="unique.*: a"):
        s + Rule("a", P("core.log", x), to_exp)
    with pytest.raises(ValueError, match="unique"):
        RuleSet(a, a)


def test_rule_decorator_names_the_rule_after_the_function():
    @rule(P("core.neg", P("core.neg", x)))
    def double_negation(m, b):
        return m.x

    assert isinstance(double_negation, Rule) and double_negation.name == "double-negation"


def test_a_rewrite_must_keep_the_type():
    bad = Rule("to-bf16", P("core.exp", x), lambda m, b: b.core.cast(m.x, dtype="bf16"))
    g = parse(ir("""
        func @main(%a: f32[4]) -> (f32[4]) {
          %0 = core.exp(%a) : f32[4]
          return %0
        }
        """))
    with pytest.raises(RewriteError, match=r"rule to-bf16 replaced %0: f32\[4\] with %1: bf16\[4\]"):
        apply_greedily(g, [bad])


def test_a_rewrite_must_give_one_value_per_result():
    bad = Rule("two", P("core.exp", x), lambda m, b: (m.x, m.x))
    g = parse(ir("""
        func @main(%a: f32[4]) -> (f32[4]) {
          %0 = core.exp(%a) : f32[4]
          return %0
        }
        """))
    with pytest.raises(RewriteError, match="rule two replaced 1 results of core.exp with 2"):
        apply_greedily(g, [bad])


def test_rules_that_undo_each_other_are_reported():
    minus_one = Const(-1.0)
    rules = [Rule("neg-to-mul", P("core.neg", x), lambda m, b: b.core.mul(m.x, b.constant(-1.0, "f32"))),
             Rule("mul-to-neg", P("core.mul", x, minus_one), lambda m, b: b.core.neg(m.x))]
    g = parse(ir("""
        func @main(%a: f32[4]) -> (f32[4]) {
          %0 = core.neg(%a) : f32[4]
          return %0
        }
        """))
    with pytest.raises(RewriteError, match="did not converge after 50 rewrites .*undo each other"):
        apply_greedily(g, rules, max_rewrites=50)


def test_a_declined_rewrite_leaves_the_graph_unchanged():
    def decline(m, b):
        b.core.exp(b.core.neg(m.x))   # builds ops, then changes its mind
        return None

    text = """
        func @main(%a: f32[4]) -> (f32[4]) {
          %0 = core.exp(%a) : f32[4]
          return %0
        }
        """
    rewrite(text, [Rule("decline", P("core.exp", x), decline)], text, count=0)


def test_patterns_check_op_names_and_rules_need_an_op_root():
    with pytest.raises(KeyError, match="unknown op 'core.tanspose'"):
        P("core.tanspose", x)
    with pytest.raises(KeyError, match="core.nope"):
        P(("core.exp", "core.nope"))
    with pytest.raises(TypeError, match="root of a pattern must be an op pattern"):
        Rule("bad", x, to_exp)
