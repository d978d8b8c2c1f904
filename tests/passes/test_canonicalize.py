"""canonicalize: one Before/Expected pair per rule (and per case where a rule must not fire),
each also checked numerically on random inputs."""

import pytest

CASES = {
    "slice-open-end": ("""
        func @main(%x: f32[T,8]) -> (f32[T,6], f32[T,6]) {
          %0 = core.slice(%x) {dim=1, start=2, end=8} : f32[T,6]
          %1 = core.slice(%x) {dim=1, start=2, end=9223372036854775807} : f32[T,6]
          return %0, %1
        }
        """, """
        func @main(%x: f32[T,8]) -> (f32[T,6], f32[T,6]) {
          %2 = core.slice(%x) {dim=1, start=2} : f32[T,6]
          %3 = core.slice(%x) {dim=1, start=2} : f32[T,6]
          return %2, %3
        }
        """),
    "reshape-explicit": ("""
        func @main(%x: f32[T,8]) -> (f32[T,2,4]) {
          %0 = core.reshape(%x) {shape=[T,-1,4]} : f32[T,2,4]
          return %0
        }
        """, """
        func @main(%x: f32[T,8]) -> (f32[T,2,4]) {
          %1 = core.reshape(%x) {shape=[T,2,4]} : f32[T,2,4]
          return %1
        }
        """),
    # -- identities ---------------------------------------------------------------------------
    "add-zero": ("""
        func @main(%x: f32[T,4]) -> (f32[T,4], f32[T,4]) {
          %0 = core.constant() {value=0.0, dtype=f32} : f32[]
          %1 = core.add(%x, %0) : f32[T,4]
          %2 = core.add(%0, %x) : f32[T,4]
          return %1, %2
        }
        """, """
        func @main(%x: f32[T,4]) -> (f32[T,4], f32[T,4]) {
          return %x, %x
        }
        """),
    "add-zero-int": ("""
        func @main(%x: i32[4]) -> (i32[4]) {
          %0 = core.constant() {value=0, dtype=i32} : i32[]
          %1 = core.add(%x, %0) : i32[4]
          return %1
        }
        """, """
        func @main(%x: i32[4]) -> (i32[4]) {
          return %x
        }
        """),
    "sub-zero": ("""
        func @main(%x: f32[4]) -> (f32[4]) {
          %0 = core.constant() {value=0.0, dtype=f32} : f32[]
          %1 = core.sub(%x, %0) : f32[4]
          return %1
        }
        """, """
        func @main(%x: f32[4]) -> (f32[4]) {
          return %x
        }
        """),
    "zero-minus-x-stays": ("""
        func @main(%x: f32[4]) -> (f32[4]) {
          %0 = core.constant() {value=0.0, dtype=f32} : f32[]
          %1 = core.sub(%0, %x) : f32[4]
          return %1
        }
        """, """
        func @main(%x: f32[4]) -> (f32[4]) {
          %0 = core.constant() {value=0.0, dtype=f32} : f32[]
          %1 = core.sub(%0, %x) : f32[4]
          return %1
        }
        """),
    "mul-one": ("""
        func @main(%x: f32[4]) -> (f32[4], f32[4]) {
          %0 = core.constant() {value=1.0, dtype=f32} : f32[]
          %1 = core.mul(%x, %0) : f32[4]
          %2 = core.mul(%0, %1) : f32[4]
          return %1, %2
        }
        """, """
        func @main(%x: f32[4]) -> (f32[4], f32[4]) {
          return %x, %x
        }
        """),
    "mul-one-broadcast-stays": ("""
        func @main(%x: f32[4]) -> (f32[3,4]) {
          %0 = core.constant() {value=1.0, dtype=f32, shape=[3,1]} : f32[3,1]
          %1 = core.mul(%x, %0) : f32[3,4]
          return %1
        }
        """, """
        func @main(%x: f32[4]) -> (f32[3,4]) {
          %0 = core.constant() {value=1.0, dtype=f32, shape=[3,1]} : f32[3,1]
          %1 = core.mul(%x, %0) : f32[3,4]
          return %1
        }
        """),
    "mul-two-stays": ("""
        func @main(%x: f32[4]) -> (f32[4]) {
          %0 = core.constant() {value=2.0, dtype=f32} : f32[]
          %1 = core.mul(%x, %0) : f32[4]
          return %1
        }
        """, """
        func @main(%x: f32[4]) -> (f32[4]) {
          %0 = core.constant() {value=2.0, dtype=f32} : f32[]
          %1 = core.mul(%x, %0) : f32[4]
          return %1
        }
        """),
    "div-one": ("""
        func @main(%x: f32[4]) -> (f32[4]) {
          %0 = core.constant() {value=1.0, dtype=f32} : f32[]
          %1 = core.div(%x, %0) : f32[4]
          return %1
        }
        """, """
        func @main(%x: f32[4]) -> (f32[4]) {
          return %x
        }
        """),
    "one-over-x-stays": ("""
        func @main(%x: f32[4]) -> (f32[4]) {
          %0 = core.constant() {value=1.0, dtype=f32} : f32[]
          %1 = core.div(%0, %x) : f32[4]
          return %1
        }
        """, """
        func @main(%x: f32[4]) -> (f32[4]) {
          %0 = core.constant() {value=1.0, dtype=f32} : f32[]
          %1 = core.div(%0, %x) : f32[4]
          return %1
        }
        """),
    "pow-one": ("""
        func @main(%x: f32[4]) -> (f32[4]) {
          %0 = core.constant() {value=1.0, dtype=f32} : f32[]
          %1 = core.pow(%x, %0) : f32[4]
          return %1
        }
        """, """
        func @main(%x: f32[4]) -> (f32[4]) {
          return %x
        }
        """),
    "neg-neg": ("""
        func @main(%x: f32[4]) -> (f32[4], f32[4]) {
          %0 = core.neg(%x) : f32[4]
          %1 = core.neg(%0) : f32[4]
          %2 = core.neg(%1) : f32[4]
          return %1, %2
        }
        """, """
        func @main(%x: f32[4]) -> (f32[4], f32[4]) {
          %2 = core.neg(%x) : f32[4]
          return %x, %2
        }
        """),
    "cast-noop": ("""
        func @main(%x: bf16[4]) -> (bf16[4], f32[4]) {
          %0 = core.cast(%x) {dtype=bf16} : bf16[4]
          %1 = core.cast(%x) {dtype=f32} : f32[4]
          return %0, %1
        }
        """, """
        func @main(%x: bf16[4]) -> (bf16[4], f32[4]) {
          %1 = core.cast(%x) {dtype=f32} : f32[4]
          return %x, %1
        }
        """),
    "reshape-noop": ("""
        func @main(%x: f32[T,4]) -> (f32[T,4], f32[4,T]) {
          %0 = core.reshape(%x) {shape=[-1,4]} : f32[T,4]
          %1 = core.reshape(%x) {shape=[4,T]} : f32[4,T]
          return %0, %1
        }
        """, """
        func @main(%x: f32[T,4]) -> (f32[T,4], f32[4,T]) {
          %1 = core.reshape(%x) {shape=[4,T]} : f32[4,T]
          return %x, %1
        }
        """),
    "expand-noop": ("""
        func @main(%x: f32[T,4]) -> (f32[T,4], f32[2,T,4]) {
          %0 = core.expand(%x) {shape=[T,-1]} : f32[T,4]
          %1 = core.expand(%x) {shape=[2,T,4]} : f32[2,T,4]
          return %0, %1
        }
        """, """
        func @main(%x: f32[T,4]) -> (f32[T,4], f32[2,T,4]) {
          %1 = core.expand(%x) {shape=[2,T,4]} : f32[2,T,4]
          return %x, %1
        }
        """),
    "slice-noop": ("""
        func @main(%x: f32[4,8]) -> (f32[4,8], f32[4,8], f32[4,4]) {
          %0 = core.slice(%x) {dim=1} : f32[4,8]
          %1 = core.slice(%x) {dim=1, end=100} : f32[4,8]
          %2 = core.slice(%x) {dim=1, end=4} : f32[4,4]
          return %0, %1, %2
        }
        """, """
        func @main(%x: f32[4,8]) -> (f32[4,8], f32[4,8], f32[4,4]) {
          %2 = core.slice(%x) {dim=1, end=4} : f32[4,4]
          return %x, %x, %2
        }
        """),
    "permute-noop": ("""
        func @main(%x: f32[4,4]) -> (f32[4,4], f32[4,4]) {
          %0 = core.permute(%x) {dims=[0,1]} : f32[4,4]
          %1 = core.permute(%x) {dims=[1,0]} : f32[4,4]
          return %0, %1
        }
        """, """
        func @main(%x: f32[4,4]) -> (f32[4,4], f32[4,4]) {
          %1 = core.permute(%x) {dims=[1,0]} : f32[4,4]
          return %x, %1
        }
        """),
    "concat-single": ("""
        func @main(%x: f32[T,4]) -> (f32[T,4], f32[2*T,4]) {
          %0 = core.concat(%x) {dim=0} : f32[T,4]
          %1 = core.concat(%x, %x) {dim=0} : f32[2*T,4]
          return %0, %1
        }
        """, """
        func @main(%x: f32[T,4]) -> (f32[T,4], f32[2*T,4]) {
          %1 = core.concat(%x, %x) {dim=0} : f32[2*T,4]
          return %x, %1
        }
        """),
    "where-true-false-same": ("""
        func @main(%c: bool[4], %x: f32[4], %y: f32[4]) -> (f32[4], f32[4], f32[4], f32[4]) {
          %t = core.constant() {value=true, dtype=bool} : bool[]
          %f = core.constant() {value=false, dtype=bool} : bool[]
          %0 = core.where(%t, %x, %y) : f32[4]
          %1 = core.where(%f, %x, %y) : f32[4]
          %2 = core.where(%c, %x, %x) : f32[4]
          %3 = core.where(%c, %x, %y) : f32[4]
          return %0, %1, %2, %3
        }
        """, """
        func @main(%c: bool[4], %x: f32[4], %y: f32[4]) -> (f32[4], f32[4], f32[4], f32[4]) {
          %3 = core.where(%c, %x, %y) : f32[4]
          return %x, %y, %x, %3
        }
        """),
    "where-true-broadcast-stays": ("""
        func @main(%x: f32[4], %y: f32[3,4]) -> (f32[3,4]) {
          %t = core.constant() {value=true, dtype=bool} : bool[]
          %0 = core.where(%t, %x, %y) : f32[3,4]
          return %0
        }
        """, """
        func @main(%x: f32[4], %y: f32[3,4]) -> (f32[3,4]) {
          %t = core.constant() {value=true, dtype=bool} : bool[]
          %0 = core.where(%t, %x, %y) : f32[3,4]
          return %0
        }
        """),
    # -- structure ----------------------------------------------------------------------------
    "reshape-reshape": ("""
        func @main(%x: f32[T,8]) -> (f32[2*T,4], f32[T,8]) {
          %0 = core.reshape(%x) {shape=[T,2,4]} : f32[T,2,4]
          %1 = core.reshape(%0) {shape=[-1,4]} : f32[2*T,4]
          %2 = core.reshape(%0) {shape=[T,8]} : f32[T,8]
          return %1, %2
        }
        """, """
        func @main(%x: f32[T,8]) -> (f32[2*T,4], f32[T,8]) {
          %5 = core.reshape(%x) {shape=[2*T,4]} : f32[2*T,4]
          return %5, %x
        }
        """),
    "permute-permute": ("""
        func @main(%x: f32[2,3,4]) -> (f32[3,4,2], f32[2,3,4]) {
          %0 = core.permute(%x) {dims=[1,0,2]} : f32[3,2,4]
          %1 = core.permute(%0) {dims=[0,2,1]} : f32[3,4,2]
          %2 = core.permute(%0) {dims=[1,0,2]} : f32[2,3,4]
          return %1, %2
        }
        """, """
        func @main(%x: f32[2,3,4]) -> (f32[3,4,2], f32[2,3,4]) {
          %3 = core.permute(%x) {dims=[1,2,0]} : f32[3,4,2]
          return %3, %x
        }
        """),
    "cast-round-trip-widening": ("""
        func @main(%x: bf16[4], %i: i8[4]) -> (bf16[4], i8[4]) {
          %0 = core.cast(%x) {dtype=f32} : f32[4]
          %1 = core.cast(%0) {dtype=bf16} : bf16[4]
          %2 = core.cast(%i) {dtype=i32} : i32[4]
          %3 = core.cast(%2) {dtype=i8} : i8[4]
          return %1, %3
        }
        """, """
        func @main(%x: bf16[4], %i: i8[4]) -> (bf16[4], i8[4]) {
          return %x, %i
        }
        """),
    "cast-round-trip-narrowing-stays": ("""
        func @main(%x: f32[4], %i: i32[4]) -> (f32[4], i32[4]) {
          %0 = core.cast(%x) {dtype=bf16} : bf16[4]
          %1 = core.cast(%0) {dtype=f32} : f32[4]
          %2 = core.cast(%i) {dtype=f32} : f32[4]
          %3 = core.cast(%2) {dtype=i32} : i32[4]
          return %1, %3
        }
        """, """
        func @main(%x: f32[4], %i: i32[4]) -> (f32[4], i32[4]) {
          %0 = core.cast(%x) {dtype=bf16} : bf16[4]
          %1 = core.cast(%0) {dtype=f32} : f32[4]
          %2 = core.cast(%i) {dtype=f32} : f32[4]
          %3 = core.cast(%2) {dtype=i32} : i32[4]
          return %1, %3
        }
        """),
    "slice-slice": ("""
        func @main(%x: f32[4,16]) -> (f32[4,3]) {
          %0 = core.slice(%x) {dim=1, start=2} : f32[4,14]
          %1 = core.slice(%0) {dim=1, start=3, end=6} : f32[4,3]
          return %1
        }
        """, """
        func @main(%x: f32[4,16]) -> (f32[4,3]) {
          %2 = core.slice(%x) {dim=1, start=5, end=8} : f32[4,3]
          return %2
        }
        """),
    "slice-slice-symbolic-end": ("""
        func @main(%x: f32[T]) -> (f32[T-3]) {
          %0 = core.slice(%x) {dim=0, start=2} : f32[T-2]
          %1 = core.slice(%0) {dim=0, start=1, end=T-2} : f32[T-3]
          return %1
        }
        """, """
        func @main(%x: f32[T]) -> (f32[T-3]) {
          %3 = core.slice(%x) {dim=0, start=3} : f32[T-3]
          return %3
        }
        """),
    "slice-slice-negative-end-stays": ("""
        func @main(%x: f32[8]) -> (f32[4]) {
          %0 = core.slice(%x) {dim=0, start=2} : f32[6]
          %1 = core.slice(%0) {dim=0, start=1, end=-1} : f32[4]
          return %1
        }
        """, """
        func @main(%x: f32[8]) -> (f32[4]) {
          %0 = core.slice(%x) {dim=0, start=2} : f32[6]
          %1 = core.slice(%0) {dim=0, start=1, end=-1} : f32[4]
          return %1
        }
        """),
    "slice-slice-other-dims-stay": ("""
        func @main(%x: f32[4,8]) -> (f32[3,6]) {
          %0 = core.slice(%x) {dim=0, start=1} : f32[3,8]
          %1 = core.slice(%0) {dim=1, start=2} : f32[3,6]
          return %1
        }
        """, """
        func @main(%x: f32[4,8]) -> (f32[3,6]) {
          %0 = core.slice(%x) {dim=0, start=1} : f32[3,8]
          %1 = core.slice(%0) {dim=1, start=2} : f32[3,6]
          return %1
        }
        """),
    "constant-right": ("""
        func @main(%x: f32[4], %y: f32[4]) -> (f32[4], f32[4], f32[4]) {
          %0 = core.constant() {value=2.0, dtype=f32} : f32[]
          %1 = core.mul(%0, %x) : f32[4]
          %2 = core.maximum(%0, %x) : f32[4]
          %3 = core.sub(%0, %y) : f32[4]
          return %1, %2, %3
        }
        """, """
        func @main(%x: f32[4], %y: f32[4]) -> (f32[4], f32[4], f32[4]) {
          %0 = core.constant() {value=2.0, dtype=f32} : f32[]
          %4 = core.mul(%x, %0) : f32[4]
          %5 = core.maximum(%x, %0) : f32[4]
          %3 = core.sub(%0, %y) : f32[4]
          return %4, %5, %3
        }
        """),
    # -- folding, as part of canonicalize -----------------------------------------------------
    "fold-then-identity": ("""
        func @main(%x: f32[4]) -> (f32[4]) {
          %0 = core.constant() {value=3.0, dtype=f32} : f32[]
          %1 = core.constant() {value=2.0, dtype=f32} : f32[]
          %2 = core.sub(%0, %1) : f32[]
          %3 = core.mul(%x, %2) : f32[4]
          return %3
        }
        """, """
        func @main(%x: f32[4]) -> (f32[4]) {
          return %x
        }
        """),
}


