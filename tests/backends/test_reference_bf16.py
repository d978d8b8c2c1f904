"""SmolLM2 in bf16: the reference backend rounds where transformers' Llama rounds (RMSNorm, rope,
SDPA's probabilities, SwiGLU, residual adds, bf16 logits), so its logits are transformers' own on
varied prompts (the `smollm2_prompts` fixture), and so are its greedy choices. tests/backends/test_cuda.py
checks the cuda backend against transformers on a GPU with the same prompts."""

import copy
import itertools

import kiln
import torch


def packed_logits(compiled, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Every position's logits for all prompts, prefilled together in one step of the serving graph."""
    graph = compiled.graph
    block = graph.inputs[7].type.shape[1]
    counts = [-(-len(p) // block) for p in prompts]
    first = [sum(counts[:i]) for i in range(len(prompts))]
    i32, i64 = {"dtype": torch.int32}, {"dtype": torch.int64}
    slots = torch.cat([torch.arange(len(p), **i64) + b * block for p, b in zip(prompts, first)])
    tables = torch.zeros(len(prompts), max(counts), **i32)
    for row, (b, n) in enumerate(zip(first, counts)):
        tables[row, :n] = torch.arange(b, b + n, **i32)
    lengths = torch.tensor([len(p) for p in prompts], **i32)
    starts = torch.cat([torch.zeros(1, **i32), lengths.cumsum(0).to(torch.int32)])
    total = int(starts[-1])
    positions = torch.cat([torch.arange(len(p), **i32) for p in prompts])
    tokens = torch.tensor(list(itertools.chain(*prompts)), **i32)
    meta = [tokens, positions, slots, tables, lengths, starts, torch.arange(total, **i64)]
    caches = [torch.zeros(sum(counts), block, *v.type.shape[2:], dtype=v.type.dtype.torch) for v in graph.inputs[7:]]
    with torch.no_grad():
        logits = compiled.executable()(*meta, *caches)[0]
    return list(logits.split(lengths.tolist()))


def test_smollm2_bf16_reference_gives_transformers_logits(smollm2, smollm2_prompts):
    _, hf32, tok = smollm2
    hf = copy.deepcopy(hf32).to(torch.bfloat16)
    compiled = kiln.compile(hf, target="reference", progress=False, device="cpu")
    assert compiled.dtype == "bf16"
    ids = [tok(t)["input_ids"] for t in smollm2_prompts[:16]]  # half the list keeps this under a minute
    got = packed_logits(compiled, ids)
    with torch.no_grad():
        want = [hf(torch.tensor([p])).logits[0] for p in ids]
    exact = sum(torch.equal(g, w) for g, w in zip(got, want))
    same_argmax = [(g.argmax(-1) == w.argmax(-1)).float().mean().item() for g, w in zip(got, want)]
    positions = sum(len(p) for p in ids)
    agree = sum(f * len(p) for f, p in zip(same_argmax, ids))
    worst = max((g.float() - w.float()).abs().max().item() for g, w in zip(got, want))
    print(f"\nSmolLM2 bf16, reference vs transformers on {len(ids)} prompts: logits bit-identical on {exact}; "
          f"argmax equal at {agree:.0f}/{positions} positions; max |logit difference| {worst:.3f}")
    assert agree >= 0.97 * positions
    assert exact > len(ids) // 2
