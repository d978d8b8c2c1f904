"""Tensor-parallel serving in real processes (gloo, 2 ranks): LLM(..., tensor_parallel_size=2)
gives one rank's greedy tokens (a tiny GQA model whose 3 KV heads do not divide by 2, and
SmolLM2), each rank loads only its shard, a rank that raises or dies ends the job with an error
that names it, and no worker outlives the job or its rank 0."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import transformers as tf
from kiln.api import compile as kiln_compile
from kiln.runtime.config import BuildConfig, KvCacheConfig
from kiln.runtime.distributed import RankError, Ranks
from kiln.runtime.llm import LLM
from kiln.runtime.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
TINY = {"vocab_size": 128, "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 6, "num_key_value_heads": 3, "max_position_embeddings": 256}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    tf.LlamaForCausalLM(tf.LlamaConfig(**TINY)).eval().save_pretrained(path)
    return path, kiln_compile(path, target="reference", progress=False)


def serve(model, tp, **options):
    return LLM(model, skip_tokenizer_init=True, kv_cache_config=KvCacheConfig(max_tokens=128),
               build_config=BuildConfig(max_num_tokens=16, max_batch_size=4), tensor_parallel_size=tp, **options)


def greedy(llm, prompts):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"   # a zombie has exited


def test_tiny_model_greedy_tokens_match_one_rank(tiny):
    path, model = tiny
    prompts = [[1, 5, 9, 77, 3], [2, 8], list(range(10, 40)), [100] * 7]   # prefill in chunks, decode batched
    with serve(model, 1) as one:
        want = greedy(one, prompts)
    with serve(model, 2) as two:
        assert greedy(two, prompts) == want
        assert [r["kv_heads"] for r in two.parallel.loaded] == [2, 1]   # whole KV groups: 2 and 1 of 3
        assert two.engine.caches[0].shape[2] == 2                       # rank 0's pool holds its heads only
        assert not hasattr(two.engine.executable, "capture_decode")     # the reference backend captures nothing
        total = os.path.getsize(path / "model.safetensors")
        reads = [r["bytes_read"] for r in two.parallel.loaded]
        assert all(0.3 * total < r < 0.56 * total for r in reads), (reads, total)
        assert two.parallel.all_reduce_seconds(4096, iters=5) > 0
        pids = two.parallel.ranks.pids
    assert not any(alive(p) for p in pids)   # closed: the worker is gone
    two.close()                              # and closing twice is harmless


def test_smollm2_greedy_tokens_match_one_rank(smollm2):
    graph, _, tokenizer = smollm2
    model = kiln_compile(graph.clone(), target="reference", progress=False)
    prompts = [tokenizer(p)["input_ids"] for p in ("The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,")]
    with serve(model, 1) as one:
        want = greedy(one, prompts)
    with serve(model, 2) as two:
        assert greedy(two, prompts) == want


def test_a_killed_worker_ends_the_job_with_an_error_naming_it(tiny):
    _, model = tiny
    llm = serve(model, 2)
    try:
        running = llm.generate_async([1, 2, 3], SamplingParams(max_tokens=10_000, ignore_eos=True, temperature=0.0))
        time.sleep(0.5)
        os.kill(llm.parallel.ranks.pids[0], signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(RankError, match="rank 1 of 2 failed: was killed by SIGKILL; the job has stopped"):
            running.result(timeout=30)
        assert time.monotonic() - start < 5
        with pytest.raises(RankError, match="rank 1 of 2 failed: was killed by SIGKILL"):  # and stays ended
            llm.generate([4, 5], GREEDY, use_tqdm=False)
    finally:
        llm.close()


def _raise_on_rank_1(state):
    if state.rank == 1:
        raise ValueError("no weights here")
    return state.rank


def _exit_on_rank_1(state):
    if state.rank == 1:
        os._exit(7)
    time.sleep(0.2)
    return state.rank


def test_a_worker_error_or_exit_names_the_rank():
    ranks = Ranks(2)
    try:
        assert ranks.call(lambda_free_rank) == [0, 1]
        with pytest.raises(RankError, match="rank 1 of 2: ValueError: no weights here"):
            ranks.call(_raise_on_rank_1)
        assert ranks.call(lambda_free_rank) == [0, 1]   # an error in a call leaves the job running
        with pytest.raises(RankError, match="rank 1 of 2 failed: exited with code 7"):
            ranks.call(_exit_on_rank_1)
    finally:
        ranks.close()


def lambda_free_rank(state):
    return state.rank


def _all_reduce_on_rank(state, mode):
    from kiln.backends.all_reduce import AllReduce

    reduce = AllReduce.for_job(torch.device("cpu"), mode)
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)[:, :2] * (state.rank + 1)  # strided, like a slice
    return reduce.route, reduce(x), reduce(x, "max"), x


@pytest.mark.parametrize("mode", ["auto", "nccl"])
def test_the_cuda_backends_all_reduce_sums_across_ranks_on_cpu(mode):
    """Off the GPU (gloo) every route is the process group's all-reduce; the input is left as it was."""
    ranks = Ranks(2)
    try:
        (route, total, top, x), _ = ranks.call(_all_reduce_on_rank, mode)
    finally:
        ranks.close()
    base = torch.tensor([[0.0, 1.0], [3.0, 4.0]])
    assert route == "gloo"
    torch.testing.assert_close(total, base * 3, rtol=0, atol=0)
    torch.testing.assert_close(top, base * 2, rtol=0, atol=0)
    torch.testing.assert_close(x, base, rtol=0, atol=0)


ORPHAN = """
import os
from kiln.runtime.distributed import Ranks

if __name__ == "__main__":
    ranks = Ranks(2)
    print(ranks.pids[0], flush=True)
    os.kill(os.getpid(), 9)
"""


def test_workers_exit_when_rank_0_dies(tmp_path):
    script = tmp_path / "orphan.py"
    script.write_text(textwrap.dedent(ORPHAN))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == -9, out.stderr[-2000:]
    worker = int(out.stdout.split()[-1])
    deadline = time.monotonic() + 10
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(worker)
