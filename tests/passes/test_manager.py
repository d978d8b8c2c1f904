"""Pipelines and the pass manager's instrumentation. Test-only passes are named `test-*`.

No `from __future__ import annotations` here on purpose: pass options annotated with real
types (`n: int`) must register as well as string annotations do."""

import io
import os
import textwrap

import pytest

from kiln.ir import TensorType, parse, print_graph
from kiln.passes.manager import (_PASSES, PassError, remark, PassManager, PassSpec, PipelineError, parse_pipeline,
                                 register_pass, registered_passes, run_pipeline)

SEEN_OPTIONS = []


def options_pass(graph, *, n: int = 1, scale: float = 0.5, on: bool = False, tag: str = "x"):
    """Records its options."""
    SEEN_OPTIONS.append((n, scale, on, tag))
    return 0


def noop(graph):
    return 0


def raising(graph):
    graph.create_op("core.exp", [graph.inputs[0]])   # a partial change, then a failure
    raise RuntimeError("boom")


def stale_type(graph):
    graph.ops[0].results[0].type = TensorType("f32", (99,))
    return 1


TEST_PASSES = {"test-options": options_pass, "test-noop": noop, "test-raise": raising,
               "test-stale-type": stale_type}


@pytest.fixture(autouse=True, scope="module")
def register_test_passes():
    """Registered for this module only, so that other tests see the real pass list."""
    for name, fn in TEST_PASSES.items():
        register_pass(name)(fn)
    yield
    for name in TEST_PASSES:
        _PASSES.pop(name)


GRAPH = textwrap.dedent("""\
    func @main(%x: f32[4]) -> (f32[4]) {
      %0 = core.constant() {value=1.0, dtype=f32} : f32[]
      %1 = core.mul(%x, %0) : f32[4]
      %2 = core.exp(%1) : f32[4]
      return %2
    }
    """)
CANONICAL = textwrap.dedent("""\
    func @main(%x: f32[4]) -> (f32[4]) {
      %2 = core.exp(%x) : f32[4]
      return %2
    }
    """)


def run(pipeline, **options):
    out = io.StringIO()
    g = run_pipeline(parse(GRAPH), pipeline, stream=out, **options)
    return g, out.getvalue()


def dump(title, text):
    return f"// -----// IR Dump {title} //----- //\n{text}\n"


# -- pipeline strings --------------------------------------------------------------------------

def test_parse_pipeline():
    specs = parse_pipeline("canonicalize,cse,dce")
    assert specs == [PassSpec("canonicalize"), PassSpec("cse"), PassSpec("dce")]
    specs = parse_pipeline(" canonicalize { fold = false } ,\n dce{params=0}, test-options{tag=a b,n=-3,scale=2e-3,on=TRUE}")
    assert specs == [PassSpec("canonicalize", (("fold", False),)), PassSpec("dce", (("params", False),)),
                     PassSpec("test-options", (("tag", "a b"), ("n", -3), ("scale", 0.002), ("on", True)))]
    assert ",".join(map(str, specs)) == "canonicalize{fold=false},dce{params=false},test-options{tag=a b,n=-3,scale=0.002,on=true}"
    assert parse_pipeline("") == [] and parse_pipeline("  ") == []


def test_options_reach_the_pass_typed_with_defaults():
    SEEN_OPTIONS.clear()
    run("test-options,test-options{n=7,scale=1,on=1,tag=hello}")
    assert SEEN_OPTIONS == [(1, 0.5, False, "x"), (7, 1.0, True, "hello")]
    assert type(SEEN_OPTIONS[1][1]) is float


@pytest.mark.parametrize("pipeline, message", [
    ("canonicalize,cse,dcee", r"unknown pass 'dcee'; known passes: (.*, )?canonicalize, cse, dce, fold-constants, "),
    ("canonicalize{folding=true}", r"pass canonicalize has no option 'folding'; its options: fold \(bool, default true\)"),
    ("cse{x=1}", r"pass cse has no option 'x'; its options: none"),
    ("test-options{n=1.5}", r"test-options: option n='1.5' is not a valid int"),
    ("test-options{scale=big}", r"test-options: option scale='big' is not a valid float"),
    ("test-options{on=yes}", r"test-options: option on='yes' is not a valid bool"),
    ("dce{params}", r"dce: option 'params' needs a value \(key=value\)"),
    ("canonicalize{fold=true", r"unbalanced '\{' in pipeline"),
    ("canonicalize},cse", r"unbalanced '\}' in pipeline"),
    ("canonicalize,,cse", r"empty element in pipeline"),
    ("cse,", r"empty element in pipeline"),
    ("canonicalize{fold=true}cse", r"malformed pipeline element 'canonicalize\{fold=true\}cse'"),
])
def test_pipeline_errors(pipeline, message):
    with pytest.raises(PipelineError, match=message):
        parse_pipeline(pipeline)


def test_register_pass_checks_names_and_options():
    with pytest.raises(ValueError, match="lower-case"):
        register_pass("Test_Bad")
    with pytest.raises(ValueError, match="already registered"):
        register_pass("cse")(noop)
    with pytest.raises(TypeError, match="option n must be keyword-only with a default"):
        register_pass("test-no-default")(lambda graph, *, n: 0)
    with pytest.raises(TypeError, match="option n must be annotated int, float, bool or str"):
        def listy(graph, *, n: list = ()):
            return 0
        register_pass("test-listy")(listy)
    assert "test-no-default" not in registered_passes() and "test-listy" not in registered_passes()


