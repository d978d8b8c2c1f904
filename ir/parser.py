"""Reads the text format back into a Graph. Every error names the line and column; result types
written in the text are re-inferred and compared, which catches stale shapes in edited IR."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from .graph import Graph, Value
from .registry import OpError, get_op
from .types import DTYPE_NAMES, DType, Dim, TensorType, canonical_dim


class ParseError(ValueError):
    """Malformed IR text; `line` and `col` are 1-based."""

    def __init__(self, message: str, line: int, col: int, source: str | None = None):
        self.line, self.col, self.bare = line, col, message
        where = f"{source}:" if source else ""
        super().__init__(f"{where}{line}:{col}: {message}")


@dataclass(frozen=True)
class Token:
    kind: str   # VALUE PARAM STRING NUMBER IDENT ARROW PUNCT EOF
    text: str
    line: int
    col: int


_JSON_STRING = r'"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*"'  # what json.loads reads back
_NAME = rf'(?:[A-Za-z0-9_][A-Za-z0-9_.]*|{_JSON_STRING})'
_TOKEN_RE = re.compile("|".join(f"(?P<{k}>{p})" for k, p in [
    ("COMMENT", r"//[^\n]*"),
    ("NEWLINE", r"\n"),
    ("SPACE", r"[ \t\r]+"),
    ("ARROW", r"->"),
    ("VALUE", "%" + _NAME),
    ("PARAM", "@" + _NAME),
    ("STRING", _JSON_STRING),
    ("NUMBER", r"-?(?:\d+\.\d*(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+|\d+|inf\b)"),
    ("IDENT", r"[A-Za-z_][A-Za-z0-9_.]*"),
    ("PUNCT", r"[()\[\]{},:=*+/-]"),
]))


def tokenize(text: str, source: str | None = None) -> list[Token]:
    tokens, line, line_start, pos = [], 1, 0, 0
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            message = (f"unexpected character {text[pos]!r}" if '"' not in text[pos:pos + 2] else
                       "malformed string (quotes, backslashes and control characters need JSON escapes)")
            raise ParseError(message, line, pos - line_start + 1, source)
        kind = m.lastgroup
        if kind == "NEWLINE":
            line, line_start = line + 1, m.end()
        elif kind not in ("SPACE", "COMMENT"):
            tokens.append(Token(kind, m.group(), line, m.start() - line_start + 1))
        pos = m.end()
    tokens.append(Token("EOF", "", line, pos - line_start + 1))
    return tokens


def _unquote_name(text: str) -> str:
    body = text[1:]
    return json.loads(body) if body.startswith('"') else body


class _Parser:
    def __init__(self, text: str, source: str | None):
        self.source = source
        self.tokens = tokenize(text, source)
        self.pos = 0

    # -- token helpers ------------------------------------------------------------------------

    @property
    def tok(self) -> Token:
        return self.tokens[self.pos]

    def error(self, message: str, tok: Token | None = None) -> ParseError:
        tok = tok or self.tok
        return ParseError(message, tok.line, tok.col, self.source)

    def advance(self) -> Token:
        tok = self.tok
        self.pos += 1
        return tok

    def at(self, kind: str, text: str | None = None) -> bool:
        return self.tok.kind == kind and (text is None or self.tok.text == text)

    def accept(self, kind: str, text: str | None = None) -> Token | None:
        return self.advance() if self.at(kind, text) else None

    def expect(self, kind: str, text: str | None = None, what: str | None = None) -> Token:
        if not self.at(kind, text):
            want = what or (repr(text) if text else kind.lower())
            found = repr(self.tok.text) if self.tok.kind != "EOF" else "end of input"
            raise self.error(f"expected {want}, found {found}")
        return self.advance()

    # -- grammar ------------------------------------------------------------------------------

    def parse_graph(self) -> Graph:
        params: list[tuple[Token, TensorType]] = []
        while self.at("IDENT", "param"):
            self.advance()
            name = self.expect("PARAM", what="a parameter name (@name)")
            self.expect("PUNCT", ":")
            params.append((name, self.parse_type()))
        self.expect("IDENT", "func", what="'param' or 'func'")
        graph = Graph(_unquote_name(self.expect("PARAM", what="a function name (@main)").text))
        env: dict[str, Value] = {}
        for tok, t in params:
            name = _unquote_name(tok.text)
            if name in graph.params:
                raise self.error(f"parameter @{name} is declared twice", tok)
            graph.add_param(name, t)
        self.expect("PUNCT", "(")
        while not self.at("PUNCT", ")"):
            tok = self.expect("VALUE", what="an argument (%name: type)")
            self.expect("PUNCT", ":")
            name = _unquote_name(tok.text)
            if name in env:
                raise self.error(f"%{name} is defined twice", tok)
            env[name] = graph.add_input(name, self.parse_type())
            if not self.accept("PUNCT", ","):
                break
        self.expect("PUNCT", ")")
        self.expect("ARROW", what="'->'")
        self.expect("PUNCT", "(")
        out_types = []
        while not self.at("PUNCT", ")"):
            out_types.append((self.tok, self.parse_type()))
            if not self.accept("PUNCT", ","):
                break
        self.expect("PUNCT", ")")
        self.expect("PUNCT", "{")
        while not self.at("IDENT", "return"):
            if self.at("EOF") or self.at("PUNCT", "}"):
                raise self.error("expected an op or 'return' before the end of the function")
            self.parse_op(graph, env)
        ret = self.advance()
        outputs = []
        if not self.at("PUNCT", "}"):
            outputs.append(self.parse_operand(graph, env))
            while self.accept("PUNCT", ","):
                outputs.append(self.parse_operand(graph, env))
        if len(outputs) != len(out_types):
            raise self.error(f"return gives {len(outputs)} values but the signature declares {len(out_types)}", ret)
        for v, (tok, t) in zip(outputs, out_types):
            if v.type != t:
                raise self.error(f"result {v.ref} has type {v.type} but the signature declares {t}", tok)
        graph.set_outputs(outputs)
        self.expect("PUNCT", "}")
        self.expect("EOF", what="end of input after the function")
        return graph

    def parse_op(self, graph: Graph, env: dict[str, Value]) -> None:
        start = self.tok
        result_toks = [self.expect("VALUE", what="a result (%name) or 'return'")]
        while self.accept("PUNCT", ","):
            result_toks.append(self.expect("VALUE"))
        self.expect("PUNCT", "=")
        name_tok = self.expect("IDENT", what="an op name")
        try:
            opdef = get_op(name_tok.text)
        except KeyError as e:
            raise self.error(str(e.args[0]), name_tok) from None
        self.expect("PUNCT", "(")
        operands = []
        if not self.at("PUNCT", ")"):
            operands.append(self.parse_operand(graph, env))
            while self.accept("PUNCT", ","):
                operands.append(self.parse_operand(graph, env))
        self.expect("PUNCT", ")")
        attrs: dict[str, Any] = {}
        if self.at("PUNCT", "{"):
            attrs = self.parse_attrs()
        self.expect("PUNCT", ":")
        type_tok = self.tok
        if self.accept("PUNCT", "("):
            types = [self.parse_type()]
            while self.accept("PUNCT", ","):
                types.append(self.parse_type())
            self.expect("PUNCT", ")")
        else:
            types = [self.parse_type()]
        loc = None
        if self.accept("IDENT", "loc"):
            self.expect("PUNCT", "(")
            loc = json.loads(self.expect("STRING", what="a location string").text)
            self.expect("PUNCT", ")")
        names = [_unquote_name(t.text) for t in result_toks]
        for tok, n in zip(result_toks, names):
            if n in env:
                raise self.error(f"%{n} is defined twice (SSA values are defined once)", tok)
        if len(types) != len(names):
            raise self.error(f"{len(names)} results but {len(types)} types", type_tok)
        if len(names) != opdef.num_results:
            raise self.error(f"{opdef.name} has {opdef.num_results} results, the text binds {len(names)}", start)
        try:
            op = graph.create_op(opdef, operands, attrs, loc=loc, result_names=names)
        except (OpError, ValueError) as e:
            raise self.error(str(e), name_tok) from None
        for r, t in zip(op.results, types):
            if r.type != t:
                raise self.error(f"{r.ref}: {opdef.name} infers {r.type} but the text says {t} "
                                 f"(a stale shape or dtype?)", type_tok)
            env[r.name] = r

    def parse_operand(self, graph: Graph, env: dict[str, Value]) -> Value:
        tok = self.tok
        if self.accept("VALUE"):
            name = _unquote_name(tok.text)
            if name not in env:
                raise self.error(f"use of undefined value %{name} (a value must be defined before its use)", tok)
            return env[name]
        if self.accept("PARAM"):
            name = _unquote_name(tok.text)
            if name not in graph.params:
                raise self.error(f"parameter @{name} is not declared (add 'param @{name} : TYPE' before func)", tok)
            return graph.params[name]
        raise self.error(f"expected an operand (%value or @param), found {tok.text!r}")

    def parse_type(self) -> TensorType:
        tok = self.expect("IDENT", what="a type such as f32[T,576]")
        if tok.text not in DTYPE_NAMES:
            raise self.error(f"unknown dtype {tok.text!r}; known dtypes: {' '.join(d.value for d in DType)}", tok)
        self.expect("PUNCT", "[")
        dims: list[Dim] = []
        if not self.at("PUNCT", "]"):
            dims.append(self.parse_dim())
            while self.accept("PUNCT", ","):
                dims.append(self.parse_dim())
        self.expect("PUNCT", "]")
        return TensorType(DType(tok.text), dims)

    def parse_dim(self) -> Dim:
        tok = self.tok
        value = self.parse_scalar(stop={",", "]"})
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0 or isinstance(value, str):
            return value
        raise self.error(f"a dimension must be a non-negative int or a symbol, found {tok.text!r}", tok)

    def parse_attrs(self) -> dict[str, Any]:
        self.expect("PUNCT", "{")
        attrs: dict[str, Any] = {}
        while not self.at("PUNCT", "}"):
            key = self.expect("IDENT", what="an attribute name")
            if key.text in attrs:
                raise self.error(f"attribute {key.text} is given twice", key)
            self.expect("PUNCT", "=")
            attrs[key.text] = self.parse_attr_value()
            if not self.accept("PUNCT", ","):
                break
        self.expect("PUNCT", "}")
        return attrs

    def parse_attr_value(self) -> Any:
        if self.accept("PUNCT", "["):
            items: list[Any] = []
            if not self.at("PUNCT", "]"):
                items.append(self.parse_scalar(stop={",", "]"}))
                while self.accept("PUNCT", ","):
                    items.append(self.parse_scalar(stop={",", "]"}))
            self.expect("PUNCT", "]")
            return tuple(items)
        return self.parse_scalar(stop={",", "}"})

    def parse_scalar(self, stop: set[str]) -> Any:
        """One value: a number, string, bool, none, dtype, symbol or dim expression like 2*T."""
        first = self.tok
        toks: list[Token] = []
        depth = 0
        while not (self.at("EOF") or depth == 0 and self.tok.kind == "PUNCT" and self.tok.text in stop):
            if self.tok.kind in ("VALUE", "PARAM", "ARROW") or self.at("PUNCT", "{") or self.at("PUNCT", ":"):
                break
            if self.at("PUNCT", "("):
                depth += 1
            elif self.at("PUNCT", ")"):
                if depth == 0:
                    break
                depth -= 1
            toks.append(self.advance())
        if not toks:
            raise self.error(f"expected a value, found {first.text!r}" if first.kind != "EOF" else
                             "expected a value, found end of input", first)
        if len(toks) == 1:
            t = toks[0]
            if t.kind == "NUMBER":
                return float(t.text) if any(c in t.text for c in ".eEn") else int(t.text)
            if t.kind == "STRING":
                return json.loads(t.text)
            if t.kind == "IDENT":
                words = {"true": True, "false": False, "none": None, "inf": float("inf"), "nan": float("nan")}
                if t.text in words:
                    return words[t.text]
                if t.text in DTYPE_NAMES:
                    return DType(t.text)
        text = "".join(t.text for t in toks)
        try:
            return canonical_dim(text)
        except (ValueError, TypeError) as e:
            raise self.error(f"malformed value {text!r}: {e}", first) from None


def parse(text: str, source: str | None = None) -> Graph:
    """Parse one function in the text format; `source` (a file name) prefixes error positions."""
    return _Parser(text, source).parse_graph()


def parse_type(text: str) -> TensorType:
    p = _Parser(text, None)
    t = p.parse_type()
    p.expect("EOF", what="end of the type")
    return t
