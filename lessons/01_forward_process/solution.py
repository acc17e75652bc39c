"""Lesson 1: the forward process (Eq. 1) and the MDLM loss (Eq. 2). Fill in both functions."""
import torch
import torch.nn.functional as F

from model import MASK_EPS


def forward_process(x0, maskable, mask_id, t=None, generator=None):
    """Absorbing-state masking, linear schedule (Eq. 1): each maskable token of row b becomes
    mask_id with probability t[b]; t ~ U(MASK_EPS, 1) per row when not given.

    x0 [B, T] int64, maskable [B, T] bool, t [B] or None. Draw t (one torch.rand(B)), then one
    torch.rand(x0.shape), both from generator. Returns x_t [B, T], mask [B, T] bool, t [B]."""
    raise NotImplementedError("lesson 1: forward_process")


def mdlm_loss(model, h, x0, mask, t, maskable):
    """L = sum over masked positions of (1/t_b) * -log p(x0_i | x_t), divided by N, the number
    of maskable tokens in the batch (Eq. 2). h [B, T, C]: final hidden states of x_t;
    model.logits(h) gives [B, T, V]. Returns a scalar."""
    raise NotImplementedError("lesson 1: mdlm_loss")
