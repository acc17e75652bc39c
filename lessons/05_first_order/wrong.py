"""Planted wrong solution of lesson 5 (the grader must fail it): the inner steps run with the
graph on, so the outer backward flows through phi_K into the inner updates (not Eq. 10's
first-order rule)."""
import torch

from memory import init_fast, inner_step, trajectory
from model import forward_process, mdlm_loss as mdlm_loss_eq2


def memdlm_loss(model, x0, maskable, mcfg, key_pad=None, generator=None):
    x_t, mask_t, t = forward_process(x0=x0, maskable=maskable, mask_id=model.cfg.mask_id, generator=generator)
    fast = init_fast(model=model, batch_size=x0.shape[0], mcfg=mcfg, generator=generator)
    first = min(fast.layers)
    masks, _ = trajectory(mask_t=mask_t, maskable=maskable, mcfg=mcfg, generator=generator)
    inner = []
    for m in masks:  # BUG: no torch.no_grad(): phi_K keeps the graph to theta
        h = model(torch.where(m, model.cfg.mask_id, x0), key_pad=key_pad, hi=first)
        fast, loss = inner_step(model=model, h=h, x0=x0, mask=m, maskable=maskable, fast=fast, mcfg=mcfg,
                                  key_pad=key_pad)
        inner.append(loss.detach())
    h = model(model(x_t, key_pad=key_pad, hi=first), fast=fast, key_pad=key_pad, lo=first)
    return mdlm_loss_eq2(model=model, h=h, x0=x0, mask=mask_t, t=t, maskable=maskable), inner
