"""Planted wrong solution of lesson 4 (the grader must fail it): the clip takes one norm over
the whole batch, and the step clips all of a sequence's fast-weight tensors by one global norm
(the variant the paper measured worse)."""
import torch

from memory import flat, inner_loss, unflat


def clip_per_sequence(g, max_norm):
    return g * (max_norm / g.norm().clamp(min=1e-12)).clamp(max=1.0)  # BUG: one norm for the batch


def inner_step(model, fast, state, mcfg):
    params = [p.detach().requires_grad_() for p in flat(fast)]
    with torch.enable_grad():
        top = model.top(state.h, min(fast.layers), fast=unflat(fast, params), key_pad=state.rows.key_pad)
        loss = inner_loss(model=model, h=top, state=state, weighting=mcfg.weighting)
        grads = torch.autograd.grad(loss.sum(), params)
    norm = torch.stack([g.flatten(1).norm(dim=1) ** 2 for g in grads]).sum(0).sqrt()  # BUG: global per sequence
    factor = (mcfg.clip / norm.clamp(min=1e-12)).clamp(max=1.0)
    new = [p.detach() - mcfg.lr * g * factor.view(-1, *[1] * (g.dim() - 1)) for p, g in zip(params, grads)]
    return unflat(fast, new), loss.detach()
