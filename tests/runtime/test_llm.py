"""kiln.LLM on the reference backend: greedy tokens equal transformers' generate (SmolLM2 and tiny
models of each architecture, batches of different lengths, a pool small enough to preempt),
prefix reuse computes only new tokens, seeds are per request, streaming and async requests agree
with plain runs, cancelling one leaves the others alone, and bad input fails alone."""

import asyncio

import pytest
import torch
import transformers as tf

from kiln.api import compile as kiln_compile
from kiln.runtime.config import BuildConfig, KvCacheConfig
from kiln.runtime.engine import RequestError, RequestOutput
from kiln.runtime.llm import LLM
from kiln.runtime.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
PROMPTS = ["The capital of France is", "def fibonacci(n):",
           "Once upon a time, in a land far away, there lived a dragon who loved to read",
           "1, 2, 3, 4,", "Water boils at a temperature of"]


def hf_greedy(model, ids, n, eos):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=eos)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def smol_llm(smollm2):
    graph, model, tokenizer = smollm2
    # a pool of 3 blocks of 16 tokens for 5 prompts: sequences are preempted and recomputed
    llm = LLM(kiln_compile(graph.clone()), tokenizer=tokenizer, kv_cache_config=KvCacheConfig(max_tokens=48),
              build_config=BuildConfig(max_num_tokens=24, max_batch_size=4))
    return llm, model, tokenizer


def test_smollm2_greedy_matches_transformers_with_preemption(smol_llm):
    llm, model, tokenizer = smol_llm
    before = llm.engine.scheduler.preemptions
    outputs = llm.generate(PROMPTS, GREEDY)
    assert llm.engine.scheduler.preemptions > before
    for prompt, out in zip(PROMPTS, outputs):
        ids = tokenizer(prompt)["input_ids"]
        assert out.prompt_token_ids == ids and out.prompt == prompt
        want = hf_greedy(model, ids, 8, tokenizer.eos_token_id)
        assert out.outputs[0].token_ids == want
        assert out.outputs[0].text == tokenizer.decode(want, skip_special_tokens=True)
    llm.engine.pool.check()
    assert all(r == 0 for r in llm.engine.pool.refs)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_tiny_models_greedy_match_transformers(arch, tmp_path):
    cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
           "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": 6})}[arch]
    torch.manual_seed(0)
    model = cls[1](cls[0](vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **cls[2])).eval()
    model.save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), skip_tokenizer_init=True, kv_cache_config=KvCacheConfig(max_tokens=64, tokens_per_block=4),
              build_config=BuildConfig(max_num_tokens=16))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (3, 11, 7, 19)]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    assert llm.engine.scheduler.preemptions > 0
    for ids, out in zip(prompts, outputs):
        with torch.no_grad():
            want = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, len(ids):].tolist()
        assert out.outputs[0].token_ids == want and out.outputs[0].text == ""  # no tokenizer: ids only


def test_prefix_reuse_computes_only_new_tokens(smol_llm):
    llm, _, tokenizer = smol_llm
    prefix = "You are a helpful assistant. Answer briefly and precisely. " * 2
    first = llm.generate(prefix + "What is two plus two?", GREEDY)
    before = llm.engine.scheduler.prefill_tokens
    second = llm.generate(prefix + "What is two plus two?", GREEDY)
    computed = llm.engine.scheduler.prefill_tokens - before
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    assert computed < 16, f"recomputed {computed} of {len(second.prompt_token_ids)} prompt tokens"


def test_seeded_sampling_is_reproducible_whatever_the_batch(smol_llm):
    llm, _, _ = smol_llm
    seeded = SamplingParams(max_tokens=6, temperature=0.9, top_p=0.9, seed=1234)
    alone = llm.generate(PROMPTS[0], seeded).outputs[0].token_ids
    batched = llm.generate([PROMPTS[1], PROMPTS[0], PROMPTS[3]],
                           [SamplingParams(max_tokens=6, temperature=1.0), seeded,
                            SamplingParams(max_tokens=4, temperature=0.5)])
    assert batched[1].outputs[0].token_ids == alone


