"""Planted wrong solution of lesson 3 (the grader must fail it): the right counts, but each
state above the anchor is drawn afresh among all maskable tokens, not on top of the state
below: the masks are not nested, and x_pre is not a further-masked x_t."""
import torch


def trajectory(mask_t, maskable, mcfg, generator=None):
    K, n = mcfg.steps, maskable.sum(1).float()
    r_t = mask_t.sum(1) / n.clamp(min=1)
    n_pre = torch.floor(torch.clamp(torch.maximum(mcfg.pre_scale * r_t, r_t), max=1.0) * n).long()
    n_t, masks = mask_t.sum(1), [mask_t]
    for k in range(1, K):
        score = torch.where(maskable, torch.rand(mask_t.shape, generator=generator), -1.0)
        rank = score.argsort(1, descending=True).argsort(1)
        target = n_t + (n_pre - n_t) * k // (K - 1)
        masks.insert(0, maskable & (rank < target[:, None]))  # BUG: ignores the state below
    return masks, [False] * (K - 1) + [True]
