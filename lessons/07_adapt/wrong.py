"""Planted wrong solution of lesson 7 (the grader must fail it): the inner loss keeps the
training weights 1/r_k instead of inference's uniform ones."""
from dataclasses import replace

import torch

from memory import ADAPT_RATIO, MemoryConfig, bernoulli_anchor, init_fast, inner_step, trajectory


@torch.no_grad()
def adapt(model, prompt_ids, mcfg=None, key_pad=None, ratio=ADAPT_RATIO, steps=2, lr=0.1, generator=None):
    mcfg = replace(mcfg or MemoryConfig(), steps=steps, lr=lr, weighting="ratio", trajectory="anchor")  # BUG: "ratio"
    maskable = torch.ones_like(prompt_ids, dtype=torch.bool) if key_pad is None else ~key_pad
    mask_t = bernoulli_anchor(maskable=maskable, ratio=ratio, generator=generator)
    fast = init_fast(model=model, batch_size=prompt_ids.shape[0], mcfg=mcfg, generator=generator)
    masks, _ = trajectory(mask_t=mask_t, maskable=maskable, mcfg=mcfg, generator=generator)
    losses = []
    for m in masks:
        h = model(torch.where(m, model.cfg.mask_id, prompt_ids), key_pad=key_pad, hi=min(fast.layers))
        fast, loss = inner_step(model=model, h=h, x0=prompt_ids, mask=m, maskable=maskable, fast=fast, mcfg=mcfg,
                                  key_pad=key_pad)
        losses.append(loss)
    return fast, losses
