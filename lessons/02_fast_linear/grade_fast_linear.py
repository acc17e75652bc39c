"""Grader of lesson 2: the per-sequence LoRA fast-weight forward."""
if __name__ == "__main__":  # a grader is a pytest module, run from the repository root
    raise SystemExit("grade it from the repository root with pytest: python -m pytest lessons/02_fast_linear")

import torch
import torch.nn as nn

from lessons.grading import seeded
# The reference: the core's function, named in this one place only.
from model import fast_linear as ref_fast_linear

REFERENCE = {"fast_linear": ref_fast_linear}

Bsz, T, D_IN, D_OUT, R = 3, 5, 16, 24, 4
SCALE = 64.0 / R  # alpha / r with the default alpha


def inputs(seed=0, zero_b=False):
    g = seeded(seed)
    torch.manual_seed(seed)
    lin = nn.Linear(D_IN, D_OUT, bias=False).double()
    x = torch.randn(Bsz, T, D_IN, generator=g, dtype=torch.float64)
    A = torch.randn(Bsz, R, D_IN, generator=g, dtype=torch.float64)
    B = torch.zeros(Bsz, D_OUT, R, dtype=torch.float64) if zero_b else torch.randn(Bsz, D_OUT, R, generator=g,
                                                                                 dtype=torch.float64)
    return x, lin, A, B


def test_no_fast_weights_or_b_zero_give_the_base_output(impl):
    x, lin, A, B = inputs(zero_b=True)
    assert torch.equal(impl.fast_linear(x=x, lin=lin, phi=None, scale=SCALE), lin(x))
    assert torch.allclose(impl.fast_linear(x=x, lin=lin, phi=(A, B), scale=SCALE), lin(x), rtol=0, atol=1e-12)


def test_each_row_uses_its_own_effective_weight(impl):
    x, lin, A, B = inputs(seed=1)
    y = impl.fast_linear(x=x, lin=lin, phi=(A, B), scale=SCALE)
    assert y.shape == (Bsz, T, D_OUT)
    for b in range(Bsz):
        w_eff = lin.weight + SCALE * B[b] @ A[b]  # W + (alpha / r) B A
        assert torch.allclose(y[b], x[b] @ w_eff.T, rtol=1e-9, atol=1e-9), f"row {b}: y != x (W + scale B A)^T"


def test_a_row_depends_on_its_own_fast_weights_only(impl):
    x, lin, A, B = inputs(seed=2)
    y = impl.fast_linear(x=x, lin=lin, phi=(A, B), scale=SCALE)
    A2, B2 = A.clone(), B.clone()
    A2[1], B2[1] = 0.5 * A2[1] + 1, -B2[1]
    y2 = impl.fast_linear(x=x, lin=lin, phi=(A2, B2), scale=SCALE)
    assert torch.equal(y[[0, 2]], y2[[0, 2]]) and not torch.allclose(y[1], y2[1])


def test_the_output_and_its_gradients_equal_the_references(impl):
    x, lin, A, B = inputs(seed=3)
    A.requires_grad_(), B.requires_grad_()
    for scale in (SCALE, 0.5):
        got = impl.fast_linear(x=x, lin=lin, phi=(A, B), scale=scale)
        want = ref_fast_linear(x=x, lin=lin, phi=(A, B), scale=scale)
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-9)
        v = torch.randn(got.shape, generator=seeded(9), dtype=torch.float64)
        g_got = torch.autograd.grad((got * v).sum(), (A, B, lin.weight))
        g_want = torch.autograd.grad((want * v).sum(), (A, B, lin.weight))
        for a, b in zip(g_got, g_want):
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-9)
    # phi kept in float32 under a float64 (or bf16) model: cast, not refused
    y32 = impl.fast_linear(x=x, lin=lin, phi=(A.detach().float(), B.detach().float()), scale=SCALE)
    want = ref_fast_linear(x=x, lin=lin, phi=(A.detach(), B.detach()), scale=SCALE)
    assert y32.dtype == x.dtype and torch.allclose(y32, want, rtol=1e-5, atol=1e-5)
