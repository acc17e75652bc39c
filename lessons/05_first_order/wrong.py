"""Planted wrong solution of lesson 5 (the grader must fail it): the inner steps run with the
graph on, so the outer backward flows through phi_K into the inner updates (not Eq. 10's
first-order rule)."""
import torch

from memory import Rows, State, init_fast, inner_step, trajectory
from model import forward_process, mdlm_loss as mdlm_loss_eq2


def memdlm_loss(model, x0, maskable, mcfg, *, key_pad=None, generator=None, bottom=None, inner_step=inner_step):
    rows = Rows(x0, maskable, key_pad)
    x_t, mask_t, t = forward_process(x0=x0, maskable=maskable, mask_id=model.cfg.mask_id, generator=generator)
    fast = init_fast(model=model, batch_size=x0.shape[0], mcfg=mcfg, generator=generator)
    first = min(fast.layers)
    h_t = (bottom or model)(x_t, key_pad=key_pad, stop=first)
    masks, at_anchor = trajectory(mask_t=mask_t, maskable=maskable, mcfg=mcfg, generator=generator)
    inner = []
    for m, a in zip(masks, at_anchor):  # BUG: no torch.no_grad(): phi_K keeps the graph to theta
        h = h_t if a else model(torch.where(m, model.cfg.mask_id, x0), key_pad=key_pad, stop=first)
        fast, loss = inner_step(model=model, fast=fast, state=State(rows, m, h), mcfg=mcfg)
        inner.append(loss.detach())
    h = model.top(h_t, first, fast=fast, key_pad=key_pad)
    return mdlm_loss_eq2(model=model, h=h, x0=x0, mask=mask_t, t=t, maskable=maskable), inner
