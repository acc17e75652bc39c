"""Grader of lesson 3: the anchor-consistent trajectory (Sec. 3.2)."""
if __name__ == "__main__":  # a grader is a pytest module, run from the repository root
    raise SystemExit("grade it from the repository root with pytest: python -m pytest lessons/03_trajectory")

import math

import pytest
import torch

from lessons.grading import prompt_response, seeded
# The reference: the core's functions and config, named in this one place only.
from memory import MemoryConfig, trajectory as ref_trajectory

REFERENCE = {"trajectory": ref_trajectory}


def anchor(B=6, T=40, seed=0):
    """maskable rows with prompts of several lengths, an anchor M_t of varied ratios in each:
    row 0 has an empty anchor, row 1 a fully masked response."""
    g = seeded(seed)
    maskable = prompt_response(B, T, [0, 10, 5, 30, 0, 20][:B])
    ratio = torch.tensor([0.0, 1.0, 0.1, 0.5, 0.7, 0.33])[:B]
    mask_t = (torch.rand(B, T, generator=g) < ratio[:, None]) & maskable
    return mask_t, maskable


def run(fn, mask_t, maskable, K, s, seed):
    return fn(mask_t=mask_t, maskable=maskable, mcfg=MemoryConfig(steps=K, pre_scale=s, trajectory="anchor"),
              generator=seeded(seed))


@pytest.mark.parametrize("K", [1, 2, 3, 5])
def test_the_last_state_is_the_anchor_and_the_masks_are_nested(impl, K):
    mask_t, maskable = anchor()
    masks, at_anchor = run(impl.trajectory, mask_t, maskable, K, 1.5, 0)
    assert len(masks) == K and list(at_anchor) == [False] * (K - 1) + [True]
    assert torch.equal(masks[-1], mask_t), "the last inner state must be exactly the anchor x_t"
    for m in masks:
        assert m.shape == mask_t.shape and m.dtype == torch.bool and not (m & ~maskable).any()
    for noisier, cleaner in zip(masks, masks[1:]):
        assert not (cleaner & ~noisier).any(), "each state must contain the masks of the state below it (nested)"


@pytest.mark.parametrize("K,s", [(2, 1.5), (2, 1.25), (2, 3.0), (3, 1.5), (4, 2.0)])
def test_the_counts_follow_the_pre_anchor_rule(impl, K, s):
    mask_t, maskable = anchor(seed=K)
    masks, _ = run(impl.trajectory, mask_t, maskable, K, s, 1)
    n_t = mask_t.sum(1)
    # floor(s n_t) capped at N and at least n_t, from the counts, in exact arithmetic: s n_t of
    # these s (1.25, 1.5, 2, 3) is exact in a Python float, math.floor exact on it
    n_pre = torch.tensor([math.floor(min(float(N), max(s * float(c), float(c))))
                          for c, N in zip(n_t.tolist(), maskable.sum(1).tolist())])
    for k in range(1, K):  # masks[K - 1 - k] is the k-th state above the anchor
        assert torch.equal(masks[K - 1 - k].sum(1), n_t + (n_pre - n_t) * k // (K - 1)), f"state {k} above the anchor"
    if K > 1:
        assert torch.equal(masks[0].sum(1), n_pre)
        assert masks[0][0].sum() == 0 and torch.equal(masks[0][1], maskable[1])  # empty anchor; full anchor


def test_the_extra_masks_fall_uniformly_on_the_visible_tokens(impl):
    # one row: 20 maskable tokens, 4 of them masked at the anchor, the pre-anchor adds 2 of the other 16
    maskable = torch.ones(1, 20, dtype=torch.bool)
    mask_t = torch.zeros(1, 20, dtype=torch.bool)
    mask_t[0, :4] = True
    counts = torch.zeros(20)
    draws = 400
    for seed in range(draws):
        counts += run(impl.trajectory, mask_t, maskable, 2, 1.5, seed)[0][0][0].float()
    extra = counts[4:] / draws  # each visible token is chosen with probability 2/16
    assert (extra - 2 / 16).abs().max() < 0.08, f"chosen how often: {extra.tolist()}"


@pytest.mark.parametrize("K", [2, 3])
def test_the_masks_equal_the_references_under_one_generator(impl, K):
    # (on these rows the exact count and a float32-ratio count agree, whichever the core computes)
    mask_t, maskable = anchor(seed=7)
    got, _ = run(impl.trajectory, mask_t, maskable, K, 1.5, 11)
    want, _ = run(ref_trajectory, mask_t, maskable, K, 1.5, 11)
    for k, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g, w), f"state {k} differs from the reference's (draw order: see the hints)"
