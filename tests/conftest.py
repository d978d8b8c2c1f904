"""Fixtures shared across the test tree."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Before anything imports triton: other test folders (frontends, passes) can import it
    # indirectly through torch, and then the kernels' helpers would be compiled, not interpreted.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2():
    """The default model, traced by kiln (stateless graph) and loaded by transformers itself, once
    per test run: (graph, transformers model, tokenizer)."""
    transformers = pytest.importorskip("transformers")
    from kiln.frontends import load, resolve
    from kiln.frontends.hf import tokenizer_for

    path = resolve("smollm2")
    folder, name = os.path.split(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return load(path), model, tokenizer_for(path)
