"""The sampler: validation, penalties, filters, seeds, logprobs and beam scoring, each checked
against an independent computation (hand arithmetic, numpy in f64, or transformers itself)."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from transformers import GenerationMixin
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from kiln.runtime.sampling import (
    BeamSearch,
    SamplingParams,
    apply_penalties,
    beam_logprobs,
    beam_step,
    filter_logits,
    length_penalized_score,
    prompt_logprobs,
    request_generator,
    sample,
)


def run(logits, params, prompt_ids=None, output_ids=None, generators=None, eos_ids=None):
    rows = len(params)
    return sample(logits, params, prompt_ids or [[]] * rows, output_ids or [[]] * rows,
                  generators or [None] * rows, eos_ids)


# --- validation -------------------------------------------------------------------------------

BAD = [
    ("max_tokens", 0), ("max_tokens", 2.0), ("min_tokens", -1), ("temperature", -0.1),
    ("temperature", math.inf), ("temperature", math.nan), ("top_k", -2), ("top_k", 1.5), ("top_p", 0.0),
    ("top_p", 1.01), ("min_p", -0.1), ("min_p", 1.5), ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0), ("presence_penalty", 2.5), ("frequency_penalty", -3.0),
    ("seed", -1), ("seed", 1.5), ("seed", 2**64), ("stop", ""), ("stop", ["ok", ""]), ("stop", [3]),
    ("stop_token_ids", [-1]), ("stop_token_ids", 5), ("end_id", -1), ("ignore_eos", 1),
    ("logprobs", -1), ("prompt_logprobs", 1.0), ("n", 0), ("best_of", 0), ("use_beam_search", "yes"),
    ("beam_width", 0), ("length_penalty", math.nan), ("early_stopping", None),
    ("include_stop_str_in_output", 0), ("skip_special_tokens", "no"), ("max_tokens", True),
]


@pytest.mark.parametrize("field,value", BAD, ids=[f"{f}={v!r}" for f, v in BAD])
def test_invalid_value_names_the_field(field, value):
    with pytest.raises(ValueError) as error:
        SamplingParams(**{field: value})
    assert f"SamplingParams.{field}={value!r}" in str(error.value)


def test_every_field_has_an_invalid_case():
    assert {f.name for f in dataclasses.fields(SamplingParams)} == {field for field, _ in BAD}


@pytest.mark.parametrize("kwargs,field", [
    (dict(max_tokens=4, min_tokens=5), "min_tokens"),
    (dict(n=3, best_of=2), "best_of"),
    (dict(beam_width=4), "beam_width"),
    (dict(use_beam_search=True, beam_width=2, n=3), "n"),
    (dict(temperature=0.0, n=2), "n"),
])
def test_inconsistent_fields_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}="):
        SamplingParams(**kwargs)


def test_boundary_values_are_accepted():
    SamplingParams(top_k=-1, top_p=1.0, min_p=1.0, temperature=0.0, presence_penalty=-2, frequency_penalty=2,
                   seed=0, logprobs=0, max_tokens=1, min_tokens=1, stop="x", stop_token_ids=[0], end_id=0)
    SamplingParams(seed=2**64 - 1, use_beam_search=True, beam_width=4, n=4, length_penalty=-1.0)
    assert SamplingParams(stop="###").stop == ["###"]
    SamplingParams(temperature=np.float32(0.7), top_k=np.int64(5), seed=np.uint64(2**63))  # numpy numbers too


def test_finish_ids():
    assert SamplingParams(stop_token_ids=[7]).finish_ids(2) == {2, 7}
    assert SamplingParams(end_id=5).finish_ids([2, 3]) == {5}
    assert SamplingParams(ignore_eos=True, stop_token_ids=[7]).finish_ids(2) == {7}


# --- greedy and logprobs ------------------------------------------------------------------------

logits_strategy = st.integers(2, 40).flatmap(lambda v: st.lists(
    st.lists(st.floats(-20, 20, width=32), min_size=v, max_size=v), min_size=1, max_size=6))


@settings(max_examples=60, deadline=None)
@given(logits_strategy, st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_greedy_is_argmax_and_draws_nothing(rows, dtype):
    logits = torch.tensor(rows).to(dtype)
    generators = [request_generator(SamplingParams(seed=3)) for _ in rows]
    before = torch.get_rng_state(), [g.get_state() for g in generators]
    out = run(logits, [SamplingParams(temperature=0.0)] * len(rows), generators=generators)
    assert out.token_ids == logits.float().argmax(dim=-1).tolist()
    assert torch.equal(torch.get_rng_state(), before[0])
    assert all(torch.equal(g.get_state(), s) for g, s in zip(generators, before[1]))


def test_logprobs_are_raw_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    params = [SamplingParams(temperature=0.5, top_k=3, logprobs=5, repetition_penalty=1.5),
              SamplingParams(temperature=0.0, logprobs=0), SamplingParams(logprobs=None),
              SamplingParams(temperature=2.0, top_p=0.3, logprobs=50, frequency_penalty=1.0)]
    out = run(logits, params, prompt_ids=[[1, 2]] * 4, output_ids=[[3]] * 4)
    reference = torch.log_softmax(logits.double(), dim=-1)
    for row, token in enumerate(out.token_ids):
        assert out.logprobs[row] == pytest.approx(reference[row, token].item(), abs=1e-5)
    top5 = reference[0].topk(5).indices.tolist()
    assert set(out.top_logprobs[0]) == set(top5) | {out.token_ids[0]}
    assert all(out.top_logprobs[0][t] == pytest.approx(reference[0, t].item(), abs=1e-5) for t in out.top_logprobs[0])
    assert out.top_logprobs[1] == {out.token_ids[1]: pytest.approx(reference[1, out.token_ids[1]].item(), abs=1e-5)}
    assert out.top_logprobs[2] is None
    assert len(out.top_logprobs[3]) == 50


def test_prompt_logprobs():
    logits = torch.randn(4, 10)
    prompt = [3, 1, 4, 1]
    rows = prompt_logprobs(logits, prompt, 2)
    reference = torch.log_softmax(logits, dim=-1)
    assert rows[0] is None and len(rows) == 4
    for i in range(1, 4):
        assert rows[i][prompt[i]] == pytest.approx(reference[i - 1, prompt[i]].item(), abs=1e-6)
        assert set(reference[i - 1].topk(2).indices.tolist()) <= set(rows[i])


# --- penalties ------------------------------------------------------------------------------------

def test_penalties_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0, 3.0], [2.0, -1.0, 0.5, 0.0, 3.0]])
    params = [SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25), SamplingParams()]
    out = apply_penalties(logits, params, [[0, 1], [0, 1]], [[2, 2, 4], [2, 2, 4]])
    # token 0, 1: prompt only (2/2, -1*2); 2: output twice (0.5/2 - 2*0.5 - 0.25); 3: unseen; 4: output once
    assert out[0].tolist() == [1.0, -2.0, -1.0, 0.0, 0.75]
    assert out[1].tolist() == logits[1].tolist()
    rewarding = SamplingParams(frequency_penalty=-1.0, presence_penalty=-2.0)
    negative = apply_penalties(logits[:1], [rewarding], [[0]], [[4, 4]])
    assert negative[0].tolist() == [2.0, -1.0, 0.5, 0.0, 3.0 + 2.0 + 2.0]


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31), st.floats(0.1, 5.0))
def test_repetition_penalty_matches_transformers(seed, penalty):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 30, generator=g)
    seen = torch.randint(0, 30, (3, 12), generator=g)
    expected = RepetitionPenaltyLogitsProcessor(penalty)(seen, logits.clone())
    params = [SamplingParams(repetition_penalty=penalty)] * 3
    out = apply_penalties(logits, params, seen[:, :5].tolist(), seen[:, 5:].tolist())
    assert torch.equal(out, expected)


def test_penalties_steer_greedy_and_min_tokens_suppresses_finish_ids():
    logits = torch.tensor([[0.0, 1.0, 0.0, 5.0, 0.0, 4.0, 3.0]])
    greedy = dict(temperature=0.0)
    assert run(logits, [SamplingParams(**greedy)]).token_ids == [3]
    assert run(logits, [SamplingParams(**greedy, presence_penalty=2.0)], output_ids=[[3]]).token_ids == [5]
    assert run(logits, [SamplingParams(**greedy, repetition_penalty=2.0)], prompt_ids=[[3, 5]]).token_ids == [6]
    suppressed = SamplingParams(**greedy, min_tokens=2, stop_token_ids=[5])
    assert run(logits, [suppressed], output_ids=[[1]], eos_ids=[3]).token_ids == [6]
    assert run(logits, [suppressed], output_ids=[[1, 1]], eos_ids=[3]).token_ids == [3]
    overridden = SamplingParams(**greedy, min_tokens=2, end_id=6)
    assert run(logits, [overridden], eos_ids=[3]).token_ids == [3]
    sampled = SamplingParams(temperature=1.0, min_tokens=1, seed=0)
    tokens = run(logits.repeat(300, 1), [sampled] * 300, eos_ids=[{3, 5}] * 300).token_ids
    assert 3 not in tokens and 5 not in tokens


# --- filters --------------------------------------------------------------------------------------

def allowed_sets(logits: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float, tol=1e-4):
    """Tokens that top-k, then top-p, then min-p must keep (strict) and may keep (lenient), from
    the definitions in f64; ties in rank make the boundary ambiguous, hence two sets."""
    x = logits.astype(np.float64) / temperature
    vocab = len(x)
    k = top_k if 0 < top_k < vocab else vocab
    kth = np.sort(x)[::-1][k - 1]
    # the sampler ranks (x - max) / T in f32: values within its rounding of the k-th may tie with it
    slack = 4 * np.finfo(np.float32).eps * (np.abs(logits).max() + 1) / temperature
    in_k, may_be_in_k = x >= kth, x >= kth - slack
    p = np.where(may_be_in_k, np.exp(x - x.max()), 0.0)
    p /= p.sum()
    above = np.array([p[p > q].sum() for q in p])  # mass certainly ranked ahead
    at_or_above = np.array([p[p >= q].sum() - q for q in p])  # mass possibly ranked ahead
    best = x == x.max()
    ratio = p / p.max()
    lenient = may_be_in_k & ((above < top_p + tol) | best) & (ratio >= min_p - tol)
    strict = in_k & (at_or_above < top_p - tol) & (ratio >= min_p + tol)
    return strict, lenient


filter_case = st.tuples(
    st.integers(2, 30).flatmap(lambda v: st.lists(st.floats(-10, 10, width=32), min_size=v, max_size=v)),
    st.sampled_from([0.3, 1.0, 2.5]), st.integers(-1, 12), st.floats(0.05, 1.0), st.sampled_from([0.0, 0.05, 0.3, 0.9]))


@settings(max_examples=120, deadline=None)
@given(filter_case)
def test_filter_logits_keeps_exactly_the_allowed_set(case):
    values, temperature, top_k, top_p, min_p = case
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    x = torch.tensor([values]) / temperature
    kept = (filter_logits(x, [params])[0] > -math.inf).numpy()
    strict, lenient = allowed_sets(np.array(values), temperature, top_k, top_p, min_p)
    assert not (kept & ~lenient).any(), "kept a token outside the allowed set"
    assert not (strict & ~kept).any(), "dropped a token the filters must keep"
    assert kept.any()


@settings(max_examples=15, deadline=None)
@given(filter_case, st.integers(0, 2**32))
@example(([0.0, 1.0, 1e-12], 0.3, 2, 1.0, 0.0), 0)  # 0 and 1e-12 tie in f32 once the max is subtracted
def test_sampling_never_emits_outside_the_allowed_set(case, seed):
    values, temperature, top_k, top_p, min_p = case
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)
    draws = 400
    generators = [request_generator(SamplingParams(seed=(seed + i) % 2**64)) for i in range(draws)]
    tokens = run(torch.tensor([values]).repeat(draws, 1), [params] * draws, generators=generators).token_ids
    _, lenient = allowed_sets(np.array(values), temperature, top_k, top_p, min_p)
    assert all(lenient[t] for t in tokens)


def test_draws_follow_the_filtered_distribution():
    logits = torch.tensor([2.0, 1.5, 0.0, -1.0, 1.0, -3.0])
    params = SamplingParams(temperature=0.8, top_k=4)
    torch.manual_seed(0)
    draws = 40_000
    tokens = torch.tensor(run(logits.repeat(draws, 1), [params] * draws).token_ids)
    expected = torch.where(logits >= 0.0, logits / 0.8, -math.inf).softmax(-1)
    observed = torch.bincount(tokens, minlength=6) / draws
    assert torch.allclose(observed, expected, atol=0.01), (observed, expected)


# --- seeds ----------------------------------------------------------------------------------------

def test_seeded_request_is_reproducible_in_any_batch():
    steps, vocab = 25, 64
    g = torch.Generator().manual_seed(1)
    mine = torch.randn(steps, vocab, generator=g) * 2
    target = SamplingParams(temperature=0.9, top_p=0.9, top_k=40, seed=1234)

    def decode(batch_for_step):
        generator = request_generator(target)
        others_generators = {}
        tokens = []
        for step in range(steps):
            others = batch_for_step(step)
            position = step % (len(others) + 1)
            params = others[:position] + [target] + others[position:]
            gens = [others_generators.setdefault((step, i), request_generator(p)) for i, p in enumerate(params)]
            gens[position] = generator
            logits = torch.randn(len(params), vocab, generator=g)
            logits[position] = mine[step]
            out = run(logits, params, [[1, 2]] * len(params), [tokens] * len(params), gens)
            tokens.append(out.token_ids[position])
        return tokens

    alone = decode(lambda step: [])
    crowd = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.3, seed=5), SamplingParams(top_k=2),
             SamplingParams(temperature=0.7, min_p=0.2, seed=1234)]
    assert decode(lambda step: crowd[: step % 5]) == alone
    assert decode(lambda step: crowd[::-1]) == alone
    other_seed = SamplingParams(temperature=0.9, top_p=0.9, top_k=40, seed=4321)
    generator = request_generator(other_seed)
    different = [run(mine[s:s + 1], [other_seed], generators=[generator]).token_ids[0] for s in range(steps)]
    assert different != alone


# --- beam search --------------------------------------------------------------------------------

@pytest.mark.parametrize("beam_width,num_eos", [(1, 1), (3, 1), (2, 2), (4, 0)])
def test_beam_step_matches_transformers(beam_width, num_eos):
    torch.manual_seed(beam_width)
    vocab, prompt_len = 17, 5
    logprobs = torch.log_softmax(torch.randn(beam_width, vocab) * 2, dim=-1)
    scores = (-torch.rand(beam_width) * 4).tolist()
    keep = max(2, 1 + num_eos) * beam_width
    ours = beam_step(logprobs, scores, beam_width, num_eos=num_eos)
    accumulated = (logprobs + torch.tensor(scores)[:, None]).reshape(1, -1)
    top_scores, sequences, beam_indices = GenerationMixin._get_top_k_continuations(
        GenerationMixin, accumulated_log_probs=accumulated,
        running_sequences=torch.zeros(1, beam_width, prompt_len + 1, dtype=torch.long),
        running_beam_indices=torch.full((1, beam_width, 1), -1, dtype=torch.int32),
        cur_len=prompt_len, decoder_prompt_len=prompt_len, do_sample=False, beams_to_keep=keep,
        num_beams=beam_width, batch_size=1)
    assert [parent for parent, _, _ in ours] == beam_indices[0, :, 0].tolist()
    assert [token for _, token, _ in ours] == sequences[0, :, prompt_len].tolist()
    assert [score for _, _, score in ours] == top_scores[0].tolist()


def test_beam_logprobs_penalise_after_log_softmax():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    params = [SamplingParams(repetition_penalty=2.0)]
    logprobs = torch.log_softmax(logits, dim=-1)
    out = beam_logprobs(logits, params, [[2]], [[]])
    assert torch.equal(out, torch.cat([logprobs[:, :2], logprobs[:, 2:] * 2], dim=1))


def test_length_penalized_score_on_concrete_numbers():
    assert length_penalized_score(-3.2, 4, 1.0) == pytest.approx(-0.8)
    assert length_penalized_score(-3.2, 4, 2.0) == pytest.approx(-0.2)
    assert length_penalized_score(-3.2, 4, 0.0) == pytest.approx(-3.2)
    assert length_penalized_score(-2.0, 4, -0.5) == pytest.approx(-4.0)


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0, -0.7, 1.3])
def test_length_penalized_score_matches_transformers(length_penalty):
    num_beams, prompt_len, cur_len = 2, 3, 9  # the candidate that finishes is generated token number 7
    topk_log_probs = torch.tensor([[-4.123, -5.5, -6.0, -7.25]])
    finished = torch.tensor([[True, False, False, False]])
    _, beam_scores, _, is_finished = GenerationMixin._update_finished_beams(
        GenerationMixin, sequences=torch.zeros(1, num_beams, 12, dtype=torch.long),
        topk_running_sequences=torch.zeros(1, 2 * num_beams, 12, dtype=torch.long),
        beam_scores=torch.full((1, num_beams), -1e9), topk_log_probs=topk_log_probs,
        beam_indices=torch.zeros(1, num_beams, 9, dtype=torch.int32),
        topk_running_beam_indices=torch.zeros(1, 2 * num_beams, 9, dtype=torch.int32),
        is_early_stop_heuristic_unsatisfied=torch.ones(1, 1, dtype=torch.bool),
        is_sent_finished=torch.zeros(1, num_beams, dtype=torch.bool),
        next_token_hits_stopping_criteria=finished, top_num_beam_mask=torch.tensor([True, True, False, False]),
        num_beams=num_beams, cur_len=cur_len, decoder_prompt_len=prompt_len, length_penalty=length_penalty,
        early_stopping=False)
    assert is_finished[0, 0]
    assert beam_scores[0, 0].item() == length_penalized_score(-4.123, cur_len + 1 - prompt_len, length_penalty)


@pytest.fixture(scope="module")
def tiny_llama():
    import transformers

    config = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, bos_token_id=1, pad_token_id=3)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


# eos ids that this model emits mid-way (17, 30, 22), or never (2, 28): hypotheses finish early or at the length limit
@pytest.mark.parametrize("width,length_penalty,early_stopping,new,repetition,eos", [
    (3, 1.0, False, 8, 1.0, [2]), (3, 1.0, False, 10, 1.0, [17]), (3, 1.0, True, 10, 1.0, [30]),
    (2, 0.0, False, 10, 1.0, [17, 22]), (2, 2.0, True, 8, 1.3, [7]), (3, -1.0, False, 8, 1.2, [28]),
])
@torch.no_grad()
def test_beam_search_matches_transformers_generate(tiny_llama, width, length_penalty, early_stopping, new,
                                                   repetition, eos):
    prompt = [1, 5, 9, 13]
    params = SamplingParams(use_beam_search=True, beam_width=width, n=width, length_penalty=length_penalty,
                            early_stopping=early_stopping, max_tokens=new, repetition_penalty=repetition)
    search = BeamSearch(prompt, params, params.finish_ids(eos), max_length=len(prompt) + new)
    while not search.done:
        logits = tiny_llama(torch.tensor(search.beams)).logits[:, -1]
        rows = len(search.beams)
        search.step(beam_logprobs(logits, [params] * rows, [prompt] * rows, [b[len(prompt):] for b in search.beams]))
    expected = tiny_llama.generate(
        torch.tensor([prompt]), num_beams=width, num_return_sequences=width, length_penalty=length_penalty,
        early_stopping=early_stopping, max_new_tokens=new, do_sample=False, repetition_penalty=repetition,
        eos_token_id=eos, output_scores=True, return_dict_in_generate=True, use_cache=False)  # same arithmetic as ours
    best = search.best(width)
    assert [score for score, _ in best] == expected.sequences_scores.tolist()
    padded = [tokens + [3] * (expected.sequences.shape[1] - len(prompt) - len(tokens)) for _, tokens in best]
    assert padded == expected.sequences[:, len(prompt):].tolist()
