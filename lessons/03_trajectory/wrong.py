"""Planted wrong solution of lesson 3 (the grader must fail it): the right counts, but each
state above the anchor is drawn afresh among all maskable tokens, not on top of the state
below: the masks are not nested, and x_pre is not a further-masked x_t."""
import torch


def trajectory(mask_t, maskable, mcfg, generator=None):
    K, n, n_t = mcfg.steps, maskable.sum(1).double(), mask_t.sum(1).double()
    n_pre = torch.floor(torch.minimum(n, torch.maximum(mcfg.pre_scale * n_t, n_t))).long()
    n_t, masks = mask_t.sum(1), [mask_t]
    for k in range(1, K):
        score = torch.where(maskable, torch.rand(mask_t.shape, generator=generator), -1.0)
        rank = score.argsort(1, descending=True).argsort(1)
        target = n_t + (n_pre - n_t) * k // (K - 1)
        masks.insert(0, maskable & (rank < target[:, None]))  # BUG: ignores the state below
    return masks, [False] * (K - 1) + [True]
