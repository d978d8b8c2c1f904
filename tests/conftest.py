"""Fixtures shared across the test tree."""

import os

import pytest
import torch


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
