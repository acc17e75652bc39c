"""Lesson 6: the exact hypergradient, through the inner updates. Fill in both functions."""
import torch

from memory import Rows, State, clip_per_sequence, flat, init_fast, inner_loss, trajectory, unflat
from model import forward_process, mdlm_loss as mdlm_loss_eq2


def exact_inner_step(model, fast, state, mcfg):
    """phi_k = phi_{k-1} - mcfg.lr * clip(grad) (Eq. 6) as a differentiable function of theta,
    state.h and phi_{k-1}: the gradient from torch.autograd.grad(..., create_graph=True).
    fast: phi_{k-1}; state: memory.State (h [B, T, C] entering layer min(fast.layers), mask, rows).
    Returns (phi_k: FastWeights, loss [B])."""
    raise NotImplementedError("lesson 6: exact_inner_step")


def exact_memdlm_loss(model, x0, maskable, mcfg, *, key_pad=None, generator=None):
    """The outer loss (Eq. 9) with phi_K kept as a function of theta, so that backward gives the
    exact hypergradient. Draw from generator: forward_process, init_fast, trajectory.
    Returns (loss: scalar, inner: list of K [B] inner losses)."""
    raise NotImplementedError("lesson 6: exact_memdlm_loss")
