"""Planted wrong solution of lesson 2 (the grader must fail it): the LoRA scale alpha / r is
left out, the delta added as x A^T B^T."""
import torch


def fast_linear(x, lin, phi, scale):
    y = lin(x)
    if phi is None:
        return y
    A, B = phi
    return y + torch.bmm(torch.bmm(x, A.mT.to(x.dtype)), B.mT.to(x.dtype))  # BUG: no scale
