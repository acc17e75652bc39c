"""Planted wrong solution of lesson 6 (the grader must fail it): the inner gradient is taken
without create_graph, so phi_k does not depend on theta and the "exact" gradient is the
first-order one."""
import torch

from memory import Rows, State, clip_per_sequence, flat, init_fast, inner_loss, trajectory, unflat
from model import forward_process, mdlm_loss as mdlm_loss_eq2


def exact_inner_step(model, fast, state, mcfg):
    params = [p if p.requires_grad else p.detach().requires_grad_() for p in flat(fast)]
    top = model.top(state.h, min(fast.layers), fast=unflat(fast, params), key_pad=state.rows.key_pad)
    loss = inner_loss(model=model, h=top, state=state, weighting=mcfg.weighting)
    grads = torch.autograd.grad(loss.sum(), params)  # BUG: no create_graph=True
    return unflat(fast, [p - mcfg.lr * clip_per_sequence(g, mcfg.clip) for p, g in zip(params, grads)]), loss.detach()


def exact_memdlm_loss(model, x0, maskable, mcfg, *, key_pad=None, generator=None):
    rows = Rows(x0, maskable, key_pad)
    x_t, mask_t, t = forward_process(x0=x0, maskable=maskable, mask_id=model.cfg.mask_id, generator=generator)
    fast = init_fast(model=model, batch_size=x0.shape[0], mcfg=mcfg, generator=generator)
    first = min(fast.layers)
    masks, _ = trajectory(mask_t=mask_t, maskable=maskable, mcfg=mcfg, generator=generator)
    inner = []
    for m in masks:
        h = model(torch.where(m, model.cfg.mask_id, x0), key_pad=key_pad, stop=first)
        fast, loss = exact_inner_step(model=model, fast=fast, state=State(rows, m, h), mcfg=mcfg)
        inner.append(loss)
    h = model(x_t, fast=fast, key_pad=key_pad)
    return mdlm_loss_eq2(model=model, h=h, x0=x0, mask=mask_t, t=t, maskable=maskable), inner
