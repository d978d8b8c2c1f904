"""kiln.AutoModelForCausalLM.generate returns exactly what transformers' generate returns, for
greedy and beam-search calls, on a tiny model (a left-padded batch) and on SmolLM2."""

import asyncio

import pytest
import torch
import transformers as tf

import kiln
from kiln.api import compile as kiln_compile
from kiln.runtime.hf_model import CausalLM

CALLS = [dict(), dict(num_beams=3), dict(num_beams=3, num_return_sequences=2, length_penalty=0.7),
         dict(repetition_penalty=1.3), dict(num_beams=2, early_stopping=True)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                            eos_token_id=5, bos_token_id=1, pad_token_id=0)
    model = tf.LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    return model, kiln.AutoModelForCausalLM.from_pretrained(str(path), skip_tokenizer_init=True)


@pytest.mark.parametrize("call", CALLS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "greedy")
def test_tiny_model_matches_transformers(tiny, call):
    model, kiln_model = tiny
    ids = torch.tensor([[0, 0, 3, 17, 42, 9], [1, 2, 3, 4, 5, 6]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, **call)
    assert torch.equal(kiln_model.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=0, **call), want)


def test_smollm2_greedy_and_beam_search_match_transformers(smollm2):
    graph, model, tokenizer = smollm2
    kiln_model = CausalLM(kiln.LLM(kiln_compile(graph.clone()), tokenizer=tokenizer))
    ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    for call in (dict(), dict(num_beams=3)):
        with torch.no_grad():
            want = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id, **call)
        got = kiln_model.generate(ids, max_new_tokens=6, pad_token_id=tokenizer.eos_token_id, **call)
        assert torch.equal(got, want), call
    assert torch.equal(asyncio.run(kiln_model.agenerate(ids, max_new_tokens=6)), got if not call else
                       kiln_model.generate(ids, max_new_tokens=6))
    kiln_model.llm.engine.pool.check()


def test_fp8_is_refused_plainly():
    with pytest.raises(ValueError, match="use_fp8=True needs kiln's FP8 quantization"):
        kiln.AutoModelForCausalLM.from_pretrained("smollm2", use_fp8=True)


def test_beam_search_through_llm_generate(tiny):
    model, kiln_model = tiny
    ids = [3, 17, 42, 9]
    params = kiln.SamplingParams(max_tokens=8, temperature=0.0, use_beam_search=True, beam_width=3, n=2)
    out = kiln_model.llm.generate(ids, params)
    with torch.no_grad():
        want = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, num_beams=3,
                              num_return_sequences=2, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    for o, row, score in zip(out.outputs, want.sequences, want.sequences_scores):
        tokens = row[len(ids):].tolist()
        assert o.token_ids == tokens[: len(o.token_ids)] and all(t == 5 for t in tokens[len(o.token_ids):])
        assert abs(o.cumulative_logprob - score.item()) < 1e-4
