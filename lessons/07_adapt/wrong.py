"""Planted wrong solution of lesson 7 (the grader must fail it): the inner loss keeps the
training weights 1/r_k instead of inference's uniform ones."""
from dataclasses import replace

import torch

from memory import ADAPT_RATIO, MemoryConfig, Rows, bernoulli_anchor, init_fast, inner_loop, trajectory


@torch.no_grad()
def adapt(model, prompt_ids, mcfg=None, *, key_pad=None, ratio=ADAPT_RATIO, steps=None, lr=None, generator=None):
    mcfg = mcfg or MemoryConfig()
    mcfg = replace(mcfg, steps=mcfg.steps if steps is None else steps, lr=mcfg.lr if lr is None else lr,
                   weighting="ratio", trajectory="anchor")  # BUG: "ratio"
    maskable = torch.ones_like(prompt_ids, dtype=torch.bool) if key_pad is None else ~key_pad
    rows = Rows(prompt_ids, maskable, key_pad)
    mask_t = bernoulli_anchor(maskable=maskable, ratio=ratio, generator=generator)
    fast = init_fast(model=model, batch_size=prompt_ids.shape[0], mcfg=mcfg, generator=generator)
    masks, _ = trajectory(mask_t=mask_t, maskable=maskable, mcfg=mcfg, generator=generator)
    return inner_loop(model, fast, masks, rows, mcfg)
