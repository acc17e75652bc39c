"""Grader of lesson 6: the exact hypergradient through the inner updates (vs Eq. 10)."""
if __name__ == "__main__":  # a grader is a pytest module, run from the repository root
    raise SystemExit("grade it from the repository root with pytest: python -m pytest lessons/06_hypergradient")

from functools import partial

import torch

from lessons.grading import prompt_response, seeded, state_at, tiny, tokens
# The reference: the core's functions and helpers, named in this one place only.
from memory import MemoryConfig, Rows, flat, init_fast, inner_step as ref_inner_step, memdlm_loss as ref_memdlm_loss, unflat

REFERENCE = {"exact_inner_step": ref_inner_step,  # with grad enabled, the core's step keeps the graph (torch.func.grad)
             "exact_memdlm_loss": partial(ref_memdlm_loss, create_graph=True)}


def step_inputs(seed=0, B=2, T=12):
    model, mcfg = tiny(seed=seed), MemoryConfig(rank=4, lr=0.5)
    rows = Rows(tokens(B, T, seed), prompt_response(B, T, [0, 3]))
    mask = (torch.rand(B, T, generator=seeded(seed)) < 0.6) & rows.maskable
    fast = init_fast(model, B, mcfg, seeded(seed + 1))
    prev = [(p if i % 2 == 0 else 0.05 * torch.randn(p.shape, generator=seeded(i), dtype=p.dtype)).requires_grad_()
            for i, p in enumerate(flat(fast))]  # phi_{k-1}: B != 0, leaves we differentiate with respect to
    state = state_at(model, rows, mask, min(fast.layers))  # with grad: state.h depends on theta
    return model, prev, dict(model=model, fast=unflat(fast, prev), state=state, mcfg=mcfg)


def test_the_step_and_its_derivative_equal_the_references(impl):
    model, prev, args = step_inputs()
    phi_k, loss = impl.exact_inner_step(**args)
    ref_phi, ref_loss = ref_inner_step(**args)
    assert torch.allclose(loss, ref_loss, rtol=1e-9)
    got, want = flat(phi_k), flat(ref_phi)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-7, atol=1e-10)
    assert all(p.requires_grad for p in got), "phi_k must keep its graph"
    vs = [torch.randn(p.shape, generator=seeded(20 + i), dtype=p.dtype) for i, p in enumerate(want)]
    wrt = list(model.parameters()) + prev
    d_got = torch.autograd.grad(sum((p * v).sum() for p, v in zip(got, vs)), wrt, allow_unused=True,
                                retain_graph=True)  # the two graphs share h's
    d_want = torch.autograd.grad(sum((p * v).sum() for p, v in zip(want, vs)), wrt, allow_unused=True)
    names = [n for n, _ in model.named_parameters()] + [f"phi_(k-1)[{i}]" for i in range(len(prev))]
    for name, a, b in zip(names, d_got, d_want):
        if b is None:
            continue
        assert a is not None, f"phi_k does not depend on {name}: take the inner gradient with create_graph=True"
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-9), f"d phi_k / d {name} differs from the reference's"


def batch(B=2, T=12, seed=3):
    x0 = tokens(B, T, seed)
    return x0, prompt_response(B, T, [0, 4])


def outer_loss(fn, model, mcfg, seed=3):
    x0, maskable = batch(seed=seed)
    return fn(model=model, x0=x0, maskable=maskable, mcfg=mcfg, generator=seeded(seed))[0]


def flat_grad(loss, params):
    return torch.cat([torch.zeros(p.numel(), dtype=p.dtype) if g is None else g.flatten()
                      for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True))])


def test_the_loss_and_its_gradient_are_the_exact_hypergradient(impl):
    model = tiny(seed=3)
    mcfg = MemoryConfig(rank=4, lr=0.5, clip=1e9)  # no clipping: a smooth function of theta
    params = list(model.parameters())
    loss = outer_loss(impl.exact_memdlm_loss, model, mcfg)
    ref = outer_loss(REFERENCE["exact_memdlm_loss"], model, mcfg)
    assert torch.allclose(loss, ref, rtol=1e-9)
    ex, want = flat_grad(loss, params), flat_grad(ref, params)
    fo = flat_grad(outer_loss(ref_memdlm_loss, model, mcfg), params)  # Eq. 10: first-order
    gap = (want - fo).norm()
    assert gap > 1e-4 * want.norm()  # the grader can tell them apart here
    assert (ex - want).norm() < 1e-6 * want.norm(), "not the exact hypergradient"
    # and the loss itself changes at the exact rate: finite differences along u, where the two differ
    u = (want - fo) / gap

    def loss_at(eps):
        with torch.no_grad():
            for p, d in zip(params, u.split([p.numel() for p in params])):
                p += eps * d.view_as(p)
            out = outer_loss(ref_memdlm_loss, model, mcfg).item()
            for p, d in zip(params, u.split([p.numel() for p in params])):
                p -= eps * d.view_as(p)
        return out

    slope = (loss_at(1e-4) - loss_at(-1e-4)) / 2e-4
    assert abs(slope - (u @ ex).item()) < 0.02 * gap.item(), "d loss / d theta along u is not the gradient's"
