"""irdump and the kiln command line, run as a user runs them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.ir import parse, print_graph
from kiln.tools import cli, irdump

EXAMPLE = Path(__file__).parents[2] / "examples" / "llama_block.ir"
PIPELINE = "canonicalize,cse,dce"


def run_irdump(capsys, *argv: str) -> str:
    assert irdump.main(list(argv)) == 0
    return capsys.readouterr().out


def test_prints_the_input_unchanged_without_a_pipeline(capsys):
    out = run_irdump(capsys, str(EXAMPLE))
    assert out == print_graph(parse(EXAMPLE.read_text()))


def test_print_after_all_shows_each_pass(capsys):
    out = run_irdump(capsys, str(EXAMPLE), "-p", PIPELINE, "--print-after-all")
    titles = [line for line in out.splitlines() if line.startswith("// -----// IR Dump")]
    assert [t.split()[5] for t in titles] == ["canonicalize", "cse", "dce"]
    after_cse = out.split("IR Dump After cse")[1].split("// -----//")[0]
    assert after_cse.count("@model.layers.0.mlp.gate_proj.weight)") == 1  # the duplicate linear is gone


def test_print_after_named_pass_only_when_changed(capsys):
    out = run_irdump(capsys, str(EXAMPLE), "-p", PIPELINE, "--print-after", "cse", "--print-after", "dce",
                     "--print-changed")
    assert "IR Dump After cse" in out
    assert "IR Dump After dce" not in out  # dce finds nothing left to remove after canonicalize


def test_print_before(capsys):
    out = run_irdump(capsys, str(EXAMPLE), "-p", PIPELINE, "--print-before", "canonicalize")
    before = out.split("IR Dump Before canonicalize //----- //\n")[1]
    assert "core.cast(%hidden)" in before


def test_diff_shows_what_each_pass_removed(capsys):
    out = run_irdump(capsys, str(EXAMPLE), "-p", PIPELINE, "--diff")
    assert "--- before canonicalize" in out and "+++ after canonicalize" in out
    assert "-  %0 = core.cast(%hidden) {dtype=f32} : f32[T,64]" in out
    assert "-  %29 = llm.linear(%26, @model.layers.0.mlp.gate_proj.weight) : f32[T,128]" in out
    assert "// dce: no change" in out


def test_dump_dir_writes_one_parsable_file_per_pass(tmp_path, capsys):
    run_irdump(capsys, str(EXAMPLE), "-p", PIPELINE, "--dump-dir", str(tmp_path))
    files = sorted(os.listdir(tmp_path))
    assert files == ["00-input.ir", "01-canonicalize.ir", "02-cse.ir", "03-dce.ir"]
    ops = [len(parse((tmp_path / f).read_text()).ops) for f in files]
    assert ops[0] == 37 and ops[1] < ops[0] and ops[2] < ops[1]


def test_dot_and_json_formats(capsys):
    dot = run_irdump(capsys, str(EXAMPLE), "--format", "dot")
    assert dot.startswith('digraph "llama_block" {') and dot.count("shape=box") == 37
    doc = json.loads(run_irdump(capsys, str(EXAMPLE), "-p", PIPELINE, "--format", "json"))
    assert doc["name"] == "llama_block" and len(doc["ops"]) == 28
    assert {"op": "llm.attention"}.items() <= next(o for o in doc["ops"] if o["op"] == "llm.attention").items()


def test_stats_counts_ops_bytes_and_flops(capsys):
    out = run_irdump(capsys, str(EXAMPLE), "--stats", "--dim", "T=128")
    assert out.startswith("// stats at T=128\n")
    assert "parameters: 10 tensors, 37,000 elements, 148.00 KB" in out
    linear = next(line for line in out.splitlines() if line.startswith("llm.linear"))
    # 8 linears at T=128: q(64x64) k,v(32x64) o(64x64) gate,up,gate(128x64) down(64x128)
    macs = 128 * (64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 128 * 64 + 64 * 128)
    assert linear.split()[1] == "8" and linear.split()[2] == f"{2 * macs / 1e6:.2f}"
    defaulted = run_irdump(capsys, str(EXAMPLE), "--stats")
    assert "T defaulted to 1" in defaulted


def test_list_passes(capsys):
    out = run_irdump(capsys, "--list-passes")
    for name in ("canonicalize{fold: bool = True}", "cse", "dce{params: bool = True}", "fold-constants"):
        assert name in out


@pytest.mark.parametrize("argv, code, message", [
    (["-p", "canonicalize,no-such-pass"], 2, "unknown pass 'no-such-pass'; known passes: awq, calibrate, canonicalize, cse, dce"),
    (["-p", "dce{bogus=1}"], 2, "pass dce has no option 'bogus'; its options: params (bool, default true)"),
    (["-p", "dce{params=maybe}"], 2, "option params='maybe' is not a valid bool"),
    (["--print-after", "nope", "-p", "dce"], 2, "cannot print around unknown pass 'nope'"),
    (["--diff"], 2, "need --pipeline"),
    (["--dim", "T=x", "--stats"], 2, "--dim 'T=x': write NAME=N"),
])
def test_usage_errors_are_one_clear_line(argv, code, message, capsys):
    with pytest.raises(SystemExit) as exit:
        irdump.main([str(EXAMPLE), *argv])
    err = capsys.readouterr().err
    assert exit.value.code == code and message in err and "Traceback" not in err


def test_malformed_input_names_file_line_and_column(tmp_path, capsys):
    bad = tmp_path / "bad.ir"
    bad.write_text("func @main(%x: f32[4]) -> (f32[4]) {\n  %0 = core.add(%x, %y) : f32[4]\n  return %0\n}\n")
    with pytest.raises(SystemExit) as exit:
        irdump.main([str(bad)])
    assert exit.value.code == 1
    assert f"{bad}:2:21: use of undefined value %y" in capsys.readouterr().err


def test_console_scripts_run_as_processes(tmp_path):
    out = subprocess.run([sys.executable, "-m", "kiln.tools.irdump", str(EXAMPLE), "-p", PIPELINE,
                          "-o", str(tmp_path / "out.ir")], capture_output=True, text=True, check=True)
    assert out.stdout == ""
    assert len(parse((tmp_path / "out.ir").read_text()).ops) == 28
    failed = subprocess.run([sys.executable, "-m", "kiln.tools.irdump", str(EXAMPLE), "-p", "nope"],
                            capture_output=True, text=True)
    assert failed.returncode == 2 and "irdump: error: unknown pass 'nope'" in failed.stderr


def test_kiln_run_checks_the_compiled_graph(capsys):
    assert cli.main(["run", str(EXAMPLE), "--dim", "T=5", "--check"]) == 0
    out = capsys.readouterr().out
    assert "canonicalize,cse,dce: 37 -> 28 ops" in out
    assert "%36: f32[T,64] = torch.float32 (5, 64)" in out
    assert "computes the same function" in out


def test_kiln_ops_lists_schemas(capsys):
    assert cli.main(["ops", "llm."]) == 0
    out = capsys.readouterr().out
    assert ("llm.attention(q, k, v, mask?) {causal: bool = False, scale: float | None = None, "
            "window: int | None = None}") in out
    assert "core.add" not in out


def test_irdump_traces_a_model_folder(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    out = run_irdump(capsys, str(tmp_path), "--dtype", "bf16", "-p", "canonicalize,cse,dce", "--stats",
                     "--dim", "T=16")
    assert "// stats at T=16" in out and "llm.attention                 1" in out
    text = run_irdump(capsys, str(tmp_path), "--dtype", "bf16")
    assert "func @main(%tokens: i32[T], %positions: i32[T]) -> (bf16[T,64])" in text
    with pytest.raises(SystemExit) as exit:
        irdump.main([str(tmp_path / "missing")])
    assert exit.value.code == 2 and "does not exist" in capsys.readouterr().err
