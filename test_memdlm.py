"""The core: model, MDLM loss, MemDLM inner loop, training. CPU, tiny models, seconds."""
import io
import json
import math
import os
import time

import pytest
import torch
import torch.nn.functional as F

import model
import train
from data.tokenizer import get_encoding
from memory import (MemoryConfig, Rows, State, adapt, bernoulli_anchor, clip_per_sequence, extend_mask, flat,
                    init_fast, inner_loop, inner_loss, inner_step, memdlm_loss, memory_layers, pre_anchor_count, trajectory,
                    unflat)
from model import DiffusionLM, FastWeights, ModelConfig, forward_process, load_model, masked_ce, mdlm_loss

MASK = 257


def tiny(n_layer=2, dtype=torch.float32, seed=0, **cfg):
    torch.manual_seed(seed)
    return DiffusionLM(ModelConfig(n_layer=n_layer, n_head=2, n_embd=32, **cfg)).to(dtype)


def tokens(B=2, T=16, seed=1):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


def logits(model, x, **kw):
    return model.logits(model(x, **kw))


# ---- model ------------------------------------------------------------------------------

def test_bidirectional_attention():
    m, x = tiny(), tokens(1)
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % 256  # change the last token only
    assert not torch.allclose(logits(m, x)[0, 0], logits(m, y)[0, 0])


def test_rope_turns_each_pair_by_position_times_its_frequency():
    # head size 4, theta 100: the pairs (x0, x2) and (x1, x3) turn by p and p / 10 radians at position p
    T, x = 8, torch.randn(1, 1, 8, 4, generator=torch.Generator().manual_seed(0))
    cos, sin = model.rope_tables(T, 4, 100.0, None)
    z = torch.complex(x[..., :2], x[..., 2:])  # a pair as a complex number: the rotation is z e^{i angle}
    turned = z * torch.polar(torch.ones(T, 2), torch.arange(T)[:, None].float() * torch.tensor([1.0, 0.1]))
    assert torch.allclose(model.apply_rope(x, cos, sin), torch.cat([turned.real, turned.imag], -1), atol=1e-5)


def test_rope_scores_depend_on_the_relative_position_only():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 16, generator=g)
    cos, sin = model.rope_tables(32, 16, 10000.0, None)
    qr, kr = (model.apply_rope(v.expand(1, 1, 32, 16), cos, sin)[0, 0] for v in (q, k))
    assert torch.allclose(qr.norm(dim=-1), q.norm().expand(32), atol=1e-5)  # a rotation keeps the norm
    scores = qr @ kr.T  # q_m . k_n: constant along each diagonal m - n
    for d in range(-31, 32):
        diag = scores.diagonal(d)
        assert torch.allclose(diag, diag[:1].expand_as(diag), atol=1e-4), d
    assert len({round(scores[0, n].item(), 3) for n in range(32)}) > 16  # and it does vary with m - n


def test_rope_scaling_maps_a_longer_context_onto_the_trained_angles():
    # twice the trained length: position interpolation turns position 2p as position p was trained;
    # NTK-aware scaling keeps the fastest pair as trained and turns the slowest by half as much
    cos, sin = model.rope_tables(8, 8, 100.0, None)
    pcos, psin = model.rope_tables(16, 8, 100.0, None, trained=8, scaling="pi")
    assert torch.allclose(pcos[::2], cos, atol=1e-6) and torch.allclose(psin[::2], sin, atol=1e-6)
    ang = lambda c, s: torch.atan2(s, c)
    ncos, nsin = model.rope_tables(16, 8, 100.0, None, trained=8, scaling="ntk")
    plain = ang(*model.rope_tables(16, 8, 100.0, None))
    assert torch.allclose(ang(ncos, nsin)[:, 0], plain[:, 0]) and torch.allclose(ang(ncos, nsin)[1, -1], plain[1, -1] / 2)
    assert torch.equal(model.rope_tables(8, 8, 100.0, None, trained=8, scaling="ntk")[0], cos)  # within it: as trained


def test_chunked_attention_sees_its_own_chunk_only_and_equals_an_explicit_mask():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 2, 2, 10, 4, generator=g)
    visible = torch.ones(2, 10, dtype=torch.bool)
    visible[1, 7:] = False  # row 1: three padding tokens, in the last chunk
    chunk = torch.arange(10) // 4  # W = 4: chunks 0-3, 4-7, 8-9 (padded to 12 inside)
    same = chunk[:, None] == chunk[None, :]
    allowed = same & visible[:, None, None, :]
    allowed = allowed | (same & ~allowed.any(-1, keepdim=True))  # row 1's last chunk is all padding: it sees itself
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    assert torch.allclose(model.chunked_attention(q, k, v, visible, 4), ref, atol=1e-6)
    m, x = tiny(attn_chunk=8), tokens(1, T=24)
    y = x.clone()
    y[0, 0] = (x[0, 0] + 1) % 256  # a change in chunk 0 never reaches the other chunks, at any depth...
    assert torch.equal(logits(m, x)[0, 8:], logits(m, y)[0, 8:])
    assert not torch.allclose(logits(m, x)[0, :8], logits(m, y)[0, :8])  # ...but reaches its own
    assert torch.allclose(logits(tiny(attn_chunk=24), x), logits(tiny(), x), atol=1e-6)  # one chunk: full attention


def test_zero_fast_weights_give_the_base_output_exactly():
    m, x = tiny(), tokens()
    fast = init_fast(m, 2, MemoryConfig(rank=4))  # A random, B = 0
    assert torch.equal(logits(m, x), logits(m, x, fast=fast))
    nonzero = FastWeights({1: {k: (a, b + 0.1) for k, (a, b) in fast.layers[1].items()}}, fast.scale)
    assert not torch.equal(logits(m, x), logits(m, x, fast=nonzero))


