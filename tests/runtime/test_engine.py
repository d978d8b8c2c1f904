"""The engine's overlapped steps (greedy tokens left on the device, read one step later) give exactly
what synchronous steps give, on SmolLM2 with its tokenizer: EOS and stop strings that end a sequence
while its next step is already launched, preemption, aborts, and sampled or logprob requests mixed in."""

import pytest
from kiln.api import compile as kiln_compile
from kiln.runtime.config import BuildConfig, KvCacheConfig
from kiln.runtime.engine import Engine
from kiln.runtime.sampling import SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,", "Water boils at a temperature of",
           "Once upon a time, in a land far away, there lived a dragon who loved to read", "import numpy as np\n"]


@pytest.fixture(scope="module")
def smol(smollm2):
    graph, _, tokenizer = smollm2
    return kiln_compile(graph.clone()), tokenizer


def serve(smol, overlap: bool, requests, abort_after: dict[str, int] | None = None, max_tokens: int = 32):
    """Run `requests` (id, prompt, params) to the end; the final outputs by id, and the engine."""
    compiled, tokenizer = smol
    engine = Engine(compiled.graph, compiled.executable(), tokenizer=tokenizer, overlap=overlap,
                    kv_cache_config=KvCacheConfig(max_tokens=max_tokens),  # small: sequences are preempted
                    build_config=BuildConfig(max_batch_size=4, max_num_tokens=32), eos_token_ids=[0])
    for rid, prompt, params in requests:
        engine.add_request(rid, tokenizer(prompt)["input_ids"], params, prompt=prompt)
    final, seen = {}, {}
    while engine.has_work:
        for out in engine.step():
            seen[out.request_id] = seen.get(out.request_id, 0) + 1
            if out.finished:
                final[out.request_id] = out
            if abort_after and seen[out.request_id] == abort_after.get(out.request_id):
                engine.abort(out.request_id)
    return final, engine


def assert_same(got, want, rid):
    """Same tokens, text and reasons; logprobs alike (batches that differ, by another preemption, round differently)."""
    for g, w in zip(got.outputs, want.outputs, strict=True):
        assert (g.token_ids, g.text, g.finish_reason, g.stop_reason) == (w.token_ids, w.text, w.finish_reason,
                                                                          w.stop_reason), rid
        assert (g.cumulative_logprob is None) == (w.cumulative_logprob is None), rid
        assert g.cumulative_logprob is None or abs(g.cumulative_logprob - w.cumulative_logprob) < 1e-3, rid
        assert_close_logprobs(g.logprobs, w.logprobs, rid)
    assert_close_logprobs(got.prompt_logprobs, want.prompt_logprobs, rid)


def assert_close_logprobs(got, want, rid):
    assert (got is None) == (want is None), rid
    for g, w in zip(got or [], want or [], strict=True):
        assert (g is None) == (w is None) and (g is None or g.keys() == w.keys()), rid
        assert g is None or all(abs(g[k] - w[k]) < 1e-3 for k in g), rid


