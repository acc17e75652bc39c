"""Planted wrong solution of lesson 1 (the graders must fail it): the prompt gets masked too,
and the loss forgets the 1/t weight (an unweighted masked cross-entropy)."""
import torch
import torch.nn.functional as F

from model import MASK_EPS


def forward_process(x0, maskable, mask_id, t=None, generator=None):
    B = x0.shape[0]
    if t is None:
        t = MASK_EPS + (1 - MASK_EPS) * torch.rand(B, generator=generator)
    mask = torch.rand(x0.shape, generator=generator) < t[:, None]  # BUG: ignores maskable
    return torch.where(mask, mask_id, x0), mask, t


def mdlm_loss(model, h, x0, mask, t, maskable):
    nll = F.cross_entropy(model.logits(h).flatten(0, 1).double(), x0.flatten(), reduction="none").view(x0.shape)
    return (nll * mask).sum() / maskable.sum()  # BUG: no w(t) = 1/t
