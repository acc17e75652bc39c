"""Lesson 7: inference-time adaptation, the prompt written into fresh fast weights. Fill in adapt."""
from dataclasses import replace

import torch

from memory import ADAPT_RATIO, MemoryConfig, Rows, bernoulli_anchor, init_fast, inner_loop, trajectory


def adapt(model, prompt_ids, mcfg=None, *, key_pad=None, ratio=ADAPT_RATIO, steps=None, lr=None, generator=None):
    """Write each prompt into its own fresh fast weights: every non-padding token maskable, the
    anchor masks each with probability ratio (bernoulli_anchor), the anchor trajectory with
    mcfg's pre-anchor scale, uniform weights, `steps` SGD steps of size lr (None: mcfg.steps,
    mcfg.lr), no gradient to theta. Draw from generator: the anchor, init_fast, the trajectory.
    Returns (phi_K: FastWeights, losses: list of K [B] tensors)."""
    raise NotImplementedError("lesson 7: adapt")