def test_overlapped_steps_equal_synchronous_steps(smol):
    _, tokenizer = smol
    plain, _ = serve(smol, False, [(str(i), p, SamplingParams(max_tokens=12, temperature=0.0))
                                   for i, p in enumerate(PROMPTS)])
    # end sequences early, mid-flight: by an end id that greedy decoding reaches, and by a stop string
    end_id = plain["0"].outputs[0].token_ids[3]
    stop = tokenizer.decode(plain["1"].outputs[0].token_ids[4:6])
    requests = [("end", PROMPTS[0], SamplingParams(max_tokens=12, temperature=0.0, end_id=end_id)),
                ("stop", PROMPTS[1], SamplingParams(max_tokens=12, temperature=0.0, stop=stop)),
                ("long", PROMPTS[2], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)),
                ("sampled", PROMPTS[3], SamplingParams(max_tokens=10, temperature=0.8, seed=3, n=2)),
                ("logprobs", PROMPTS[4], SamplingParams(max_tokens=6, temperature=0.0, logprobs=2, prompt_logprobs=1)),
                ("aborted", PROMPTS[5], SamplingParams(max_tokens=12, temperature=0.0)),
                ("min", PROMPTS[0], SamplingParams(max_tokens=8, temperature=0.0, min_tokens=6, end_id=end_id))]
    sync, sync_engine = serve(smol, False, requests, {"aborted": 3})
    overlapped, engine = serve(smol, True, requests, {"aborted": 3})
    assert set(sync) == set(overlapped) == {r[0] for r in requests} - {"aborted"}
    for rid in sync:
        assert_same(overlapped[rid], sync[rid], rid)
    ended = sync["end"].outputs[0]
    assert ended.finish_reason == "stop" and ended.token_ids[-1] == end_id and len(ended.token_ids) <= 4
    assert sync["stop"].outputs[0].stop_reason == stop
    assert engine.scheduler.preemptions > 0, (engine.scheduler.preemptions, sync_engine.scheduler.preemptions)
    engine.pool.check()
    assert all(r == 0 for r in engine.pool.refs) and not engine.requests and engine._pending is None


def test_overlap_leaves_greedy_tokens_pending(smol):
    """The overlapped engine really defers: its greedy steps return the step before's tokens."""
    requests = [(str(i), p, SamplingParams(max_tokens=5, temperature=0.0)) for i, p in enumerate(PROMPTS[:2])]
    compiled, tokenizer = smol
    engine = Engine(compiled.graph, compiled.executable(), tokenizer=tokenizer, overlap=True)
    for rid, prompt, params in requests:
        engine.add_request(rid, tokenizer(prompt)["input_ids"], params)
    assert engine.step() == []         # the prefill step: its first tokens are still pending
    assert engine._pending is not None
    first = engine.step()              # launches the second token, reads the first
    assert sorted(len(o.outputs[0].token_ids) for o in first) == [1, 1]
    steps = 2
    while engine.has_work:
        engine.step()
        steps += 1
    assert steps == 6                  # 5 tokens, plus the step that reads the last


def test_unstreamed_requests_are_reported_once_finished(smol):
    """stream=False (vLLM's FINAL_ONLY): no output until the request ends, then the same one."""
    compiled, tokenizer = smol
    results = {}
    for stream in (True, False):
        engine = Engine(compiled.graph, compiled.executable(), tokenizer=tokenizer, overlap=True)
        for i, prompt in enumerate(PROMPTS[:3]):
            engine.add_request(str(i), tokenizer(prompt)["input_ids"], SamplingParams(max_tokens=4 + i, temperature=0.0),
                               stream=stream)
        seen = []
        while engine.has_work:
            seen += engine.step()
        results[stream] = seen
    assert len(results[False]) == 3 and all(o.finished for o in results[False])
    assert len(results[True]) > 3
    final = {o.request_id: o.outputs[0].token_ids for o in results[True] if o.finished}
    assert {o.request_id: o.outputs[0].token_ids for o in results[False]} == final


def test_unseeded_sampling_overlaps_and_draws_as_synchronous_steps(smol):
    """Temperature, top-k/top-p draws without a seed are made on the device too (and so overlap);
    from the same default generator state they draw the same tokens as synchronous steps."""
    import torch

    params = [SamplingParams(max_tokens=10, temperature=0.9, top_k=40, top_p=0.9, ignore_eos=True),
              SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=9, temperature=1.3, min_p=0.05, ignore_eos=True)]
    requests = [(str(i), prompt, p) for i, (prompt, p) in enumerate(zip(PROMPTS, params))]
    torch.manual_seed(7)
    sync, _ = serve(smol, False, requests, max_tokens=2048)
    torch.manual_seed(7)
    overlapped, engine = serve(smol, True, requests, max_tokens=2048)
    for rid in sync:
        assert_same(overlapped[rid], sync[rid], rid)
    torch.manual_seed(8)
    other, _ = serve(smol, True, requests, max_tokens=2048)
    assert any(other[r].outputs[0].token_ids != sync[r].outputs[0].token_ids for r in ("0", "2"))
    compiled, tokenizer = smol
    engine = Engine(compiled.graph, compiled.executable(), tokenizer=tokenizer, overlap=True)
    for rid, prompt, p in requests:
        engine.add_request(rid, tokenizer(prompt)["input_ids"], p)
    assert engine.step() == [] and engine._pending is not None  # the draws were left on the device