# -- instrumentation ---------------------------------------------------------------------------

def test_no_output_without_instrumentation():
    g, out = run("canonicalize")
    assert out == "" and print_graph(g) == CANONICAL


def test_print_before_and_after_all():
    _, out = run("canonicalize,test-noop", print_before_all=True, print_after_all=True)
    assert out == (dump("Before canonicalize", GRAPH) + dump("After canonicalize (1 changes)", CANONICAL)
                   + dump("Before test-noop", CANONICAL) + dump("After test-noop (0 changes)", CANONICAL))


def test_print_around_a_named_pass():
    _, out = run("test-noop,canonicalize{fold=false},test-noop", print_after=["canonicalize"],
                 print_before=["test-noop"])
    assert out == (dump("Before test-noop", GRAPH) + dump("After canonicalize{fold=false} (1 changes)", CANONICAL)
                   + dump("Before test-noop", CANONICAL))
    with pytest.raises(PipelineError, match="cannot print around unknown pass 'canonicalise'; known passes: "):
        PassManager("cse", print_after=["canonicalise"])


def test_print_changed_shows_only_passes_that_changed_the_ir():
    _, out = run("test-noop,canonicalize,test-options,cse", print_before_all=True, print_after_all=True,
                 print_changed=True)
    assert out == ("// test-noop: no change\n" + dump("Before canonicalize", GRAPH)
                   + dump("After canonicalize (1 changes)", CANONICAL)
                   + "// test-options: no change\n// cse: no change\n")


def test_remarks_say_why_a_pass_changed_nothing():
    @register_pass("test-declines")
    def declines(graph):
        remark("core.exp at %2 stays: nothing to fuse it with")
        return 0

    try:
        _, out = run("test-declines", print_after_all=True, print_changed=True)
        assert out == "// test-declines: no change\n//   core.exp at %2 stays: nothing to fuse it with\n"
    finally:
        _PASSES.pop("test-declines")


def test_print_after_failure_and_the_error_names_the_pass():
    out = io.StringIO()
    with pytest.raises(PassError, match=r"pass 2 of the pipeline, test-raise, failed: RuntimeError: boom") as e:
        run_pipeline(parse(GRAPH), "canonicalize,test-raise", stream=out, print_after_failure=True)
    assert isinstance(e.value.__cause__, RuntimeError)
    assert out.getvalue() == dump("After test-raise Failed", textwrap.dedent("""\
        func @main(%x: f32[4]) -> (f32[4]) {
          %2 = core.exp(%x) : f32[4]
          %3 = core.exp(%x) : f32[4]
          return %2
        }
        """))


def test_verify_after_each_pass():
    with pytest.raises(PassError, match=r"(?s)pass 2 of the pipeline, test-stale-type, left a malformed graph: "
                                        r".*%0: core.constant infers f32\[\] but the value has type f32\[99\]"):
        run("test-noop,test-stale-type,test-noop")
    g, _ = run("test-stale-type", verify_each=False)
    assert g.ops[0].results[0].type == TensorType("f32", (99,))


def test_dump_dir_writes_one_parsable_file_per_pass(tmp_path):
    run("canonicalize,test-noop,dce", dump_dir=tmp_path / "dump")
    files = sorted(os.listdir(tmp_path / "dump"))
    assert files == ["00-input.ir", "01-canonicalize.ir", "02-test-noop.ir", "03-dce.ir"]
    texts = [(tmp_path / "dump" / f).read_text() for f in files]
    assert texts == [GRAPH, CANONICAL, CANONICAL, CANONICAL]
    assert all(print_graph(parse(t)) == t for t in texts)


def test_print_diff():
    _, out = run("canonicalize,test-noop", print_diff=True)
    assert out == textwrap.dedent("""\
        --- before canonicalize
        +++ after canonicalize
        @@ -1,6 +1,4 @@
         func @main(%x: f32[4]) -> (f32[4]) {
        -  %0 = core.constant() {value=1.0, dtype=f32} : f32[]
        -  %1 = core.mul(%x, %0) : f32[4]
        -  %2 = core.exp(%1) : f32[4]
        +  %2 = core.exp(%x) : f32[4]
           return %2
         }
        // test-noop: no change
        """)


def test_timing_report_and_records():
    pm = PassManager("canonicalize,cse,test-noop", timing=True, stream=io.StringIO())
    pm.run(parse(GRAPH))
    assert [(str(r.spec), r.changes, r.changed) for r in pm.records] == [
        ("canonicalize", 1, True), ("cse", 0, False), ("test-noop", 0, False)]
    lines = pm.stream.getvalue().splitlines()
    assert lines[0] == "// Pass timing" and lines[1].split() == ["pass", "ms", "%", "changes"]
    assert [ln.split()[0] for ln in lines[2:]] == ["canonicalize", "cse", "test-noop", "total"]
    assert lines[2].split()[-1] == "1" and lines[-1].split()[-1] == "1"
    assert all(float(ln.split()[1]) >= 0 for ln in lines[2:])
