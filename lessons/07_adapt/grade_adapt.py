"""Grader of lesson 7: inference-time adaptation (Sec. 4.5)."""
if __name__ == "__main__":  # a grader is a pytest module, run from the repository root
    raise SystemExit("grade it from the repository root with pytest: python -m pytest lessons/07_adapt")

import pytest
import torch

from lessons.grading import seeded, tiny, tokens
# The reference: the core's function and helpers, named in this one place only.
from memory import MemoryConfig, adapt as ref_adapt, flat

REFERENCE = {"adapt": ref_adapt}


def prompts(B=3, T=24, seed=0, padded=True):
    key_pad = torch.zeros(B, T, dtype=torch.bool)
    if padded:
        key_pad[1, -6:], key_pad[2, -15:] = True, True  # shorter prompts, padded at their end
    return tokens(B, T, seed), key_pad


def run(fn, model, mcfg, steps=2, lr=0.1, seed=0, padded=True):
    ids, key_pad = prompts(seed=seed, padded=padded)
    return fn(model=model, prompt_ids=ids, mcfg=mcfg, key_pad=key_pad if padded else None, ratio=0.2, steps=steps,
              lr=lr, generator=seeded(seed))


@pytest.mark.parametrize("mem,steps,lr,padded", [({}, 2, 0.1, True), ({"clip": 1e9}, 2, 0.1, False),
                                                 ({"clip": 1e9, "pre_scale": 2.0}, 3, 0.3, True),
                                                 ({"steps": 3, "lr": 0.3}, None, None, True)])  # mcfg's K, eta
def test_the_memory_and_the_losses_equal_the_references(impl, mem, steps, lr, padded):
    model, mcfg = tiny(), MemoryConfig(rank=4, **mem)
    phi, losses = run(impl.adapt, model, mcfg, steps, lr, padded=padded)
    ref_phi, ref_losses = run(ref_adapt, model, mcfg, steps, lr, padded=padded)
    assert len(losses) == (mcfg.steps if steps is None else steps), "steps=None: mcfg.steps" and all(a.shape == (3,) for a in losses)
    for k, (a, b) in enumerate(zip(losses, ref_losses)):
        assert torch.allclose(a, b, rtol=1e-9), f"step {k + 1}'s loss (uniform weights: the mean NLL over the masked prompt)"
    assert sorted(phi.layers) == sorted(ref_phi.layers) and phi.scale == ref_phi.scale
    for a, b in zip(flat(phi), flat(ref_phi)):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-7, atol=1e-10)


def test_with_no_step_size_the_memory_changes_nothing(impl):
    phi, _ = run(impl.adapt, tiny(seed=1), MemoryConfig(rank=4), lr=0.0, seed=1)
    assert all(not B.any() for i in phi.layers for A, B in phi.layers[i].values()), "phi_0 has B = 0: delta W = 0"


def test_nothing_records_a_graph_and_theta_is_untouched(impl):
    model = tiny(seed=2)
    with torch.enable_grad():
        phi, losses = run(impl.adapt, model, MemoryConfig(rank=4), seed=2)
    assert not any(p.requires_grad for p in flat(phi)) and not any(x.requires_grad for x in losses)
    assert all(p.grad is None for p in model.parameters())