@pytest.mark.parametrize("name", CASES)
def test_rule(check_pass, name):
    before, expected = CASES[name]
    check_pass(before, "canonicalize", expected, {"T": 5})


def test_fold_option_off_keeps_constant_arithmetic(check_pass):
    check_pass("""
        func @main(%x: f32[4]) -> (f32[4]) {
          %0 = core.constant() {value=3.0, dtype=f32} : f32[]
          %1 = core.neg(%0) : f32[]
          %2 = core.mul(%x, %1) : f32[4]
          return %2
        }
        """, "canonicalize{fold=false}", """
        func @main(%x: f32[4]) -> (f32[4]) {
          %0 = core.constant() {value=3.0, dtype=f32} : f32[]
          %1 = core.neg(%0) : f32[]
          %2 = core.mul(%x, %1) : f32[4]
          return %2
        }
        """)
    check_pass("""
        func @main(%x: f32[4]) -> (f32[4]) {
          %0 = core.constant() {value=3.0, dtype=f32} : f32[]
          %1 = core.neg(%0) : f32[]
          %2 = core.mul(%x, %1) : f32[4]
          return %2
        }
        """, "canonicalize", """
        func @main(%x: f32[4]) -> (f32[4]) {
          %3 = core.constant() {value=-3.0, dtype=f32} : f32[]
          %2 = core.mul(%x, %3) : f32[4]
          return %2
        }
        """)


def test_canonicalize_is_idempotent(check_pass):
    text = """
        func @main(%x: f32[T,8]) -> (f32[8,T]) {
          %0 = core.permute(%x) {dims=[1,0]} : f32[8,T]
          %1 = core.constant() {value=1.0, dtype=f32} : f32[]
          %2 = core.mul(%1, %0) : f32[8,T]
          return %2
        }
        """
    once = """
        func @main(%x: f32[T,8]) -> (f32[8,T]) {
          %0 = core.permute(%x) {dims=[1,0]} : f32[8,T]
          return %0
        }
        """
    check_pass(text, "canonicalize", once, {"T": 3})
    check_pass(once, "canonicalize", once, {"T": 3})
