"""Lesson 4: one inner SGD step on the fast weights with the per-tensor, per-sequence clip.
Fill in both functions."""
import torch

from memory import flat, inner_loss, unflat


def clip_per_sequence(g, max_norm):
    """g [B, ...]: one fast-weight tensor's gradient. Scale each row b to norm <= max_norm
    (by min(1, max_norm / |g_b|)); a zero row stays zero."""
    raise NotImplementedError("lesson 4: clip_per_sequence")


def inner_step(model, fast, state, mcfg):
    """phi_k = phi_{k-1} - mcfg.lr * clip(grad) (Eq. 6), each tensor of phi clipped on its own,
    the gradient from torch.autograd.grad of the summed per-sequence inner losses (Eq. 7-8).

    fast: phi_{k-1} (FastWeights); state: memory.State of x_k (state.h [B, T, C] the hidden
    states entering layer min(fast.layers), state.mask M_k, state.rows x0 / maskable / key_pad).
    model.top(state.h, min(fast.layers), fast=..., key_pad=...) runs the layers above.
    Called under torch.no_grad(). Returns (phi_k: FastWeights of plain tensors, loss [B])."""
    raise NotImplementedError("lesson 4: inner_step")
