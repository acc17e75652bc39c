"""MemDLM's parametric memory: transient fast weights written by an inner loop.

For each batch (paper Sec. 3): draw the anchor state x_t, build a noisier pre-anchor state
x_pre (M_pre a superset of M_t), reset the fast weights phi_0 (B = 0, so delta W = 0), take
K plain SGD steps on the inner loss along the trajectory x_pre -> x_t -> x_0 (Eq. 6-8),
then compute the outer MDLM loss at x_t with phi_K applied (Eq. 9). First-order (Eq. 10):
phi_K is a constant for the outer backward; only theta learns. phi is thrown away.

Fast weights carry a batch dimension and each sequence's inner loss is normalised by its
own token count, so one autograd.grad call yields every sequence's own gradient and a
sequence's update equals its update alone.
"""
import math
from dataclasses import dataclass

import torch

from model import forward_process, masked_ce, mdlm_loss

TARGETS = ("gate_proj", "up_proj", "down_proj")
TRAJECTORIES = ("anchor", "anchor_only", "pre_only", "progressive")
SCOPES = ("response", "prompt", "all")
ADAPT_RATIO = 0.2  # the anchor mask ratio of inference-time adaptation (paper Sec. 4.5)


@dataclass
class MemoryConfig:
    rank: int = 32               # LoRA r
    alpha: float = 64.0          # LoRA alpha: delta W = (alpha / r) B A
    layer_frac: float = 0.1      # fast weights on the FFN of the last 10% of layers (>= 1)
    adapter: str = "lora"        # "lora" or "full" (a full-rank delta per projection)
    inner_steps: int = 2         # K
    inner_lr: float = 0.1        # eta, plain SGD
    clip: float = 1.0            # per-parameter, per-sequence gradient norm bound
    pre_scale: float = 1.5       # s: pre-anchor masked fraction = min(1, max(s r_t, r_t))
    trajectory: str = "anchor"   # see TRAJECTORIES
    weighting: str = "ratio"     # "ratio": stage weight 1/r (training); "uniform" (adapt)
    scope: str = "response"      # which tokens the training inner loop masks, see memdlm_loss

    def validate(self):
        if self.adapter not in ("lora", "full"):
            raise ValueError(f"adapter must be 'lora' or 'full', got {self.adapter!r}")
        if self.trajectory not in TRAJECTORIES:
            raise ValueError(f"trajectory must be one of {TRAJECTORIES}, got {self.trajectory!r}")
        if self.weighting not in ("ratio", "uniform"):
            raise ValueError(f"weighting must be 'ratio' or 'uniform', got {self.weighting!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.inner_steps < 1:
            raise ValueError("inner_steps must be >= 1")


def memory_layers(n_layer, layer_frac):
    """Indices of the layers that get fast weights: the last layer_frac of the stack."""
    n = max(1, int(layer_frac * n_layer))
    return list(range(n_layer - n, n_layer))


def init_fast(model, batch_size, mcfg, generator=None):
    """phi_0 for a batch: A ~ Kaiming-uniform(a=sqrt(5)) i.e. U(-1/sqrt(d_in), 1/sqrt(d_in)),
    B = 0 (LoRA), or D = 0 (full). Float32 leaves that require grad; {layer: {proj: tensors}}."""
    dev, dt = model.lm_head.weight.device, model.lm_head.weight.dtype
    fast = {}
    for i in memory_layers(model.cfg.n_layer, mcfg.layer_frac):
        fast[i] = {}
        for name in TARGETS:
            d_out, d_in = getattr(model.layers[i].ffn, name).weight.shape
            if mcfg.adapter == "lora":
                bound = 1.0 / math.sqrt(d_in)
                A = (torch.rand(batch_size, mcfg.rank, d_in, device=dev, generator=generator, dtype=dt) * 2 - 1) * bound
                B = torch.zeros(batch_size, d_out, mcfg.rank, device=dev, dtype=dt)
                fast[i][name] = (A.requires_grad_(), B.requires_grad_())
            else:
                fast[i][name] = (torch.zeros(batch_size, d_out, d_in, device=dev, dtype=dt, requires_grad=True),)
    return fast


def flat(fast):
    return [p for i in sorted(fast) for name in TARGETS for p in fast[i][name]]


def unflat(fast, tensors):
    it = iter(tensors)
    return {i: {name: tuple(next(it) for _ in fast[i][name]) for name in TARGETS} for i in fast}


def clip_per_sequence(g, max_norm):
    """Scale each sequence's gradient of one fast-weight tensor to norm <= max_norm."""
    norm = g.flatten(1).norm(dim=1).clamp(min=1e-12)
    return g * (max_norm / norm).clamp(max=1.0).view(-1, *[1] * (g.dim() - 1))


def sgd_step(fast, grads, mcfg, create_graph=False):
    """phi <- phi - eta * clip(grad), each tensor clipped on its own (per-parameter)."""
    new = [p - mcfg.inner_lr * clip_per_sequence(g, mcfg.clip) for p, g in zip(flat(fast), grads)]
    if not create_graph:  # first-order: the next step differentiates w.r.t. the new phi only
        new = [p.detach().requires_grad_() for p in new]
    return unflat(fast, new)


# ---------------------------------------------------------------------------------------
# Trajectories: nested masks M_1 ⊇ M_2 ⊇ ... ⊇ M_K

def extend_mask(mask, maskable, n_target, generator=None):
    """Add random masks among the maskable, still visible tokens until each row has
    n_target[b] masked tokens (rows already at or above it are left as they are)."""
    cand = maskable & ~mask
    score = torch.where(cand, torch.rand(mask.shape, device=mask.device, generator=generator), -1.0)
    rank = score.argsort(dim=1, descending=True).argsort(dim=1)
    k = (n_target - mask.sum(1)).clamp(min=0)
    return mask | (cand & (rank < k[:, None]))


def count_at(ratio, n):
    """round(ratio * n) per row, at most n."""
    return torch.minimum(torch.floor(torch.as_tensor(ratio, dtype=n.dtype, device=n.device) * n + 0.5), n).long()


def trajectory(mask_t, maskable, mcfg, generator=None):
    """The K masks of the inner loop, noisiest first.

    anchor      (paper default) x_pre -> ... -> x_t: the pre-anchor adds masks on top of M_t
                to reach min(1, max(s r_t, r_t)); K > 2 reveals the extra masks evenly;
                the last state is exactly x_t (mask_t itself, so its hidden states can be reused)
    anchor_only every step at x_t
    pre_only    every step at x_pre
    progressive the inconsistent variant: nested masks from 0.8 masked down to 0.8/K,
                drawn independently of the anchor
    """
    K, n = mcfg.inner_steps, maskable.sum(1).float()
    if mcfg.trajectory == "progressive":
        ratios = [0.8 * (K - k) / K for k in range(K)]  # noisiest first
        masks = [extend_mask(torch.zeros_like(mask_t), maskable, count_at(ratios[-1], n), generator)]
        for r in reversed(ratios[:-1]):
            masks.insert(0, extend_mask(masks[0], maskable, count_at(r, n), generator))
        return masks
    r_t = mask_t.sum(1) / n.clamp(min=1)
    n_pre = count_at(torch.clamp(torch.maximum(mcfg.pre_scale * r_t, r_t), max=1.0), n)
    if mcfg.trajectory == "anchor_only":
        return [mask_t] * K
    if mcfg.trajectory == "pre_only":
        return [extend_mask(mask_t, maskable, n_pre, generator)] * K
    n_t, masks = mask_t.sum(1), [mask_t]
    for k in range(1, K):  # the k-th state above the anchor; k = K-1 is x_pre
        masks.insert(0, extend_mask(masks[0], maskable, n_t + (n_pre - n_t) * k // (K - 1), generator))
    return masks


# ---------------------------------------------------------------------------------------
# Inner loop and the MemDLM training loss

def inner_loop(model, x0, masks, maskable, fast, mcfg, key_pad=None, anchor=None, create_graph=False):
    """K SGD steps on the fast weights along the trajectory `masks` (Eq. 6-8).

    Step k's inner loss for sequence b: sum over i in M_k of w_b * -log p_{theta,phi}(x0_i | x_k)
    / N_b, w_b = 1/r_k (weighting "ratio") or 1 ("uniform"), N_b its maskable tokens.
    Only the layers with fast weights run with grad: the layers below them run under no_grad,
    or, for the anchor state, `anchor = (mask_t, h_bottom)` supplies their output already
    computed. create_graph=True keeps the graph through the updates (exact bi-level).
    Returns phi_K and the per-step inner losses (each [B], detached).
    """
    split = min(fast)
    n = maskable.sum(1).float().clamp(min=1)
    losses = []
    for m in masks:
        if anchor is not None and m is anchor[0]:
            h = anchor[1] if create_graph else anchor[1].detach()
        else:
            with torch.set_grad_enabled(create_graph and torch.is_grad_enabled()):
                h = model(torch.where(m, model.cfg.mask_id, x0), key_pad=key_pad, hi=split)
        with torch.enable_grad():
            h = model(h, fast=fast, key_pad=key_pad, lo=split)
            w = torch.ones_like(n) if mcfg.weighting == "uniform" else n / m.sum(1).clamp(min=1)
            loss = masked_ce(model, h, x0, m, w) / n
            grads = torch.autograd.grad(loss.sum(), flat(fast), create_graph=create_graph)
        fast = sgd_step(fast, grads, mcfg, create_graph)
        losses.append(loss.detach())
    if not create_graph:  # first-order (Eq. 10): phi_K is a constant for the outer pass
        fast = unflat(fast, [p.detach() for p in flat(fast)])
    return fast, losses


def memdlm_loss(model, x0, maskable, mcfg, key_pad=None, generator=None, bottom=None, create_graph=False):
    """The outer MemDLM loss (Eq. 9) of one batch and the inner losses.

    mcfg.scope says which tokens the inner loop masks and scores:
      response  the paper: the maskable (scored) tokens; the trajectory ends at the outer x_t,
                whose bottom-layer output is shared by the last inner step and the outer pass
      prompt    only the context (the tokens that are not maskable), seen alone as
                inference-time adapt sees it: the response is hidden by key padding, the
                anchor masks ADAPT_RATIO of the prompt; the memory never sees the answer
      all       every token: the anchor is x_t with the prompt also masked at rate t
    bottom: the module that runs the layers below the fast weights for x_t with grad (the
    DDP wrapper under torchrun, so gradient sync covers every parameter).
    """
    x_t, mask_t, t = forward_process(x0, maskable, model.cfg.mask_id, generator=generator)
    fast = init_fast(model, x0.shape[0], mcfg, generator)
    split = min(fast)
    h_bottom = (model if bottom is None else bottom)(x_t, key_pad=key_pad, hi=split)
    if mcfg.scope == "response":
        masks = trajectory(mask_t, maskable, mcfg, generator)
        fast, inner = inner_loop(model, x0, masks, maskable, fast, mcfg, key_pad, (mask_t, h_bottom), create_graph)
    else:
        visible = torch.ones_like(maskable) if key_pad is None else ~key_pad
        inner_maskable = visible & ~maskable if mcfg.scope == "prompt" else visible
        n = inner_maskable.sum(1).float()
        if mcfg.scope == "prompt":
            inner_pad, anchor = ~inner_maskable, extend_mask(torch.zeros_like(mask_t), inner_maskable,
                                                             count_at(ADAPT_RATIO, n), generator)
        else:
            inner_pad, anchor = key_pad, extend_mask(mask_t, inner_maskable, count_at(t, n), generator)
        masks = trajectory(anchor, inner_maskable, mcfg, generator)
        fast, inner = inner_loop(model, x0, masks, inner_maskable, fast, mcfg, inner_pad, None, create_graph)
    h = model(h_bottom, fast=fast, key_pad=key_pad, lo=split)
    return mdlm_loss(model, h, x0, mask_t, t, maskable), inner


@torch.no_grad()
def adapt(model, prompt_ids, mcfg=None, key_pad=None, ratio=ADAPT_RATIO, steps=2, lr=0.1, generator=None):
    """Inference-time memory: write each prompt into its own fresh fast weights.

    Every (non-padding) prompt token is maskable; the anchor masks `ratio` of them, the
    pre-anchor min(1, 1.5 ratio); uniform weights; `steps` SGD steps. Returns (phi, losses).
    """
    mcfg = MemoryConfig(**{**(mcfg or MemoryConfig()).__dict__, "inner_steps": steps,
                           "inner_lr": lr, "weighting": "uniform", "trajectory": "anchor"})
    maskable = torch.ones_like(prompt_ids, dtype=torch.bool) if key_pad is None else ~key_pad
    n = maskable.sum(1).float()
    mask_t = extend_mask(torch.zeros_like(maskable), maskable, count_at(ratio, n).clamp(min=1), generator)
    fast = init_fast(model, prompt_ids.shape[0], mcfg, generator)
    masks = trajectory(mask_t, maskable, mcfg, generator)
    return inner_loop(model, prompt_ids, masks, maskable, fast, mcfg, key_pad)
