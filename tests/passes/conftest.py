"""Shared helper of the pass tests: run a pipeline on IR text, compare the printed result with
the expected text, and check numerically that the graph still computes the same function."""

import textwrap

import pytest

from kiln.ir import parse, print_graph
from kiln.passes.manager import run_pipeline
from kiln.testing import assert_same_function


def ir(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


@pytest.fixture
def check_pass():
    def check(before: str, pipeline: str, expected: str, bindings=None, storages=None):
        original = parse(ir(before))
        for name, storage in (storages or {}).items():
            original.params[name].storage = storage
        after = original.clone()
        run_pipeline(after, pipeline)
        assert print_graph(after) == ir(expected)
        assert_same_function(original, after, bindings or {})
        return after
    return check
