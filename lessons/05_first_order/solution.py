"""Lesson 5: the MemDLM outer loss (Eq. 9) with the first-order rule (Eq. 10). Fill in memdlm_loss."""
import torch

from memory import Rows, State, init_fast, inner_step, trajectory
from model import forward_process, mdlm_loss as mdlm_loss_eq2


def memdlm_loss(model, x0, maskable, mcfg, *, key_pad=None, generator=None, bottom=None, inner_step=inner_step):
    """The outer loss of one batch: the MDLM loss (Eq. 2) at the anchor state x_t with phi_K
    applied (Eq. 9), phi_K written by K inner steps along the anchor-consistent trajectory and
    treated as a constant (Eq. 10: backward reaches theta only through the outer pass).

    x0 [B, T], maskable [B, T] bool, key_pad [B, T] bool or None. bottom (None: model) runs the
    layers below min(fast.layers) for x_t: bottom(x_t, key_pad=key_pad, stop=first); inner_step
    is called at each state: inner_step(model, fast, State(Rows(x0, maskable, key_pad), mask, h), mcfg).
    Draw from generator: forward_process, then init_fast, then trajectory.
    Returns (loss: scalar, inner: list of K detached [B] inner losses)."""
    raise NotImplementedError("lesson 5: memdlm_loss")
