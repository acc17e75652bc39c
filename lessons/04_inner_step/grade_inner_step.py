"""Grader of lesson 4: one inner step with the per-tensor, per-sequence clip (Eq. 6-8)."""
if __name__ == "__main__":  # a grader is a pytest module, run from the repository root
    raise SystemExit("grade it from the repository root with pytest: python -m pytest lessons/04_inner_step")

import pytest
import torch

from lessons.grading import prompt_response, seeded, state_at, tiny, tokens
# The reference: the core's functions and helpers, named in this one place only.
from memory import (MemoryConfig, Rows, State, clip_per_sequence as ref_clip_per_sequence, flat, init_fast,
                    inner_loss, inner_step as ref_inner_step, unflat)

REFERENCE = {"clip_per_sequence": ref_clip_per_sequence, "inner_step": ref_inner_step}


def test_the_clip_bounds_each_rows_norm_and_keeps_its_direction(impl):
    g = torch.randn(4, 3, 5, generator=seeded(0), dtype=torch.float64)
    g = g / g.flatten(1).norm(dim=1).view(-1, 1, 1) * torch.tensor([0.0, 0.5, 1.0, 7.0]).view(-1, 1, 1)
    for max_norm in (1.0, 2.5):
        got = impl.clip_per_sequence(g=g, max_norm=max_norm)
        assert got.shape == g.shape
        norms = torch.tensor([0.0, 0.5, 1.0, 7.0]).double()
        assert torch.allclose(got.flatten(1).norm(dim=1), norms.clamp(max=max_norm), atol=1e-12)
        assert torch.allclose(got[1:] / norms[1:].clamp(max=max_norm).view(-1, 1, 1),
                              g[1:] / norms[1:].view(-1, 1, 1))  # the same direction
        assert torch.allclose(got, ref_clip_per_sequence(g=g, max_norm=max_norm))
        g2 = g[:, 0]  # any number of dims after the batch
        assert torch.allclose(impl.clip_per_sequence(g=g2, max_norm=max_norm), ref_clip_per_sequence(g=g2, max_norm=max_norm))


def setup(seed=0, B=3, T=16, **mem):
    """A tiny model, a state x_k (the last row padded at its end) and phi_{k-1} with B != 0 (a
    later step: A's gradient is then not zero); the state's h is the bottom's output at x_k."""
    model, mcfg = tiny(seed=seed), MemoryConfig(rank=4, **mem)
    key_pad = torch.zeros(B, T, dtype=torch.bool)
    key_pad[-1, -3:] = True
    rows = Rows(tokens(B, T, seed), prompt_response(B, T, [0, 5, 9, 2][:B]) & ~key_pad, key_pad)
    mask = (torch.rand(B, T, generator=seeded(seed)) < 0.6) & rows.maskable
    fast = init_fast(model, B, mcfg, seeded(seed + 1))
    fast = unflat(fast, [p if i % 2 == 0 else 0.05 * torch.randn(p.shape, generator=seeded(i), dtype=p.dtype)
                         for i, p in enumerate(flat(fast))])  # flat's order: A, B, A, B, ...
    with torch.no_grad():
        state = state_at(model, rows, mask, min(fast.layers))
    return dict(model=model, fast=fast, state=state, mcfg=mcfg)


def step(fn, args):
    with torch.no_grad():  # as the inner loop calls it (first-order)
        return fn(**args)


def raw_gradients(args):
    """The inner loss's gradient with respect to each tensor of phi_{k-1}, unclipped."""
    params = [p.clone().requires_grad_() for p in flat(args["fast"])]
    state = args["state"]
    top = args["model"].top(state.h, min(args["fast"].layers), fast=unflat(args["fast"], params),
                            key_pad=state.rows.key_pad)
    loss = inner_loss(args["model"], top, state, args["mcfg"].weighting)
    return torch.autograd.grad(loss.sum(), params)


def test_each_tensor_steps_by_eta_times_its_own_clipped_gradient(impl):
    args = setup()
    phi_k, _ = step(impl.inner_step, args)
    lr, clip = args["mcfg"].lr, args["mcfg"].clip
    for old, new, g in zip(flat(args["fast"]), flat(phi_k), raw_gradients(args)):
        norm = g.flatten(1).norm(dim=1).view(-1, *[1] * (g.dim() - 1))
        want = old - lr * g * (clip / norm).clamp(max=1.0)  # per tensor, per sequence
        assert torch.allclose(new, want, rtol=1e-7, atol=1e-10), "phi_k != phi_{k-1} - eta clip(grad), clip per tensor"


@pytest.mark.parametrize("mem", [{}, {"lr": 0.3, "clip": 1e9}, {"clip": 0.05, "weighting": "uniform"}])
def test_phi_k_and_the_losses_equal_the_references(impl, mem):
    args = setup(seed=2, **mem)
    phi_k, loss = step(impl.inner_step, args)
    ref_phi, ref_loss = step(ref_inner_step, args)
    assert loss.shape == (3,) and torch.allclose(loss, ref_loss, rtol=1e-9)
    for a, b in zip(flat(phi_k), flat(ref_phi)):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-7, atol=1e-10)


def test_a_sequences_update_equals_its_update_alone(impl):
    args = setup(seed=3)
    phi_k, _ = step(impl.inner_step, args)
    st, one = args["state"], slice(2, 3)  # the padded row
    rows = Rows(st.rows.x0[one], st.rows.maskable[one], st.rows.key_pad[one])
    alone = {**args, "state": State(rows, st.mask[one], st.h[one]),
             "fast": unflat(args["fast"], [p[one] for p in flat(args["fast"])])}
    phi_alone, _ = step(impl.inner_step, alone)
    for a, b in zip(flat(phi_k), flat(phi_alone)):
        assert torch.allclose(a[one], b, rtol=1e-9, atol=1e-12)


def test_theta_is_left_alone_and_phi_k_is_a_constant(impl):
    args = setup(seed=4)
    phi_k, loss = step(impl.inner_step, args)
    assert all(p.grad is None for p in args["model"].parameters()), \
        "theta got a .grad: take phi's gradient with torch.autograd.grad, not loss.backward()"
    assert not any(p.requires_grad for p in flat(phi_k)) and not loss.requires_grad, "phi_k records a graph"