def test_the_lora_delta_is_alpha_over_r_times_x_a_b():
    m = tiny()
    mc = MemoryConfig(rank=4, alpha=12.0)  # scale 3
    fast = init_fast(m, 1, mc, torch.Generator().manual_seed(0))
    A, B = fast.layers[1]["down_proj"]
    B = torch.randn_like(B)
    fw = FastWeights({1: {"down_proj": (A, B)}}, mc.scale)
    ffn, h = m.layers[1].ffn, torch.randn(1, 8, 32)
    u = torch.nn.functional.silu(ffn.gate_proj(h)) * ffn.up_proj(h)
    want = ffn.down_proj(u) + 3.0 * u @ A[0].T @ B[0].T
    assert torch.allclose(ffn(h, fw.layers[1], fw.scale), want, atol=1e-5)


def test_bottom_then_top_equals_the_full_stack():
    m, x = tiny(n_layer=4), tokens()
    fast = FastWeights({3: {k: (a, b + 0.05) for k, (a, b) in
                            init_fast(m, 2, MemoryConfig(rank=4, layer_frac=0.25)).layers[3].items()}}, 2.0)
    full = m(x, fast=fast)
    assert torch.allclose(m.top(m(x, stop=3), 3, fast=fast), full, atol=1e-6)


def test_memory_on_every_layer_splits_below_layer_0():
    # mem_layer_frac=1 (or one layer): the bottom is the embedding alone, and the top starts at layer 0
    m, x = tiny(n_layer=2), tokens()
    mcfg = MemoryConfig(rank=4, layer_frac=1.0)
    assert memory_layers(2, 1.0) == [0, 1]
    assert torch.allclose(m.top(m(x, stop=0), 0), m(x), atol=1e-6)
    loss, inner = memdlm_loss(m, x, torch.ones_like(x, dtype=torch.bool), mcfg,
                              generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and len(inner) == mcfg.steps
    assert m.layers[0].ffn.up_proj.weight.grad.abs().sum() > 0


def test_key_padding_leaves_the_real_tokens_unchanged():
    m, x = tiny(), tokens(1, 12)
    padded = torch.cat([x, torch.zeros(1, 5, dtype=torch.long)], 1)
    pad = torch.zeros_like(padded, dtype=torch.bool)
    pad[:, 12:] = True
    assert torch.allclose(m(padded, key_pad=pad)[:, :12], m(x), atol=1e-5)


def test_masking_rate_matches_t():
    x0 = torch.zeros(4, 20000, dtype=torch.long)
    t = torch.tensor([0.1, 0.3, 0.6, 0.9])
    maskable = torch.ones_like(x0, dtype=torch.bool)
    maskable[:, :100] = False  # e.g. a prompt: never masked
    x_t, mask, _ = forward_process(x0, maskable, MASK, t=t, generator=torch.Generator().manual_seed(0))
    assert not mask[:, :100].any() and (x_t[mask] == MASK).all() and (x_t[~mask] == 0).all()
    assert torch.allclose(mask[:, 100:].float().mean(1), t, atol=0.01)
    _, _, t_drawn = forward_process(x0[:, :1].repeat(1000, 1), maskable[:, :1].repeat(1000, 1), MASK)
    assert t_drawn.min() >= 1e-3 and t_drawn.max() <= 1 and abs(t_drawn.mean() - 0.5) < 0.05


@pytest.mark.parametrize("gather", [False, True])  # logits everywhere (small vocabularies) or gathered
def test_mdlm_loss_matches_a_hand_computation(gather, monkeypatch):
    monkeypatch.setattr(model, "GATHER_ABOVE", 0 if gather else 2 ** 28)
    m, x0 = tiny(), tokens(2, 6)
    mask = torch.tensor([[1, 0, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0]], dtype=torch.bool)
    maskable = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)  # row 1: 2-token prompt
    t = torch.tensor([0.4, 0.25])
    x_t = torch.where(mask, MASK, x0)
    logp = F.log_softmax(logits(m, x_t), -1)
    hand = (-(logp[0, 0, x0[0, 0]] + logp[0, 2, x0[0, 2]]) / 0.4 - logp[1, 3, x0[1, 3]] / 0.25) / 10
    assert torch.allclose(mdlm_loss(m, m(x_t), x0, mask, t, maskable), hand, atol=1e-6)


# ---- memory: trajectories ---------------------------------------------------------------

