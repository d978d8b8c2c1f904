"""The scheduler and block manager under arbitrary traffic (hypothesis): arrivals, prompt and
output lengths, shared prefixes, cancellations and pool sizes never leak or double-free a block,
never exceed the token budget or batch size, and every request finishes."""

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.runtime.blocks import BlockPool, block_hashes
from kiln.runtime.scheduler import Scheduler, Sequence, Status


@st.composite
def traffic(draw):
    block = draw(st.sampled_from([1, 2, 4, 16]))
    longest = draw(st.integers(2, 40))
    requests = draw(st.lists(st.tuples(st.integers(1, longest), st.integers(1, 12), st.integers(0, 6),
                                       st.booleans(), st.floats(0, 1)), min_size=1, max_size=12))
    # the pool must hold the largest single request, or it could never run
    need = max(-(-(p + o) // block) for p, o, *_ in requests)
    return dict(block=block, requests=requests, num_blocks=draw(st.integers(need, need + 12)),
                budget=draw(st.integers(1, 64)), batch=draw(st.integers(1, 8)), reuse=draw(st.booleans()),
                seed=draw(st.integers(0, 2**16)))


@settings(max_examples=150, deadline=None)
@given(traffic())
def test_scheduler_never_leaks_and_finishes_everything(t):
    rng = random.Random(t["seed"])
    pool = BlockPool(t["num_blocks"], t["block"], t["reuse"])
    sched = Scheduler(pool, max_batch_size=t["batch"], max_num_tokens=t["budget"])
    shared = [rng.randrange(50) for _ in range(40)]  # a common prefix some prompts start with
    pending = []
    for prompt_len, out_len, arrival, share, cancel_at in t["requests"]:
        prompt = (shared[:prompt_len] if share else [rng.randrange(50) for _ in range(prompt_len)])
        pending.append((arrival, Sequence(prompt), out_len, cancel_at))
    pending.sort(key=lambda r: r[0])
    live, done, step = {}, 0, 0
    while pending or sched.has_work:
        while pending and pending[0][0] <= step:
            _, seq, out_len, cancel_at = pending.pop(0)
            sched.add(seq)
            live[seq.seq_id] = (seq, out_len, cancel_at)
        batch = sched.schedule()
        assert sum(s.num_tokens for s in batch) <= t["budget"] and len(batch) <= t["batch"]
        assert len({id(s.seq) for s in batch}) == len(batch)
        for s in batch:
            assert s.num_tokens >= 1 and s.start + s.num_tokens <= len(s.seq)
            assert len(s.seq.blocks) * t["block"] >= s.start + s.num_tokens
            # blocks named for a prefix hold exactly those tokens
            for h, b in zip(block_hashes(s.seq.token_ids[:s.start], t["block"]), s.seq.blocks):
                assert pool._hash_of.get(b, h) == h
        sched.advance(batch)
        for s in batch:
            seq, out_len, cancel_at = live[s.seq.seq_id]
            if s.produces_logits:
                seq.output_ids.append(rng.randrange(50))
                if len(seq.output_ids) >= out_len:
                    sched.finish(seq)
        for seq_id, (seq, out_len, cancel_at) in list(live.items()):
            if seq.status is Status.FINISHED:
                del live[seq_id]
                done += 1
            elif cancel_at < 0.1 and rng.random() < 0.2:  # some requests are cancelled mid-flight
                sched.finish(seq)
                del live[seq_id]
                done += 1
        pool.check()
        step += 1
        assert step < 5000, "the scheduler stopped making progress"
    assert done == len(t["requests"])
    assert all(r == 0 for r in pool.refs) and pool.num_free == t["num_blocks"]
    pool.check()


def test_prefix_blocks_are_shared_and_survive_until_evicted():
    pool = BlockPool(4, 2)
    sched = Scheduler(pool, max_batch_size=4, max_num_tokens=100)
    first = Sequence([1, 2, 3, 4, 5])
    sched.add(first)
    sched.advance(sched.schedule())
    sched.finish(first)                          # its two full blocks stay cached
    second = Sequence([1, 2, 3, 4, 9, 9])
    sched.add(second)
    (s,) = sched.schedule()
    assert s.start == 4 and s.num_tokens == 2    # only the new tokens are computed
    assert second.blocks[:2] == first_blocks(pool)
    pool.check()


def first_blocks(pool):
    return [pool._by_hash[h] for h in block_hashes([1, 2, 3, 4], 2)]