def test_a_step_that_fails_to_launch_keeps_the_pending_tokens(smol):
    """An executable that raises once: the step fails, and the next steps read the pending tokens and
    finish every request as an engine that never failed."""
    compiled, tokenizer = smol
    runs = []
    for fail in (False, True):
        exe, calls = compiled.executable(), [0]

        def flaky(*args, _exe=exe, **kwargs):
            calls[0] += 1
            if fail and calls[0] == 3:
                raise RuntimeError("launch failed")
            return _exe(*args, **kwargs)

        engine = Engine(compiled.graph, flaky, tokenizer=tokenizer, overlap=True)
        for i, prompt in enumerate(PROMPTS[:2]):
            engine.add_request(str(i), tokenizer(prompt)["input_ids"], SamplingParams(max_tokens=5, temperature=0.0))
        done = {}
        while engine.has_work:
            try:
                outs = engine.step()
            except RuntimeError:
                assert fail and engine._pending is not None
                continue
            done.update({o.request_id: o.outputs[0].token_ids for o in outs if o.finished})
        runs.append(done)
    assert runs[0] == runs[1] and len(runs[0]) == 2


def test_wait_for_polls_the_health_check_until_the_device_is_done(monkeypatch):
    """The wait that tensor parallelism relies on when a peer dies (no CUDA here: an event that
    stands in for one, done after a few queries or never)."""
    from kiln.runtime.engine import wait_for

    class Event:
        def __init__(self, done_after):
            self.queries, self.done_after = 0, done_after

        def query(self):
            self.queries += 1
            return self.queries > self.done_after

    checks = []
    wait_for(Event(3), lambda: checks.append(1))
    assert len(checks) == 3

    def dead():
        if len(checks) > 5:
            raise RuntimeError("rank 1 of 2 failed")
        checks.append(1)

    with pytest.raises(RuntimeError, match="rank 1 of 2 failed"):
        wait_for(Event(10**9), dead)

    class Faulted(Event):  # the device fails under the step (a dead peer's memory read in a collective)
        def query(self):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    checks.clear()  # the health check names the failure once its watchdog has seen it
    monkeypatch.setattr("kiln.runtime.engine.FAILURE_GRACE_S", 0.2)
    with pytest.raises(RuntimeError, match="rank 1 of 2 failed"):
        wait_for(Faulted(0), dead)
    with pytest.raises(RuntimeError, match="illegal memory access"):  # not a rank's failure: the device's error
        wait_for(Faulted(0), lambda: None)


def test_aborting_a_request_whose_last_token_is_pending_finishes_it(smol):
    compiled, tokenizer = smol
    engine = Engine(compiled.graph, compiled.executable(), tokenizer=tokenizer, overlap=True)
    seen = []
    engine.add_request("0", tokenizer(PROMPTS[0])["input_ids"], SamplingParams(max_tokens=2, temperature=0.0),
                       on_update=seen.append)
    engine.step()                       # prefill: token 1 pending
    engine.step()                       # token 1 read, token 2 (the last) launched and pending
    assert engine._pending is not None and not seen[-1].finished
    engine.abort("0")
    assert seen[-1].finished and seen[-1].outputs[0].finish_reason == "abort"
    while engine.has_work:
        assert engine.step() == []      # the pending token belongs to no request now
    engine.pool.check()
    assert all(r == 0 for r in engine.pool.refs)