def test_pre_anchor_is_a_superset_with_the_specified_ratio():
    g = torch.Generator().manual_seed(0)
    maskable = torch.ones(64, 100, dtype=torch.bool)
    maskable[:, :20] = False
    _, mask_t, _ = forward_process(torch.zeros(64, 100, dtype=torch.long), maskable, MASK, generator=g)
    (pre, anchor), at_anchor = trajectory(mask_t, maskable, MemoryConfig(), g)
    assert anchor is mask_t and at_anchor == [False, True] and (pre >= mask_t).all() and not pre[:, :20].any()
    # int(min(1, 1.5 r_t) N) with r_t = n_t / N, rounded down (the authors' int()) exactly: 3 n_t // 2
    assert pre.sum(1).tolist() == [min(80, 3 * n // 2) for n in mask_t.sum(1).tolist()]
    # a float32 ratio times N would give 14 here, one below the exact floor(1.25 * 12) = 15
    mask_t, maskable = torch.arange(26)[None] < 12, torch.ones(1, 26, dtype=torch.bool)
    assert pre_anchor_count(mask_t, maskable, MemoryConfig(pre_scale=1.25)).item() == 15
    assert int(26 * torch.tensor(1.25 * torch.tensor(12 / 26).item(), dtype=torch.float32).item()) == 14


def test_longer_trajectories_are_nested_and_end_at_the_anchor():
    g = torch.Generator().manual_seed(0)
    maskable = torch.ones(8, 200, dtype=torch.bool)
    _, mask_t, _ = forward_process(torch.zeros(8, 200, dtype=torch.long), maskable, MASK, generator=g)
    masks, at_anchor = trajectory(mask_t, maskable, MemoryConfig(steps=4), g)
    assert len(masks) == 4 and masks[-1] is mask_t and at_anchor == [False] * 3 + [True]
    counts = [m.sum(1) for m in masks]
    for a, b in zip(masks, masks[1:]):
        assert (a >= b).all()
    steps = torch.stack([c - d for c, d in zip(counts, counts[1:])])  # reveals evenly, +-1
    assert (steps.max(0).values - steps.min(0).values <= 1).all()
    prog, _ = trajectory(mask_t, maskable, MemoryConfig(steps=2, trajectory="progressive"), g)
    assert (prog[0].sum(1) == 160).all() and (prog[1].sum(1) == 80).all() and (prog[0] >= prog[1]).all()
    only, at_anchor = trajectory(mask_t, maskable, MemoryConfig(trajectory="anchor_only"), g)
    assert all(m is mask_t for m in only) and at_anchor == [True, True]


def test_extend_mask_reaches_the_target_count_among_maskable_tokens():
    maskable = torch.tensor([[1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    m = extend_mask(torch.tensor([[1, 0, 0, 0, 0, 0]], dtype=torch.bool), maskable, torch.tensor([3]))
    assert m.sum() == 3 and m[0, 0] and not m[0, 4:].any()


def test_memory_layers_follow_the_authors_rule():
    # from floor((1 - frac) L) to the top: 2 of 14 at 10% (not round(0.1 * 14) = 1), 1 of 8, at least one
    assert memory_layers(14, 0.1) == [12, 13] and memory_layers(8, 0.1) == [7] and memory_layers(4, 0.1) == [3]
    assert memory_layers(20, 0.1) == [18, 19] and memory_layers(8, 0.25) == [6, 7] and memory_layers(2, 0.01) == [1]


# ---- memory: the inner step -------------------------------------------------------------

def test_clipping_is_per_sequence_and_per_tensor():
    g = torch.stack([torch.full((3, 4), 1.0), torch.full((3, 4), 0.01)])  # norms sqrt(12) and 0.0346
    c = clip_per_sequence(g, 1.0)
    assert math.isclose(c[0].norm().item(), 1.0, rel_tol=1e-6) and torch.equal(c[1], g[1])


def test_inner_loss_is_the_authors_ratio_weighted_token_mean_per_sequence():
    # sequence 0: 5 maskable tokens, 2 masked (r = 0.4); sequence 1: all 5 maskable, 1 masked (r = 0.2)
    m = tiny(dtype=torch.float64)
    x0 = tokens(2, 5)
    maskable = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 1, 0]], dtype=torch.bool)
    h = m(torch.where(mask, MASK, x0))
    logp = m.logits(h).log_softmax(-1)
    nll = lambda b, i: -logp[b, i, x0[b, i]]
    state = State(Rows(x0, maskable), mask, None)  # inner_loss reads the rows and the mask
    ratio = inner_loss(m, h, state, "ratio")
    assert torch.allclose(ratio, torch.stack([(nll(0, 0) + nll(0, 2)) / 2 / 0.4, nll(1, 3) / 0.2]))
    uniform = inner_loss(m, h, state, "uniform")  # adaptation: the plain mean over M
    assert torch.allclose(uniform, torch.stack([(nll(0, 0) + nll(0, 2)) / 2, nll(1, 3)]))


def test_inner_step_drives_a_large_gradient_to_the_clip():
    """With the authors' scale the inner gradient is far above the clip: each tensor moves by eta x clip."""
    m, x0, maskable, mask_t = _inner_setup(dtype=torch.float64)
    mc = MemoryConfig(rank=4, steps=1, lr=0.1, clip=1e-3)
    fast0 = init_fast(m, 2, mc, torch.Generator().manual_seed(0))
    fast1, _ = inner_loop(m, fast0, [mask_t], Rows(x0, maskable), mc)
    moved = [(q - p.detach()).flatten(1).norm(dim=1) for p, q in zip(flat(fast0), flat(fast1))]
    B_moves = torch.stack(moved[1::2])  # A gets no gradient while B = 0; every B hits the clip
    assert torch.allclose(B_moves, torch.full_like(B_moves, 0.1 * 1e-3))


def test_the_inner_step_takes_no_data_dependent_count_when_it_gathers(monkeypatch):
    # a large vocabulary gathers the masked positions; their count (nonzero), taken inside
    # torch.func.grad, is a graph break that makes torch.compile run the whole inner step eagerly
    # (torch 2.11 on CUDA): inner_loop takes it outside, where each state is made
    monkeypatch.setattr(model, "GATHER_ABOVE", 0)
    m, x0, maskable, mask_t = _inner_setup()
    mc = MemoryConfig(rank=4, steps=1)
    fast0 = init_fast(m, 2, mc, torch.Generator().manual_seed(0))
    calls = []

    class Watch(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            calls.append(getattr(func, "__name__", ""))
            return func(*args, **(kwargs or {}))

    def watched(*a):
        with Watch():
            return inner_step(*a)
    fast1, _ = inner_loop(m, fast0, [mask_t], Rows(x0, maskable), mc, inner_step=watched)
    full, _ = inner_loop(m, fast0, [mask_t], Rows(x0, maskable), mc)  # the same step, unwatched
    monkeypatch.setattr(model, "GATHER_ABOVE", 2 ** 28)
    everywhere, _ = inner_loop(m, fast0, [mask_t], Rows(x0, maskable), mc)  # logits at every position
    assert "nonzero" not in calls and "cross_entropy" in calls
    assert all(torch.allclose(a, b) and torch.allclose(a, c) for a, b, c in zip(flat(fast1), flat(full), flat(everywhere)))


def test_the_memory_scale_alpha_over_r_reaches_the_inner_loop():
    mc = MemoryConfig(rank=4, alpha=12.0, steps=1, lr=0.1, clip=1e9)  # scale 3, no clipping
    assert MemoryConfig.from_config({"mem_rank": 4, "mem_alpha": 12.0}).scale == 3.0
    m, x0, maskable, mask_t = _inner_setup()
    fast0 = init_fast(m, 2, mc, torch.Generator().manual_seed(0))
    fast1, _ = inner_loop(m, fast0, [mask_t], Rows(x0, maskable), mc)
    assert fast0.scale == fast1.scale == 3.0
    assert adapt(m, x0, mc, generator=torch.Generator().manual_seed(0))[0].scale == 3.0
    # B starts at 0, so its gradient, and with no clipping its first step, is proportional to the scale
    half, _ = inner_loop(m, FastWeights(fast0.layers, 1.5), [mask_t], Rows(x0, maskable), mc)
    B1, B_half = flat(fast1)[1::2], flat(half)[1::2]
    assert all(b.abs().max() > 0 and torch.allclose(b, 2 * h, rtol=1e-9, atol=0) for b, h in zip(B1, B_half))


def test_the_adapt_anchor_is_bernoulli_at_the_ratio_with_at_least_one_token():
    g = torch.Generator().manual_seed(0)
    maskable = torch.ones(400, 50, dtype=torch.bool)
    maskable[:, 40:] = False
    a = bernoulli_anchor(maskable, 0.2, g)
    assert not a[:, 40:].any() and (a.sum(1) >= 1).all()
    counts = a.sum(1).double()
    assert abs(counts.mean().item() - 8.0) < 0.3 and counts.std().item() > 1.5  # Binomial(40, 0.2): sd 2.5
    one = torch.zeros(300, 3, dtype=torch.bool)
    one[:, 0] = True  # a one-token prompt: always its token
    assert bernoulli_anchor(one, 0.2, g)[:, 0].all()


def _inner_setup(B=2, dtype=torch.float64):
    m = tiny(dtype=dtype)
    x0 = tokens(B, 12)
    maskable = torch.ones_like(x0, dtype=torch.bool)
    g = torch.Generator().manual_seed(3)
    _, mask_t, _ = forward_process(x0, maskable, MASK, t=torch.full((B,), 0.5), generator=g)
    return m, x0, maskable, mask_t


def test_one_inner_step_is_sgd_on_the_clipped_gradient_checked_by_finite_differences():
    m, x0, maskable, mask_t = _inner_setup()
    mc = MemoryConfig(rank=4, steps=1, lr=0.1, clip=1.0)
    fast0 = init_fast(m, 2, mc, torch.Generator().manual_seed(0))
    fast0.layers[1]["up_proj"][1].data.normal_(0, 0.1)  # B != 0, so every tensor gets a gradient
    fast1, _ = inner_loop(m, fast0, [mask_t], Rows(x0, maskable), mc)
    p0 = [p.detach().clone() for p in flat(fast0)]

    def loss0(params):  # sequence 0's stage loss as a function of the fast weights
        h = m(torch.where(mask_t, MASK, x0), fast=unflat(fast0, params))
        k = mask_t.sum(1).double()  # (1/r) x mean over M: N / k^2 x the summed NLL
        return masked_ce(m, h, x0, mask_t, maskable.sum(1) / k ** 2)[0]

    q = [p.clone().requires_grad_() for p in p0]
    grads = torch.autograd.grad(loss0(q), q)
    eps = 1e-6
    for j, (g, p_new) in enumerate(zip(grads, flat(fast1))):
        for idx in [(0, 0, 0), (0, 1, 2), (0, 2, 1)]:
            plus, minus = [x.clone() for x in p0], [x.clone() for x in p0]
            plus[j][idx] += eps
            minus[j][idx] -= eps
            fd = (loss0(plus) - loss0(minus)) / (2 * eps)
            assert torch.isclose(g[idx], fd, rtol=1e-5, atol=1e-9), (j, idx)
        assert torch.allclose(p_new[0], p0[j][0] - 0.1 * clip_per_sequence(g, 1.0)[0], atol=1e-12)


def test_a_sequence_update_in_a_batch_equals_its_update_alone():
    m, x0, maskable, mask_t = _inner_setup(B=3, dtype=torch.float32)
    mc = MemoryConfig(rank=4)
    fast = init_fast(m, 3, mc, torch.Generator().manual_seed(0))
    masks, _ = trajectory(mask_t, maskable, mc, torch.Generator().manual_seed(1))
    batched, losses = inner_loop(m, fast, masks, Rows(x0, maskable), mc)
    alone_fast = unflat(fast, [p[1:2].detach().clone().requires_grad_() for p in flat(fast)])
    alone, alone_losses = inner_loop(m, alone_fast, [mk[1:2] for mk in masks], Rows(x0[1:2], maskable[1:2]), mc)
    for p, q in zip(flat(batched), flat(alone)):
        assert torch.allclose(p[1:2], q, atol=1e-6)
    assert torch.allclose(losses[1][1:2], alone_losses[1], atol=1e-6)


def test_outer_backward_updates_the_base_weights_only():
    m, x0, maskable, _ = _inner_setup(dtype=torch.float32)
    mc = MemoryConfig(rank=4)
    captured = {}
    import memory
    real = memory.inner_loop

    def spy(*a, **k):
        captured["fast"], losses = real(*a, **k)
        return captured["fast"], losses
    memory.inner_loop = spy
    try:
        loss, inner = memdlm_loss(m, x0, maskable, mc, generator=torch.Generator().manual_seed(0))
    finally:
        memory.inner_loop = real
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in m.named_parameters()
               if "layers.1" in n or "lm_head" in n or "tok_emb" in n)
    assert all(p.grad is None and not p.requires_grad for p in flat(captured["fast"]))  # phi_K: a constant
    assert len(inner) == 2 and all(x.shape == (2,) for x in inner)


def test_exact_bilevel_gradient_matches_finite_differences():
    """create_graph=True gives the true hypergradient of the outer loss through the inner updates."""
    m, x0, maskable, _ = _inner_setup(dtype=torch.float64)
    mc = MemoryConfig(rank=4, lr=0.5, clip=100.0)  # no clipping: a smooth function of theta
    w = m.layers[1].ffn.up_proj.weight

    def outer(create_graph):
        return memdlm_loss(m, x0, maskable, mc, generator=torch.Generator().manual_seed(0), create_graph=create_graph)[0]

    exact = torch.autograd.grad(outer(True), w)[0]
    first_order = torch.autograd.grad(outer(False), w)[0]
    eps, idx = 1e-5, (3, 5)
    with torch.no_grad():
        w[idx] += eps
        up = outer(False)
        w[idx] -= 2 * eps
        down = outer(False)
        w[idx] += eps
    fd = (up - down) / (2 * eps)
    assert torch.isclose(exact[idx], fd, rtol=1e-4)
    assert not torch.allclose(exact, first_order)  # the first-order gradient is an approximation


@pytest.mark.parametrize("scope", ["response", "prompt", "all"])
def test_each_memory_scope_masks_only_the_tokens_it_names(scope, monkeypatch):
    import memory
    m, x0 = tiny(), tokens(8, 40)
    prompt, response = torch.zeros(8, 40, dtype=torch.bool), torch.zeros(8, 40, dtype=torch.bool)
    prompt[:, :24], response[:, 24:32] = True, True
    pad = ~(prompt | response)
    seen = {}
    real = memory.inner_loop

    def spy(model, fast, masks, rows, mcfg, **kw):
        seen.update(masks=masks, key_pad=rows.key_pad, bottoms=kw.get("bottoms"))
        return real(model, fast, masks, rows, mcfg, **kw)
    monkeypatch.setattr(memory, "inner_loop", spy)
    memdlm_loss(m, x0, response, MemoryConfig(rank=4, scope=scope), key_pad=pad,
                generator=torch.Generator().manual_seed(0))
    allowed = {"response": response, "prompt": prompt, "all": prompt | response}[scope]
    union = seen["masks"][0] | seen["masks"][-1]
    assert not (union & ~allowed).any() and union.any()
    if scope == "prompt":  # the inner loop sees the prompt alone, as adapt does at inference
        assert torch.equal(seen["key_pad"], ~prompt) and seen["bottoms"] is None
        assert (seen["masks"][-1].sum(1) >= 1).all()  # a Bernoulli(0.2) anchor, at least one token
    if scope == "response":  # the last inner step reuses the outer pass's bottom layers at x_t
        assert seen["bottoms"][0] is None and seen["bottoms"][1] is not None
    if scope == "all":
        assert (union & prompt).any() and (union & response).any()


def test_adapt_writes_one_fresh_memory_per_prompt():
    m = tiny()
    prompts = tokens(2, 20)
    fast, losses = adapt(m, prompts, MemoryConfig(rank=4), generator=torch.Generator().manual_seed(0))
    assert len(losses) == 2 and not torch.equal(logits(m, prompts), logits(m, prompts, fast=fast))
    # the second prompt's memory is the same whether or not the first was adapted beside it
    g = torch.Generator().manual_seed(0)
    fast_b, _ = adapt(m, prompts, MemoryConfig(rank=4), generator=g)
    assert all(torch.equal(p, q) for p, q in zip(flat(fast), flat(fast_b)))


def test_adapt_scores_the_plain_mean_at_an_anchor_of_a_fifth_of_the_prompt():
    """By default adapt masks 20% of the prompt at the anchor (the pre-anchor 1.5 times that) and
    its inner loss is the plain mean NLL over the masked tokens, not training's 1/r weighting."""
    m, prompts = tiny(), tokens(40, 100)
    seen = []  # the token ids of every forward from the bottom: the inner loop's states
    hook = m.register_forward_pre_hook(lambda mod, args: seen.append(args[0]) if not args[0].is_floating_point() else None)
    _, losses = adapt(m, prompts, MemoryConfig(rank=4), generator=torch.Generator().manual_seed(0))
    hook.remove()
    pre, anchor = (x == MASK for x in seen)
    assert (pre >= anchor).all() and abs(anchor.float().mean() - 0.2) < 0.025 and abs(pre.float().mean() - 0.3) < 0.035
    # the first step runs at phi_0, which adds nothing: the base model's mean NLL over the pre-anchor's masks
    nll = F.cross_entropy(logits(m, seen[0]).transpose(1, 2), prompts, reduction="none")
    assert torch.allclose(losses[0], (nll * pre).sum(1) / pre.sum(1), atol=1e-5)


# ---- training ---------------------------------------------------------------------------

def run_train(tmp_path, *args):
    train.main(["--config", "tiny", f"--out_dir={tmp_path}", *args])
    with open(os.path.join(tmp_path, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("config", ["tiny", "niah_tiny"])
def test_data_workers_draw_the_batches_the_loop_would(tmp_path, config):
    """Batches drawn ahead by DataLoader workers are those of the loop itself: the same losses,
    also across a resume (and with the needle curriculum, which depends on the step)."""
    def losses(out, *args):
        train.main(["--config", config, f"--out_dir={out}", "--max_iters=6", "--eval_interval=3", "--log_interval=1",
                    "--niah_curriculum=4", *args])
        with open(os.path.join(out, "log.jsonl")) as f:
            return [(r["step"], r.get("loss"), r.get("eval_loss")) for r in map(json.loads, f) if "step" in r]
    inline = losses(tmp_path / "a")
    assert losses(tmp_path / "b", "--data_workers=2") == inline
    train.main(["--config", config, f"--out_dir={tmp_path / 'c'}", "--max_iters=3", "--eval_interval=3",
                "--log_interval=1", "--niah_curriculum=4", "--data_workers=2"])
    assert losses(tmp_path / "c", "--data_workers=2", "--resume=True")[-4:] == inline[-4:]


def test_the_batch_of_a_step_is_that_steps_draw():
    cfg = {**train.parse_config(["--config", "niah_tiny"]), "niah_curriculum": 1000, "batch_size": 16}
    data = train.make_data(cfg, "cpu")
    items = train.StepBatches(data, cfg["seed"], 1)
    ref = data.batch("train", torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + 7 * 1009 + 1), 7)
    assert all(torch.equal(a, b) for a, b in zip(items[7], ref))
    length = lambda step: int((~items[step][2]).sum(1).max())  # the curriculum follows the step
    assert length(0) < length(2000)


@pytest.mark.parametrize("mem", [False, True])
def test_a_tiny_run_lowers_the_loss(tmp_path, mem):
    log = run_train(tmp_path, f"--mem={mem}", "--max_iters=60", "--eval_interval=30")
    evals = [r for r in log if "eval_loss" in r and "summary" not in r]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.5
    train_losses = [r["loss"] for r in log if "loss" in r]
    assert sum(train_losses[-2:]) < sum(train_losses[:2])
    if mem:
        assert all("inner_loss_1" in r and "inner_loss_2" in r for r in log if "loss" in r)
        assert "eval_loss_mem" in evals[-1]


class Killed(BaseException):
    """The process dying at that instant: nothing catches it."""


def test_a_crash_keeps_the_last_checkpoint_and_resume_gives_the_same_losses(tmp_path, monkeypatch):
    args = ("--max_iters=6", "--eval_interval=2", "--log_interval=1")  # checkpoints at steps 2, 4 and 6
    full = run_train(tmp_path / "a", *args)
    real, steps = torch.save, []

    def torn_save(obj, f, *a, **k):  # the third checkpoint dies half-way through writing its bytes
        steps.append(obj["step"])
        if len(steps) < 3:
            return real(obj, f, *a, **k)
        buf = io.BytesIO()
        real(obj, buf)
        part = buf.getvalue()[:buf.tell() // 2]
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as out:
                out.write(part)
        else:
            f.write(part)
        raise Killed
    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(Killed):
        run_train(tmp_path / "b", *args)
    monkeypatch.setattr(torch, "save", real)
    assert steps == [2, 4, 6] and torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["step"] == 4
    resumed = run_train(tmp_path / "b", *args, "--resume=True")
    loss_at = lambda log, s: [r["loss"] for r in log if r.get("step") == s and "loss" in r][-1]
    assert math.isclose(loss_at(full, 6), loss_at(resumed, 6), rel_tol=1e-5)
    model, cfg = load_model(str(tmp_path / "b"))
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["step"] == 6 and isinstance(model, DiffusionLM)


def test_the_learning_rate_warms_up_then_decays_to_min_lr():
    cfg = dict(lr=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    assert [train.lr_at(i, cfg) for i in (0, 4, 9, 10)] == pytest.approx([0.1, 0.5, 1.0, 1.0])
    assert train.lr_at(60, cfg) == pytest.approx(0.55)  # cosine: half-way between lr and min_lr at mid-decay
    assert train.lr_at(110, cfg) == pytest.approx(0.1) and train.lr_at(200, cfg) == pytest.approx(0.1)
    decay = [train.lr_at(i, cfg) for i in range(10, 111)]
    assert all(a > b for a, b in zip(decay, decay[1:]))


def test_a_train_step_clips_the_gradient_norm():
    cfg = train.parse_config(["--config", "tiny", "--mem=False", "--grad_clip=0.001"])
    m = tiny(dtype=torch.float64)
    before = [p.detach().clone() for p in m.parameters()]
    opt = torch.optim.SGD(m.parameters(), lr=1.0)  # a step of exactly the (clipped) gradient
    batch = (tokens(4, 32), torch.ones(4, 32, dtype=torch.bool), None)
    train.train_step(train.Nets(m), opt, batch, cfg, MemoryConfig.from_config(cfg), torch.Generator().manual_seed(0))
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(m.parameters(), before)])
    assert math.isclose(step.norm().item(), 1e-3, rel_tol=1e-6)


def test_exact_hypergrad_train_step_takes_the_exact_gradient():
    """--exact_hypergrad=True: train_step's gradient is memdlm_loss's create_graph gradient, not the first-order one."""
    cfg = train.parse_config(["--config", "tiny", "--exact_hypergrad=True", "--mem_lr=0.5", "--grad_clip=1e9"])
    mcfg, batch = MemoryConfig.from_config(cfg), (tokens(4, 32), torch.ones(4, 32, dtype=torch.bool), None)

    def step_grad(**over):
        m = tiny(dtype=torch.float64)
        opt = torch.optim.SGD(m.parameters(), lr=1.0)  # a step of exactly the gradient
        before = [p.detach().clone() for p in m.parameters()]
        train.train_step(train.Nets(m), opt, batch, {**cfg, **over}, mcfg, torch.Generator().manual_seed(0))
        return torch.cat([(b - p.detach()).flatten() for p, b in zip(m.parameters(), before)])

    m = tiny(dtype=torch.float64)
    loss = memdlm_loss(m, batch[0], batch[1], mcfg, generator=torch.Generator().manual_seed(0), create_graph=True)[0]
    exact = torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(m.parameters()))])
    assert torch.allclose(step_grad(), exact, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(step_grad(exact_hypergrad=False), exact, rtol=1e-6, atol=1e-9)


def test_weight_decay_shrinks_the_matrices_only():
    """One step of make_optimizer's AdamW at zero gradients moves the weights by the decay alone:
    every matrix (embedding, projections, head) by exactly 1 - lr wd, no 1-D weight (RMSNorm) at all."""
    cfg = train.parse_config(["--config", "tiny"])  # lr 1e-3, weight_decay 0.1
    m = tiny()
    before = [p.detach().clone() for p in m.parameters()]
    opt = train.make_optimizer(m, cfg, False)
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    shrink = 1 - cfg["lr"] * cfg["weight_decay"]
    assert {p.dim() for p in m.parameters()} == {1, 2}
    for (n, p), b in zip(m.named_parameters(), before):
        assert torch.allclose(p.detach(), b * shrink if p.dim() == 2 else b, rtol=1e-7, atol=0), n


def test_rms_norm_of_a_zero_input_is_zero():
    """Every RMSNorm has an eps > 0: an all-zero input gives 0, not 0 / 0."""
    m = tiny()
    norms = [mod for mod in m.modules() if isinstance(mod, torch.nn.RMSNorm)]
    assert len(norms) == 2 * m.cfg.n_layer + 1  # before attention and FFN in each layer, and the final one
    for norm in norms:
        assert torch.equal(norm(torch.zeros(2, 3, m.cfg.n_embd)), torch.zeros(2, 3, m.cfg.n_embd))


def test_eval_loss_is_the_base_model_alone():
    """eval_loss of a MemDLM run is the plain MDLM loss: that of a run without memory, same batches and masks."""
    cfg = train.parse_config(["--config", "tiny", "--eval_iters=1", "--batch_size=4"])
    m, data, mcfg = tiny(), train.make_data(cfg, "cpu"), MemoryConfig.from_config(cfg)
    with_mem = train.evaluate(train.Nets(m), data, cfg, mcfg, "cpu")
    alone = train.evaluate(train.Nets(m), data, {**cfg, "mem": False}, mcfg, "cpu")
    assert with_mem["eval_loss"] == alone["eval_loss"] != with_mem["eval_loss_mem"]


def test_init_from_loads_weights_and_resets_the_step(tmp_path):
    run_train(tmp_path / "a", "--max_iters=20", "--mem=False")
    log = run_train(tmp_path / "b", "--max_iters=10", f"--init_from={tmp_path / 'a'}", "--eval_interval=5")
    first = [r for r in log if "eval_loss" in r][0]
    scratch = run_train(tmp_path / "c", "--max_iters=10", "--eval_interval=5")
    assert first["step"] == 0 and first["eval_loss"] < [r for r in scratch if "eval_loss" in r][0]["eval_loss"] - 0.3
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["step"] == 10


@pytest.mark.parametrize("args, message", [
    (["--bogus=1"], "unknown config key 'bogus'"),
    (["--max_iters=ten"], "--max_iters=ten: expected an integer"),
    (["--mem=maybe"], "--mem=maybe: expected True or False"),
    (["--config", "huge"], "unknown config 'huge'"),
    (["max_iters=3"], "write --key=value"),
    (["--dataset=nowhere"], "run python data/nowhere/prepare.py"),
    (["--resume=True"], "does not exist"),
    (["--mem_trajectory=sideways"], "trajectory must be one of"),
])
def test_bad_input_gives_a_clear_error(tmp_path, args, message):
    argv = ["--config", "tiny", f"--out_dir={tmp_path / 'x'}"] + [a for a in args if a != "--config"]
    if args[0] == "--config":
        argv = ["--config", args[1], f"--out_dir={tmp_path / 'x'}"]
    with pytest.raises((SystemExit, ValueError), match=message):
        train.main(argv)


def test_no_gpu_when_one_is_asked_for(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        model.pick_device("cuda")


def test_resume_or_init_from_another_config_is_refused(tmp_path):
    run_train(tmp_path / "a", "--max_iters=2")
    with pytest.raises(SystemExit, match="n_layer=2, not 3"):
        run_train(tmp_path / "a", "--max_iters=4", "--resume=True", "--n_layer=3")
    with pytest.raises(SystemExit, match="differs from this config"):
        run_train(tmp_path / "b", "--max_iters=2", f"--init_from={tmp_path / 'a'}", "--n_embd=32")
    with pytest.raises(SystemExit, match="no checkpoint"):
        load_model(str(tmp_path / "nothing"))


def test_answer_accuracy_scores_answers_of_prompted_rows_only():
    from types import SimpleNamespace
    x0 = torch.tensor([[5, 6, 7, 8, 256, 256], [1, 2, 3, 4, 5, 6]])
    maskable = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)  # row 1: plain text
    key_pad = torch.tensor([[0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    seen = {}

    class Oracle:  # predicts the clean tokens, or token 7 everywhere
        cfg = SimpleNamespace(eot_id=256, mask_id=MASK)

        def __init__(self, perfect):
            self.perfect = perfect

        def __call__(self, x, key_pad=None):
            seen["x"] = x
            return F.one_hot(x0 if self.perfect else torch.full_like(x0, 7), 300).float()

        def logits(self, h):
            return h
    acc = lambda model, *batch: [v.tolist() for v in train.answer_accuracy(model, *batch)]  # per row
    assert acc(Oracle(True), x0, maskable, key_pad) == [[2, 0], [2, 0]]  # 7, 8: eot left out
    assert seen["x"].tolist() == [[5, 6, MASK, MASK, MASK, 256], [1, 2, 3, 4, 5, 6]]
    assert acc(Oracle(False), x0, maskable, key_pad) == [[1, 0], [2, 0]]
    assert acc(Oracle(True), x0[1:], maskable[1:], None) == [[0], [0]]



def _free_ports(n):
    import socket
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Recorder:
    """An optimizer that records the gradients it is given (grads[mem, "ddp"]) and steps nothing."""
    def __init__(self, raw, grads, mem):
        self.raw, self.grads, self.mem = raw, grads, mem

    def step(self):
        self.grads[self.mem, "ddp"] = [p.grad.clone() for p in self.raw.parameters()]

    def zero_grad(self, set_to_none):
        self.raw.zero_grad(set_to_none=set_to_none)


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # the GPU path's autocast, on a CPU-only build
def test_an_eval_with_memory_leaves_every_compiled_graph_of_the_step_running(monkeypatch):
    """train.compiled on the GPU path, with dynamo's eager backend (CPU tensors): the compiled top
    and loss live on the compiled module, not on raw, so evaluate's eager inner loop on raw (inside
    torch.func.grad) cannot make dynamo skip their code; the step after it runs every graph again."""
    runs = []
    def counting(gm, example_inputs):
        runs.append(0)
        key = len(runs) - 1
        def run(*a):
            runs[key] += 1
            return gm.forward(*a)
        return run
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None: real_compile(fn, backend=counting))
    cfg = train.parse_config(["--config", "tiny", "--batch_size=2", "--compile=True"])
    torch.manual_seed(0)
    raw = DiffusionLM(train.model_config(cfg, get_encoding("byte")))
    nets, mcfg = train.compiled(raw, cfg, "cuda"), MemoryConfig.from_config(cfg)
    assert not {"top", "nll"} & set(vars(raw))
    x0 = torch.randint(0, 256, (2, 64))
    maskable = torch.ones_like(x0, dtype=torch.bool)

    def step():
        before = list(runs)
        for mem in (True, False):
            train.batch_loss(nets, (x0, maskable, None), {**cfg, "mem": mem}, mcfg, torch.Generator().manual_seed(0))[0].backward()
        return [n - (before[i] if i < len(before) else 0) for i, n in enumerate(runs)]
    first = step()
    with torch.no_grad():  # evaluate's memory loss: raw, the eager inner step
        memdlm_loss(raw, x0, maskable, mcfg, generator=torch.Generator().manual_seed(0))
    assert step() == first and all(first) and len(first) >= 4  # bottom, inner step, top, loss


def _ddp_rank(rank, ports, out):
    """One of two gloo ranks: two MemDLM steps wrapped as train.py wraps them (the weights saved),
    then train.py itself as torchrun starts it (the training batches it drew saved)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    cfg = train.parse_config(["--config", "tiny", "--batch_size=2"])
    torch.manual_seed(0)
    raw = DiffusionLM(train.model_config(cfg, get_encoding("byte")))
    opt = train.make_optimizer(raw, cfg, False)
    nets = train.compiled(raw, cfg, "cpu", ddp=True)
    data, mcfg = train.make_data(cfg, "cpu"), MemoryConfig.from_config(cfg)
    for step in range(2):
        g_dev, g_cpu = train.step_generator(cfg["seed"], step, rank, "cpu")
        train.train_step(nets, opt, data.batch("train", g_cpu), cfg, mcfg, g_dev)
    torch.save(raw.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    # the gradient train_step hands the optimizer, and this rank's own (the loss alone, no DDP), per mode
    grads = {}
    for mem in (True, False):
        step_cfg = {**cfg, "mem": mem, "grad_clip": 1e9}  # no clip: the step sees the gradient as it is
        g_dev, g_cpu = train.step_generator(cfg["seed"], 5, rank, "cpu")
        x0, maskable, _ = batch = data.batch("train", g_cpu)
        train.train_step(nets, Recorder(raw, grads, mem), batch, step_cfg, mcfg, g_dev)
        g_dev = train.step_generator(cfg["seed"], 5, rank, "cpu")[0]  # the same masks again
        if mem:
            loss = memdlm_loss(raw, x0, maskable, mcfg, generator=g_dev)[0]
        else:
            x_t, mask, t = forward_process(x0, maskable, MASK, generator=g_dev)
            loss = mdlm_loss(raw, raw(x_t), x0, mask, t, maskable)
        grads[mem, "local"] = torch.autograd.grad(loss, list(raw.parameters()))
    torch.save(grads, os.path.join(out, f"grads{rank}.pt"))
    del nets  # before its process group: a DDP wrapper freed after it can hang (gloo)
    torch.distributed.destroy_process_group()

    os.environ.update(MASTER_PORT=str(ports[1]), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    drawn, batch = [], train.TextData.batch

    def recorded(self, split, gen, step=None, with_tasks=False):
        b = batch(self, split, gen, step, with_tasks)
        if split == "train":
            drawn.append(b[0])
        return b
    train.TextData.batch = recorded
    train.main(["--config", "tiny", f"--out_dir={out}/run", "--batch_size=4", "--max_iters=2", "--eval_interval=2",
                "--log_interval=1", "--compile_mode=reduce-overhead"])
    torch.save(drawn, os.path.join(out, f"batches{rank}.pt"))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    ranks = torch.multiprocessing.spawn(_ddp_rank, args=(_free_ports(2), str(out)), nprocs=2, join=False)
    deadline = time.time() + 120  # a rank that hangs (e.g. at exit) fails the test instead of the suite
    while not ranks.join(timeout=1):
        if time.time() > deadline:
            for p in ranks.processes:
                p.kill()
            pytest.fail("a DDP rank did not finish within 120 s")
    return out


def test_ddp_keeps_every_weight_in_sync_though_the_top_runs_outside_the_wrapper(ddp_run):
    # DDP wraps the bottom layers' module; the inner loop and the layers above the memory run
    # on the bare module: their gradients must still be averaged over the ranks
    w0, w1 = (torch.load(ddp_run / f"rank{r}.pt") for r in (0, 1))
    torch.manual_seed(0)  # the ranks' initial weights
    init = DiffusionLM(train.model_config(train.parse_config(["--config", "tiny"]), get_encoding("byte"))).state_dict()
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert not torch.equal(w0["layers.1.ffn.up_proj.weight"], init["layers.1.ffn.up_proj.weight"])  # it trained


def test_ddp_averages_the_gradient_over_the_ranks(ddp_run):
    """The gradient of a step under DDP is the mean of the ranks' own gradients (not their sum,
    not the mean divided again by the number of ranks), with and without the memory."""
    g0, g1 = (torch.load(ddp_run / f"grads{r}.pt") for r in (0, 1))
    for mem in (True, False):
        mean = [(a + b) / 2 for a, b in zip(g0[mem, "local"], g1[mem, "local"])]
        assert not all(torch.allclose(a, b) for a, b in zip(g0[mem, "local"], g1[mem, "local"]))  # other batches
        for g in (g0, g1):
            assert all(torch.allclose(d, m, rtol=1e-4, atol=1e-8) for d, m in zip(g[mem, "ddp"], mean)), mem


def test_ddp_ranks_train_on_their_own_batches(ddp_run):
    b0, b1 = (torch.load(ddp_run / f"batches{r}.pt") for r in (0, 1))
    assert len(b0) == len(b1) == 2 and not any(torch.equal(x, y) for x, y in zip(b0, b1))


def test_ddp_training_evaluates_on_the_global_batch(ddp_run, tmp_path):
    with open(ddp_run / "run" / "log.jsonl") as f:
        ddp = [json.loads(line) for line in f]
    one = run_train(tmp_path / "one", "--batch_size=8", "--max_iters=1", "--eval_interval=1")
    assert ddp[0]["step"] == one[0]["step"] == 0 and ddp[0] == one[0]  # same eval batches at the same weights
    assert (ddp_run / "run" / "ckpt.pt").exists() and ddp[-1]["summary"]["train_loss"] > 0
    # CUDA graphs are kept to one process: torchrun trains with compile_mode default
    assert torch.load(ddp_run / "run" / "ckpt.pt", weights_only=True)["config"]["compile_mode"] == "default"
