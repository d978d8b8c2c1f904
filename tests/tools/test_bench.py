"""`kiln bench` end to end on the CPU with a tiny shape: every row is measured, the baselines run
on the same prompts, and the JSON and markdown reports are written."""

import json

from kiln.tools import cli


def test_bench_reports_kiln_and_the_transformers_baseline(tmp_path, capsys):
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    code = cli.main(["bench", "tiny-llama", "--target", "reference", "--dtype", "f32", "--batches", "1,2",
                     "--workloads", "12/4", "--requests", "3", "--input-len", "12", "--output-len", "4",
                     "--compare", "--quiet", "--json", str(out_json), "--markdown", str(out_md)])
    assert code == 0
    report = json.loads(out_json.read_text())
    rows = {(r["system"], r["case"]): r for r in report["rows"]}
    assert set(rows) == {("transformers eager", "batch 1, 12/4"), ("transformers eager", "batch 2, 12/4"),
                         ("kiln", "batch 1, 12/4"), ("kiln", "batch 2, 12/4"), ("kiln", "3 requests 12/4")}
    assert all(r["tok_s"] > 0 and r["ttft_ms"] > 0 for r in rows.values())
    assert report["compile_s"]["compile call to first token"] > 0
    text = out_md.read_text()
    assert "| transformers eager | batch 2, 12/4 |" in text and "kiln " in text.split("transformers eager")[1]
    assert text in capsys.readouterr().out


def test_a_random_weight_shape_benches_a_quant_that_calibrates(tmp_path):
    out_json = tmp_path / "bench.json"
    code = cli.main(["bench", "tiny-llama", "--target", "reference", "--dtype", "f32", "--quant", "fp8+fp8_kv",
                     "--batches", "1", "--workloads", "", "--input-len", "8", "--output-len", "3", "--quiet",
                     "--json", str(out_json)])
    assert code == 0
    report = json.loads(out_json.read_text())
    assert report["quant"] == "fp8+fp8_kv" and report["rows"][0]["tok_s"] > 0
