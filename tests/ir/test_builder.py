"""The Builder: one Llama decoder block written by hand and checked against a plain-torch
implementation of transformers' Llama formulas, and the `b.dialect.op(...)` namespace."""

import pytest
import torch

from kiln.backends import reference
from kiln.ir import Builder, OpError, TensorStorage, f32, i64, parse, print_graph, verify

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, EPS = 64, 4, 2, 16, 128, 1e-5


@pytest.fixture(scope="module")
def weights():
    g = torch.Generator().manual_seed(7)
    w = {
        "input_layernorm.weight": 1 + 0.1 * torch.randn(HIDDEN, generator=g),
        "self_attn.q_proj.weight": torch.randn(HEADS * HEAD_DIM, HIDDEN, generator=g) / HIDDEN ** 0.5,
        "self_attn.k_proj.weight": torch.randn(KV_HEADS * HEAD_DIM, HIDDEN, generator=g) / HIDDEN ** 0.5,
        "self_attn.v_proj.weight": torch.randn(KV_HEADS * HEAD_DIM, HIDDEN, generator=g) / HIDDEN ** 0.5,
        "self_attn.o_proj.weight": torch.randn(HIDDEN, HEADS * HEAD_DIM, generator=g) / HIDDEN ** 0.5,
        "post_attention_layernorm.weight": 1 + 0.1 * torch.randn(HIDDEN, generator=g),
        "mlp.gate_proj.weight": torch.randn(INTER, HIDDEN, generator=g) / HIDDEN ** 0.5,
        "mlp.up_proj.weight": torch.randn(INTER, HIDDEN, generator=g) / HIDDEN ** 0.5,
        "mlp.down_proj.weight": torch.randn(HIDDEN, INTER, generator=g) / INTER ** 0.5,
    }
    w["rotary_emb.inv_freq"] = 1.0 / (10000.0 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
    return w


def build_block(weights):
    b = Builder(name="llama_block")
    x = b.input("hidden_states", f32["B", "S", HIDDEN])
    pos = b.input("position_ids", i64["B", "S"])
    p = {name: b.param(f"model.layers.0.{name}", storage=TensorStorage(t)) for name, t in weights.items()}

    h = b.llm.rms_norm(x, p["input_layernorm.weight"], eps=EPS, loc="model.layers.0.input_layernorm")

    def heads(name, n):
        y = b.llm.linear(h, p[f"self_attn.{name}_proj.weight"], loc=f"model.layers.0.self_attn.{name}_proj")
        return b.core.reshape(y, shape=["B", "S", n, HEAD_DIM])          # [B,S,H,D]

    q, k, v = heads("q", HEADS), heads("k", KV_HEADS), heads("v", KV_HEADS)
    q = b.llm.rope(q, pos, p["rotary_emb.inv_freq"])
    k = b.llm.rope(k, pos, p["rotary_emb.inv_freq"])
    q, k, v = (b.core.permute(t, dims=[0, 2, 1, 3]) for t in (q, k, v))  # [B,H,S,D]
    a = b.llm.attention(q, k, v, causal=True)
    a = b.core.reshape(b.core.permute(a, dims=[0, 2, 1, 3]), shape=["B", "S", -1])
    x = b.core.add(x, b.llm.linear(a, p["self_attn.o_proj.weight"]))

    h = b.llm.rms_norm(x, p["post_attention_layernorm.weight"], eps=EPS)
    gate = b.llm.linear(h, p["mlp.gate_proj.weight"])
    up = b.llm.linear(h, p["mlp.up_proj.weight"])
    down = b.llm.linear(b.llm.silu_mul(gate, up), p["mlp.down_proj.weight"])
    return b.build(b.core.add(x, down))


# --- transformers' Llama, written out in plain torch ---------------------------------------

def _rms_norm(x, weight):
    var = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(var + EPS)).to(x.dtype)


def _rotate_half(x):
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)


