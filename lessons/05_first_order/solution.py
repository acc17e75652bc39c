"""Lesson 5: the MemDLM outer loss (Eq. 9) with the first-order rule (Eq. 10). Fill in memdlm_loss."""
import torch

from memory import init_fast, inner_step, trajectory
from model import forward_process, mdlm_loss as mdlm_loss_eq2


def memdlm_loss(model, x0, maskable, mcfg, key_pad=None, generator=None):
    """The outer loss of one batch: the MDLM loss (Eq. 2) at the anchor state x_t with phi_K
    applied (Eq. 9), phi_K written by K inner steps along the anchor-consistent trajectory and
    treated as a constant (Eq. 10: backward reaches theta only through the outer pass).

    Draw from generator: forward_process, then init_fast, then trajectory.
    Returns (loss: scalar, inner: list of K detached [B] inner losses)."""
    raise NotImplementedError("lesson 5: memdlm_loss")
