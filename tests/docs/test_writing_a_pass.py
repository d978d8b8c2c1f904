"""The guide's extension, run: its code block is executed as written, then the new pass fuses a
GeGLU in a traced Gemma and keeps transformers' logits."""

import pathlib
import re

import pytest
import torch
import transformers as tf

from kiln.backends import reference
from kiln.frontends import load
from kiln.ir.registry import _REGISTRY
from kiln.passes.manager import _PASSES, run_pipeline
from kiln.testing import assert_same_function

GUIDE = pathlib.Path(__file__).parents[2] / "docs" / "writing_a_pass.md"


@pytest.fixture
def guide_extension():
    code = re.search(r"```python\n(.*?)```", GUIDE.read_text(), re.S).group(1)
    assert len([line for line in code.splitlines() if line.strip() and not line.startswith("#")]) <= 24
    exec(compile(code, str(GUIDE), "exec"), {})
    yield
    _REGISTRY.pop("llm.gelu_tanh_mul")
    _PASSES.pop("fuse-geglu")


def test_the_guide_pass_fuses_gemma_geglu(guide_extension, tmp_path):
    torch.manual_seed(0)
    config = tf.GemmaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            hidden_activation="gelu_pytorch_tanh")
    model = tf.GemmaForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    graph = load(tmp_path)
    run_pipeline(graph, "stateless")
    before = graph.clone()
    run_pipeline(graph, "fuse-geglu")
    assert graph.op_counts()["llm.gelu_tanh_mul"] == 2 and "core.gelu" not in graph.op_counts()
    assert_same_function(before, graph, {"T": 7}, atol=1e-5)
    ids = torch.randint(0, 128, (9,))
    with torch.no_grad():
        want = model(ids[None]).logits[0]
    got = reference.run(graph, ids.int(), torch.arange(9, dtype=torch.int32))[0]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
