"""Planted wrong solution of lesson 7 (the grader must fail it): the inner loss keeps the
training weights 1/r_k instead of inference's uniform ones."""
from dataclasses import replace

import torch

from memory import ADAPT_RATIO, MemoryConfig, bernoulli_anchor, init_fast, inner_step, trajectory


@torch.no_grad()
def adapt(model, prompt_ids, mcfg=None, key_pad=None, ratio=ADAPT_RATIO, steps=2, lr=0.1, generator=None):
    mcfg = replace(mcfg or MemoryConfig(), steps=steps, lr=lr, weighting="ratio", trajectory="anchor")  # BUG: "ratio"
    maskable = torch.ones_like(prompt_ids, dtype=torch.bool) if key_pad is None else ~key_pad
    mask_t = bernoulli_anchor(maskable, ratio, generator)
    fast = init_fast(model, prompt_ids.shape[0], mcfg, generator)
    masks, _ = trajectory(mask_t, maskable, mcfg, generator)
    losses = []
    for m in masks:
        h = model(torch.where(m, model.cfg.mask_id, prompt_ids), key_pad=key_pad, hi=min(fast.layers))
        fast, loss = inner_step(model, h, prompt_ids, m, maskable, fast, mcfg, key_pad)
        losses.append(loss)
    return fast, losses
