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


@pytest.fixture(scope="session")
def pydoc_llama(tmp_path_factory):
    """A tiny random Llama folder (hidden 64, GQA 4/2 heads, 2 layers) with a word-level tokenizer
    over pydoc_data.topics' 120 commonest words, so that calibration and evaluation text read as
    varied token ids without a download: the folder."""
    import collections
    import pydoc_data.topics
    import re

    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("pydoc-llama")
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    tf.LlamaForCausalLM(config).eval().save_pretrained(folder)
    words = collections.Counter(re.findall(r"\w+", " ".join(pydoc_data.topics.topics.values())))
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *(w for w, _ in words.most_common(120))])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tf.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                               unk_token="<unk>").save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smollm2_prompts():
    """32 varied prompts on which kiln's bf16 SmolLM2 is compared with transformers' (CPU and GPU tests)."""
    return [
        # the GPU test's first eight
        "What is the capital of France?", "Write a haiku about compilers.", "def fibonacci(n):",
        "The three laws of thermodynamics are", "Translate to French: good morning", "List five prime numbers:",
        "Once upon a time", "Why is the sky blue?",
        # more, varied in kind and length
        "Explain how a hash map works.", "import numpy as np\n\ndef softmax(x):", "The best way to learn a language is",
        "Q: What is 17 times 23?\nA:", "Give me three tips for sleeping better.", "SELECT name, age FROM users WHERE",
        "In 1969, the first humans", "Write a short poem about the sea.", "How do vaccines work?",
        "class Stack:\n    def __init__(self):", "The difference between a virus and a bacterium is",
        "Summarize the plot of Romeo and Juliet.", "What are the benefits of exercise?",
        "My favourite recipe for pancakes:",
        "Photosynthesis is the process by which", "Write a function in JavaScript that reverses a string.",
        "Dear hiring manager,", "The French Revolution began in", "What is machine learning?",
        "Describe a sunset in three sentences.", "To make a cup of tea, first",
        "The largest planet in the solar system",
        "Why do cats purr?", "Here is a list of fruits: apple, banana,",
    ]