def torch_llama_block(x, position_ids, w):
    B, S, _ = x.shape
    residual = x
    h = _rms_norm(x, w["input_layernorm.weight"])
    q = (h @ w["self_attn.q_proj.weight"].T).view(B, S, HEADS, HEAD_DIM).transpose(1, 2)
    k = (h @ w["self_attn.k_proj.weight"].T).view(B, S, KV_HEADS, HEAD_DIM).transpose(1, 2)
    v = (h @ w["self_attn.v_proj.weight"].T).view(B, S, KV_HEADS, HEAD_DIM).transpose(1, 2)
    # LlamaRotaryEmbedding.forward
    inv_freq = w["rotary_emb.inv_freq"][None, :, None].float().expand(B, -1, 1)
    freqs = (inv_freq @ position_ids[:, None, :].float()).transpose(1, 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]                    # unsqueeze_dim=1
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    # repeat_kv
    n_rep = HEADS // KV_HEADS
    k = k[:, :, None].expand(B, KV_HEADS, n_rep, S, HEAD_DIM).reshape(B, HEADS, S, HEAD_DIM)
    v = v[:, :, None].expand(B, KV_HEADS, n_rep, S, HEAD_DIM).reshape(B, HEADS, S, HEAD_DIM)
    # eager_attention_forward with a causal mask
    scores = q @ k.transpose(2, 3) * HEAD_DIM ** -0.5
    scores = scores + torch.full((S, S), float("-inf")).triu(1)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    a = (probs @ v).transpose(1, 2).reshape(B, S, -1)
    x = residual + a @ w["self_attn.o_proj.weight"].T
    h = _rms_norm(x, w["post_attention_layernorm.weight"])
    gate, up = h @ w["mlp.gate_proj.weight"].T, h @ w["mlp.up_proj.weight"].T
    return x + (torch.nn.functional.silu(gate) * up) @ w["mlp.down_proj.weight"].T


@pytest.mark.parametrize("batch, seq", [(2, 7), (1, 1), (3, 12)])
def test_llama_block_matches_transformers_formulas(weights, batch, seq):
    g = build_block(weights)
    gen = torch.Generator().manual_seed(batch * 100 + seq)
    x = torch.randn(batch, seq, HIDDEN, generator=gen)
    pos = torch.randint(0, 4096, (batch, seq), generator=gen)
    (out,) = reference.run(g, x, pos)
    assert out.shape == (batch, seq, HIDDEN)
    torch.testing.assert_close(out, torch_llama_block(x, pos, weights), atol=1e-5, rtol=1e-5)


def test_llama_block_graph_shape_and_text(weights):
    g = build_block(weights)
    assert [str(v.type) for v in g.inputs] == ["f32[B,S,64]", "i64[B,S]"]
    assert str(g.outputs[0].type) == "f32[B,S,64]"
    assert g.op_counts()["llm.linear"] == 7 and g.op_counts()["llm.rope"] == 2
    attention = next(op for op in g.ops if op.name == "llm.attention")
    assert [str(v.type) for v in attention.operands] == ["f32[B,4,S,16]", "f32[B,2,S,16]", "f32[B,2,S,16]"]
    assert g.ops[0].loc == "model.layers.0.input_layernorm"
    assert g.params["model.layers.0.mlp.down_proj.weight"].type == f32[HIDDEN, INTER]
    text = print_graph(g)
    assert print_graph(parse(text)) == text


# --- the dialect namespace -----------------------------------------------------------------

def test_dialect_namespace_builds_the_named_op():
    b = Builder()
    x = b.input("x", f32["T", 4])
    y = b.core.add(x, x)
    z = b.op("core.mul", y, x)
    assert y.op.name == "core.add" and y.type == f32["T", 4]
    assert z.op.operands == (y, x)
    assert "RMSNorm" in b.llm.rms_norm.__doc__ and b.llm.rms_norm.__name__ == "rms_norm"
    assert print_graph(b.build(z)).splitlines()[1:3] == ["  %0 = core.add(%x, %x) : f32[T,4]",
                                                          "  %1 = core.mul(%0, %x) : f32[T,4]"]


def test_unknown_dialect_and_op_raise_attribute_errors():
    b = Builder()
    with pytest.raises(AttributeError, match=r"no dialect 'nn'; known: core, dist, llm, quant"):
        b.nn
    with pytest.raises(AttributeError, match=r"unknown op 'core.nope'"):
        b.core.nope
    with pytest.raises(AttributeError, match=r"did you mean llm.linear"):
        b.core.linear
    assert not hasattr(b.core, "nope") and hasattr(b.core, "add") and not hasattr(b, "nn")


def test_builder_errors_fail_on_the_line_that_made_them():
    b = Builder()
    x = b.input("x", f32["T", 4])
    with pytest.raises(TypeError, match=r"core.add: operand 1 is float, not a Value"):
        b.core.add(x, 1.0)
    with pytest.raises(OpError, match=r"core.matmul: operands need rank >= 2"):
        b.core.matmul(x, b.input("v", f32[4]))
    with pytest.raises(ValueError, match="already defined"):
        b.input("x", f32[1])
    assert b.graph.ops == []


def test_builder_inserts_before_an_op_with_a_location():
    b = Builder()
    x = b.input("x", f32["T", 4])
    last = b.core.exp(x).op
    g = b.build(last.result)
    ins = Builder(g, before=last, loc="rewrite")
    neg = ins.core.neg(x)
    g.set_operands(last, [neg])
    verify(g)
    assert [op.name for op in g.ops] == ["core.neg", "core.exp"] and g.ops[0].loc == "rewrite"
    assert ins.constant(2, "f32", ("T",)).type == f32["T"]
