"""Grader of lesson 1: the forward process (Eq. 1) and the MDLM loss (Eq. 2)."""
if __name__ == "__main__":  # a grader is a pytest module, run from the repository root
    raise SystemExit("grade it from the repository root with pytest: python -m pytest lessons/01_forward_process")

import torch
import torch.nn.functional as F

from lessons.grading import MASK_ID, prompt_response, seeded, tiny, tokens
# The reference: the core's functions, named in this one place only.
from model import MASK_EPS, forward_process as ref_forward_process, mdlm_loss as ref_mdlm_loss

REFERENCE = {"forward_process": ref_forward_process, "mdlm_loss": ref_mdlm_loss}


def draw(impl, B=4, T=64, seed=0, t=None):
    x0, maskable = tokens(B, T), prompt_response(B, T, [0, 8, 20, 63][:B])
    return x0, maskable, impl.forward_process(x0=x0, maskable=maskable, mask_id=MASK_ID, t=t, generator=seeded(seed))


def test_only_maskable_tokens_are_masked_and_they_become_the_mask_token(impl):
    x0, maskable, (x_t, mask, t) = draw(impl)
    assert x_t.shape == x0.shape and mask.shape == x0.shape and mask.dtype == torch.bool and t.shape == (4,)
    assert not (mask & ~maskable).any(), "a prompt (non-maskable) token was masked"
    assert (x_t[mask] == MASK_ID).all() and torch.equal(x_t[~mask], x0[~mask])
    assert ((t >= MASK_EPS) & (t < 1)).all()


def test_each_maskable_token_is_masked_with_probability_t(impl):
    t = torch.tensor([0.05, 0.3, 0.6, 0.95])
    x0, maskable, (_, mask, t_out) = draw(impl, T=4000, t=t)
    assert torch.equal(t_out, t)
    frac = mask.sum(1) / maskable.sum(1)
    sd = (t * (1 - t) / maskable.sum(1)).sqrt()
    assert ((frac - t).abs() < 5 * sd).all(), f"masked fractions {frac.tolist()} for t = {t.tolist()}"
    t_drawn = draw(impl, B=4, T=8, seed=3)[2][2]
    assert not torch.equal(t_drawn, draw(impl, B=4, T=8, seed=4)[2][2]), "t is not drawn from the generator"


def test_the_draws_equal_the_references_under_one_generator(impl):
    for t in (None, torch.tensor([0.2, 0.4, 0.6, 0.8])):
        x0, maskable, got = draw(impl, seed=5, t=t)
        want = ref_forward_process(x0=x0, maskable=maskable, mask_id=MASK_ID, t=t, generator=seeded(5))
        for g, w in zip(got, want):
            assert torch.equal(g, w)


def loss_inputs(seed=0):
    model, B, T = tiny(seed=seed), 3, 12
    g = seeded(seed)
    h = torch.randn(B, T, model.cfg.n_embd, generator=g, dtype=torch.float64, requires_grad=True)
    x0, maskable = tokens(B, T, seed), prompt_response(B, T, [0, 4, 9])
    mask = (torch.rand(B, T, generator=g) < 0.5) & maskable
    t = torch.tensor([0.1, 0.5, 0.9])
    return model, h, x0, mask, t, maskable


def test_the_loss_equals_a_hand_computation(impl):
    model, h, x0, mask, t, maskable = loss_inputs()
    loss = impl.mdlm_loss(model=model, h=h, x0=x0, mask=mask, t=t, maskable=maskable)
    total = 0.0
    for b in range(x0.shape[0]):
        for i in range(x0.shape[1]):
            if mask[b, i]:
                total += -torch.log_softmax(model.logits(h[b, i]), -1)[x0[b, i]] / t[b]
    assert torch.allclose(loss, total / maskable.sum(), rtol=1e-6), "Eq. 2: sum of (1/t) NLL over M_t, over N maskable"


def test_the_loss_and_its_gradient_equal_the_references(impl):
    model, h, x0, mask, t, maskable = loss_inputs(seed=1)
    args = dict(model=model, h=h, x0=x0, mask=mask, t=t, maskable=maskable)
    got, want = impl.mdlm_loss(**args), ref_mdlm_loss(**args)
    assert got.dim() == 0 and torch.allclose(got, want, rtol=1e-6)
    g_got, = torch.autograd.grad(got, h)
    g_want, = torch.autograd.grad(want, h)
    assert torch.allclose(g_got, g_want, rtol=1e-6, atol=1e-12)
    # a token that is not masked is not scored: changing its target changes nothing
    x1 = torch.where(mask, x0, (x0 + 1) % 256)
    assert torch.allclose(impl.mdlm_loss(**{**args, "x0": x1}), got, rtol=1e-9)
