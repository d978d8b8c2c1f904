"""`kiln eval-ppl` and quantization passes in `irdump`, run as a user runs them, on a tiny Llama
whose tokenizer reads pydoc_data.topics: the report's figures are the perplexities the library
computes, the sensitivity ranking quantizes one unit at a time, and irdump shows every step of
calibrate -> smooth -> quantize -> fuse."""

import json
import math
import re

import pytest
from kiln.frontends import load
from kiln.frontends.hf import tokenizer_for
from kiln.passes.calibrate import eval_windows, perplexity, pydoc_tokens
from kiln.passes.manager import run_pipeline
from kiln.tools import cli, irdump

SMALL = ["--samples", "3", "--length", "24", "--calib-samples", "3", "--calib-length", "24"]


def _rows(out: str) -> dict[str, list[str]]:
    return {cells[0]: cells[1:] for line in out.splitlines() if line.startswith("| ") and not line.startswith("| model")
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}


def test_eval_ppl_reports_float_and_quantized_perplexity(pydoc_llama, capsys, tmp_path):
    report = tmp_path / "ppl.json"
    assert cli.main(["eval-ppl", str(pydoc_llama), "-q", "w8a16", "-q", "int8_sq", "--kv-cache", "fp8", *SMALL,
                     "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"# .*: perplexity on 3 x 24 held-out tokens of pydoc_data.topics \(its end\); calibration on "
                     r"3 x 24 tokens \(its start\)", out)
    rows = _rows(out)
    assert list(rows) == ["f32", "w8a16 + fp8 kv", "w8a8-sq + fp8 kv"]
    graph = load(pydoc_llama)
    run_pipeline(graph, "stateless")
    held_out = eval_windows(pydoc_tokens(tokenizer_for(pydoc_llama)), 3, 24)
    base = perplexity(graph, held_out)
    assert float(rows["f32"][0]) == pytest.approx(base, abs=1e-4)
    for name, cells in rows.items():
        if name != "f32":
            ppl = float(cells[0])
            assert cells[1] == f"{100 * (ppl / base - 1):+.2f}%" and cells[2] == "11"   # 8 linears + the table + 2 attentions
    saved = json.loads(report.read_text())
    assert [r["name"] for r in saved["rows"]] == list(rows) and math.isclose(saved["rows"][0]["perplexity"], base,
                                                                             rel_tol=1e-9)


def test_sensitivity_ranks_units_quantized_one_at_a_time(pydoc_llama, capsys):
    assert cli.main(["eval-ppl", str(pydoc_llama), "-q", "w4a16", "--group-size", "32", "--sensitivity", "--by", "kind",
                     *SMALL]) == 0
    out = capsys.readouterr().out
    table = out.split("# sensitivity: w4a16 g32 on one kind at a time, the rest float")[1]
    ranked = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| model")]
    assert sorted(ranked) == ["model.embed_tokens", "model.layers.*.mlp.down_proj", "model.layers.*.mlp.gate_proj",
                              "model.layers.*.self_attn.o_proj", "model.layers.*.self_attn.q_proj"]
    ppls = [float(line.split("|")[2]) for line in table.splitlines() if line.startswith("| model")]
    assert ppls == sorted(ppls, reverse=True)


def test_sensitivity_keeps_the_other_units_float_after_awq_renames_weights(pydoc_llama, capsys, tmp_path):
    # awq folds a unit's scales into its neighbours' weights (down_proj's into the up rows, o_proj's into the
    # v rows) and renames them (`...weight.concat.awq`): the other units must stay excluded all the same
    report = tmp_path / "sens.json"
    assert cli.main(["eval-ppl", str(pydoc_llama), "-q", "w4a16-awq", "--group-size", "32", "--sensitivity",
                     "--by", "kind", "--calib-rows", "48", *SMALL, "--json", str(report)]) == 0
    capsys.readouterr()
    units = json.loads(report.read_text())["sensitivity"]
    assert sorted(u["name"] for u in units) == ["model.embed_tokens", "model.layers.*.mlp.down_proj",
                                                "model.layers.*.mlp.gate_proj", "model.layers.*.self_attn.o_proj",
                                                "model.layers.*.self_attn.q_proj"]
    # one linear of each of the 2 layers, or the int8 token table
    assert {u["name"]: u["quantized"] for u in units} == {n["name"]: 1 if "embed" in n["name"] else 2 for n in units}


def test_eval_ppl_compares_the_kv_cache_alone_with_linears_and_kv(pydoc_llama, capsys):
    assert cli.main(["eval-ppl", str(pydoc_llama), "-q", "fp8_kv", "-q", "w8a16+fp8_kv", "-q", "w8a16", *SMALL]) == 0
    rows = _rows(capsys.readouterr().out)
    assert list(rows) == ["f32", "fp8 kv", "w8a16 + fp8 kv", "w8a16"]
    assert [cells[2] for cells in list(rows.values())[1:]] == ["2", "11", "9"]   # attentions, both, linears + table


def test_eval_ppl_refuses_a_group_size_that_does_not_fit_before_calibrating(pydoc_llama, capsys):
    with pytest.raises(SystemExit) as e:   # hidden 64: groups of 128 cannot tile a row
        cli.main(["eval-ppl", str(pydoc_llama), "-q", "fp8", "-q", "w4a16-awq", "--group-size", "128", *SMALL])
    assert e.value.code == 1
    captured = capsys.readouterr()
    assert "group_size=128 does not fit" in captured.err and "group_size=64 divides every in_features" in captured.err
    assert "| f32 |" not in captured.out and "calibrating" not in captured.err


def test_eval_ppl_needs_a_quant_for_sensitivity(pydoc_llama):
    with pytest.raises(SystemExit):
        cli.main(["eval-ppl", str(pydoc_llama), "--sensitivity", *SMALL])


def test_irdump_shows_calibrate_smooth_quantize_and_fuse(pydoc_llama, capsys):
    pipeline = (f"stateless,calibrate{{tokenizer={pydoc_llama},samples=2,length=16}},smooth,"
                f"quantize{{algo=w8a8-sq,kv=fp8}},fuse-quantized-linear")
    assert irdump.main([str(pydoc_llama), "--pipeline", pipeline, "--print-after", "calibrate", "--print-after",
                        "smooth", "--print-after", "quantize", "--print-after", "fuse-quantized-linear"]) == 0
    out = capsys.readouterr().out
    titles = [line.split("After ")[1].split(" (")[0] for line in out.splitlines() if "IR Dump After" in line]
    assert [t.split("{")[0] for t in titles] == ["calibrate", "smooth", "quantize", "fuse-quantized-linear"]
    after = {t.split("{")[0]: out.split(f"IR Dump After {t}")[1].split("// -----//")[0] for t in titles}
    assert "input_layernorm.weight.smooth" in after["smooth"] and "quant." not in after["smooth"]
    assert "quant.quantize" in after["quantize"] and "k_scale" in after["quantize"]
    assert after["fuse-quantized-linear"].count("quant.linear_int8(") == 8
