"""Grader of lesson 5: the outer loss (Eq. 9) and its first-order gradient (Eq. 10)."""
if __name__ == "__main__":  # a grader is a pytest module, run from the repository root
    raise SystemExit("grade it from the repository root with pytest: python -m pytest lessons/05_first_order")

import pytest
import torch

from lessons.grading import prompt_response, seeded, tiny, tokens
# The reference: the core's functions, named in this one place only.
from memory import MemoryConfig, inner_step as core_inner_step, memdlm_loss as ref_memdlm_loss
from model import forward_process, mdlm_loss as mdlm_loss_eq2

REFERENCE = {"memdlm_loss": ref_memdlm_loss}


def batch(B=3, T=16, seed=0):
    """Rows with prompts, the last one padded at its end."""
    x0 = tokens(B, T, seed)
    key_pad = torch.zeros(B, T, dtype=torch.bool)
    key_pad[-1, -4:] = True
    return x0, prompt_response(B, T, [0, 4, 6]) & ~key_pad, key_pad


def outer(fn, model, mcfg, seed=0, exact=False, **kw):
    x0, maskable, key_pad = batch(seed=seed)
    kw = {**kw, "create_graph": True} if exact else kw
    return fn(model=model, x0=x0, maskable=maskable, mcfg=mcfg, key_pad=key_pad, generator=seeded(seed), **kw)


@pytest.mark.parametrize("K", [1, 2, 3])
def test_the_loss_and_the_inner_losses_equal_the_references(impl, K):
    model, mcfg = tiny(), MemoryConfig(rank=4, steps=K)
    loss, inner = outer(impl.memdlm_loss, model, mcfg)
    ref_loss, ref_inner = outer(ref_memdlm_loss, model, mcfg)
    assert loss.dim() == 0 and torch.allclose(loss, ref_loss, rtol=1e-9)
    assert len(inner) == K and all(torch.allclose(a, b, rtol=1e-9) for a, b in zip(inner, ref_inner))


def test_with_no_inner_step_size_it_is_the_mdlm_loss_of_the_same_anchor(impl):
    model = tiny(seed=1)
    loss, _ = outer(impl.memdlm_loss, model, MemoryConfig(rank=4, lr=0.0), seed=1)
    x0, maskable, key_pad = batch(seed=1)
    x_t, mask_t, t = forward_process(x0, maskable, model.cfg.mask_id, generator=seeded(1))  # the same first draws
    h = model(x_t, key_pad=key_pad)  # phi_K = phi_0: delta W = 0
    assert torch.allclose(loss, mdlm_loss_eq2(model, h, x0, mask_t, t, maskable), rtol=1e-9)


def gradient(fn, model, mcfg, exact=False):
    loss, _ = outer(fn, model, mcfg, seed=2, exact=exact)
    return torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)


def test_only_theta_learns_and_by_the_first_order_gradient(impl):
    model, mcfg = tiny(seed=2), MemoryConfig(rank=4, lr=0.5)
    got, want = gradient(impl.memdlm_loss, model, mcfg), gradient(ref_memdlm_loss, model, mcfg)
    exact = gradient(ref_memdlm_loss, model, mcfg, exact=True)
    gap = max((a - b).abs().max().item() for a, b in zip(want, exact) if a is not None)
    assert gap > 1e-6  # the grader can tell the first-order gradient from the exact one here
    for (name, _), g, w in zip(model.named_parameters(), got, want):
        if w is None:
            assert g is None or not g.any(), f"{name}: the first-order gradient does not reach it"
            continue
        assert g is not None, f"{name} got no gradient"
        assert torch.allclose(g, w, rtol=1e-6, atol=1e-10), \
            f"{name}: not the first-order gradient (Eq. 10: phi_K is a constant in the outer backward)"


def test_the_bottom_and_the_inner_step_given_are_the_ones_used(impl):
    model, mcfg = tiny(seed=4), MemoryConfig(rank=4, steps=3)
    calls = {"bottom": [], "inner_step": 0}

    def bottom(x, **kw):  # as train.py's DDP wrapper: the model itself, called with x_t
        calls["bottom"].append(kw.get("stop"))
        return model(x, **kw)

    def step(*args, **kw):  # as train.py's compiled step: memory.inner_step
        calls["inner_step"] += 1
        return core_inner_step(*args, **kw)

    loss, inner = outer(impl.memdlm_loss, model, mcfg, seed=4, bottom=bottom, inner_step=step)
    ref_loss, ref_inner = outer(ref_memdlm_loss, model, mcfg, seed=4)
    assert calls["bottom"] == [1], f"bottom runs x_t's layers below the memory once (stop=1); got {calls['bottom']}"
    assert calls["inner_step"] == 3, "the inner_step given takes every one of the K steps"
    assert torch.allclose(loss, ref_loss, rtol=1e-9)
    assert all(torch.allclose(a, b, rtol=1e-9) for a, b in zip(inner, ref_inner))
