"""Lesson 3: the anchor-consistent trajectory of the inner loop. Fill in trajectory."""
import torch


def trajectory(mask_t, maskable, mcfg, generator=None):
    """The K masks of the inner loop, noisiest first, and for each whether it is the anchor.

    mask_t, maskable [B, T] bool; mcfg.steps = K, mcfg.pre_scale = s. The pre-anchor masks
    n_pre = floor(min(N, max(s n_t, n_t))) tokens of each row (n_t = |M_t|, N maskable, from the
    counts), a superset of M_t; the K - 2 states
    between reveal the extra masks evenly (state k above the anchor has
    n_t + (n_pre - n_t) * k // (K - 1)); the last state is M_t itself.
    Returns (masks: list of K [B, T] bool, at_anchor: [False] * (K - 1) + [True])."""
    raise NotImplementedError("lesson 3: trajectory")