def test_streaming_and_async_agree_and_cancel_alone(smol_llm):
    llm, _, _ = smol_llm
    plain = [o.outputs[0].text for o in llm.generate(PROMPTS, GREEDY)]

    async def run():
        async def stream(prompt):
            texts = []
            async for out in llm.generate_async(prompt, GREEDY, streaming=True):
                texts.append(out.outputs[0].text)
            assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # cumulative, never shrinking
            return texts[-1]

        async def cancelled():
            future = llm.generate_async(PROMPTS[2], SamplingParams(max_tokens=200, temperature=0.0), streaming=True)
            async for out in future:
                if len(out.outputs[0].token_ids) >= 2:
                    future.abort()
            return out

        tasks = [asyncio.create_task(stream(p)) for p in PROMPTS] + [asyncio.create_task(cancelled())]
        awaited = await llm.generate_async(PROMPTS[1], GREEDY)
        return await asyncio.gather(*tasks), awaited

    (*texts, aborted), awaited = asyncio.run(run())
    assert texts == plain and awaited.outputs[0].text == plain[1]
    assert aborted.outputs[0].finish_reason == "abort" and aborted.finished
    assert llm.generate_async(PROMPTS[0], GREEDY).result(timeout=60).outputs[0].text == plain[0]

    # a reader that starts after the request finished gets its latest (final) output, and the future
    # holds that one output, not every cumulative one (which grew with the square of the length)
    late = llm.generate_async(PROMPTS[0], GREEDY, streaming=True)
    late.result(timeout=60)

    async def read_late():
        return [out async for out in late]

    outs = asyncio.run(read_late())
    assert [o.outputs[0].text for o in outs] == [plain[0]] and outs[0].finished
    assert not any(isinstance(v, list) and v and isinstance(v[0], RequestOutput) for v in vars(late).values())


def test_bad_input_fails_alone(smol_llm, tmp_path):
    llm, _, _ = smol_llm
    running = llm.generate_async(PROMPTS[0], GREEDY)
    with pytest.raises(RequestError, match="prompt is empty"):
        llm.generate_async("", GREEDY)
    with pytest.raises(RequestError, match="prompt has 5000 tokens but max_seq_len"):
        llm.generate_async([1] * 5000, GREEDY)
    with pytest.raises(RequestError, match="prompt 1: .*list of token ids"):
        llm.generate(["fine", [1.5, 2]], GREEDY)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(Exception, match="does not exist"):
        LLM(str(tmp_path / "no-such-model"))
    assert running.result(timeout=60).outputs[0].finish_reason == "length"


def test_stop_strings_logprobs_and_prompt_logprobs(smol_llm):
    llm, model, tokenizer = smol_llm
    full = llm.generate(PROMPTS[0], GREEDY).outputs[0]
    cut = full.text.index("Paris") + 2                      # "Pa" may end a token: the stop spans tokens
    stop = full.text[cut - 2: cut + 3]
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=8, temperature=0.0, stop=[stop], logprobs=2,
                                                  prompt_logprobs=1))
    first = out.outputs[0]
    assert first.text == full.text[: cut - 2] and first.finish_reason == "stop" and first.stop_reason == stop
    ids = out.prompt_token_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids + first.token_ids])).logits[0].log_softmax(-1)
    for i, (token, entry) in enumerate(zip(first.token_ids, first.logprobs)):
        assert len(entry) <= 3 and abs(entry[token] - logits[len(ids) - 1 + i, token].item()) < 1e-3
    assert abs(first.cumulative_logprob - sum(e[t] for t, e in zip(first.token_ids, first.logprobs))) < 1e-4
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for p in range(1, len(ids)):
        assert abs(out.prompt_logprobs[p][ids[p]] - logits[p - 1, ids[p]].item()) < 1e-3
