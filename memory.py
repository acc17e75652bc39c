"""MemDLM's parametric memory: transient fast weights written by an inner loop.

For each batch (paper Sec. 3): draw the anchor state x_t, build a noisier pre-anchor state
x_pre (M_pre a superset of M_t), reset the fast weights phi_0 (B = 0, so delta W = 0), take
K plain SGD steps (Eq. 6) along the trajectory: inner stage 1 at x_pre (Eq. 7), inner stage 2
at x_t (Eq. 8); then the outer MDLM loss at x_t with phi_K applied (Eq. 9), the bi-level
objective of Eq. 5. First-order (Eq. 10): phi_K is a constant for the outer backward; only
theta learns. phi is thrown away.

Where the paper is silent this follows the authors' code (JarvisPei/MemDLM): the inner
loss's normalisation, the layer rule, the pre-anchor's count. One deliberate difference:
the fast weights carry a batch dimension and each sequence's inner loss is its own, so one
gradient of the summed losses yields every sequence's own gradient and a sequence's update
equals its update alone (the authors share one set of fast weights per micro-batch).

The paper's path comes first; the variants (other trajectories, memory scopes, the full-rank
adapter) follow in the section "Beyond the paper".
"""
import math
from dataclasses import dataclass, fields, replace

import torch

from model import FastWeights, forward_process, gathered, masked_ce, mdlm_loss

TARGETS = ("gate_proj", "up_proj", "down_proj")
TRAJECTORIES = ("anchor", "anchor_only", "pre_only", "progressive")
SCOPES = ("response", "prompt", "all")
ADAPT_RATIO = 0.2  # the anchor mask ratio of inference-time adaptation (paper Sec. 4.5)


@dataclass
class MemoryConfig:
    """The memory's settings; train.py's key for each field is mem_<field> (its defaults are these)."""
    rank: int = 32               # LoRA r
    alpha: float = 64.0          # LoRA alpha: delta W = (alpha / r) B A
    layer_frac: float = 0.1      # fast weights on the FFN of the last 10% of layers (at least one)
    adapter: str = "lora"        # "lora", or "full" (a full-rank delta per projection)
    steps: int = 2               # K, inner steps
    lr: float = 0.1              # eta, plain SGD
    clip: float = 1.0            # per-parameter, per-sequence gradient norm bound
    pre_scale: float = 1.5       # s: pre-anchor masked fraction = min(1, max(s r_t, r_t))
    trajectory: str = "anchor"   # see TRAJECTORIES
    weighting: str = "ratio"     # "ratio": stage weight 1/r_k (training); "uniform" (adapt)
    scope: str = "response"      # which tokens the training inner loop masks, see memdlm_loss

    @property
    def scale(self):
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, cfg):
        """The mem_* keys of a train.py config (any missing one keeps its default)."""
        return cls(**{f.name: cfg[f"mem_{f.name}"] for f in fields(cls) if f"mem_{f.name}" in cfg})

    def validate(self):
        """Raise ValueError naming the first bad setting."""
        checks = [
            (self.adapter in ("lora", "full"), f"adapter must be 'lora' or 'full', got {self.adapter!r}"),
            (self.trajectory in TRAJECTORIES, f"trajectory must be one of {', '.join(TRAJECTORIES)}, got {self.trajectory!r}"),
            (self.weighting in ("ratio", "uniform"), f"weighting must be 'ratio' or 'uniform', got {self.weighting!r}"),
            (self.scope in SCOPES, f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}"),
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.rank >= 1, f"rank must be >= 1, got {self.rank}"),
            (math.isfinite(self.alpha) and self.alpha > 0, f"alpha must be finite and > 0 (0 switches the memory off), "
                                                           f"got {self.alpha}"),
            (0 < self.layer_frac <= 1, f"layer_frac must be in (0, 1], got {self.layer_frac}"),
            (math.isfinite(self.lr) and self.lr >= 0, f"lr must be finite and >= 0, got {self.lr}"),
            (self.clip > 0, f"clip must be > 0, got {self.clip}"),
            (math.isfinite(self.pre_scale) and self.pre_scale >= 1, f"pre_scale must be >= 1, got {self.pre_scale}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


@dataclass
class Rows:
    """A batch as the inner loop sees it: clean tokens x0 [B, T], the tokens it may mask and
    scores (maskable [B, T]), and padding (key_pad [B, T], True = never attended to; or None)."""
    x0: torch.Tensor
    maskable: torch.Tensor
    key_pad: torch.Tensor = None


@dataclass
class State:
    """One state x_k of the inner loop's trajectory: its mask M_k [B, T] and the hidden states
    of x_k entering the first memory layer (h [B, T, C], the bottom's output); at: model.gathered
    of the mask, computed outside the compiled inner step (None: masked_ce decides)."""
    rows: Rows
    mask: torch.Tensor
    h: torch.Tensor
    at: tuple = None


def memory_layers(n_layer, layer_frac):
    """The layers with fast weights, as the authors count them: from floor((1 - frac) L) to the
    top (2 of 14 layers at 10%, 1 of 8), at least the top layer."""
    first = min(int((1 - layer_frac) * n_layer), n_layer - 1)
    return list(range(first, n_layer))


# =======================================================================================
# The paper's path: phi_0, the trajectory, inner stages 1 and 2, the outer loss (Eq. 5-10)

def init_fast(model, batch_size, mcfg, generator=None):
    """phi_0 for a batch, the LoRA fast weights of model.fast_linear: A ~ Kaiming-uniform(a=sqrt(5)),
    i.e. U(-1/sqrt(d_in), 1/sqrt(d_in)), and B = 0, so delta W = (alpha/r) B A = 0: "phi_0 = 0"
    (Sec. 3.1, after Eq. 6). Float32 tensors (inner_step differentiates with respect to them)."""
    if mcfg.adapter == "full":  # beyond the paper
        return init_full(model, batch_size, mcfg)
    dev, dt = model.lm_head.weight.device, model.lm_head.weight.dtype
    layers = {}
    for i in memory_layers(model.cfg.n_layer, mcfg.layer_frac):
        layers[i] = {}
        for name in TARGETS:
            d_out, d_in = getattr(model.layers[i].ffn, name).weight.shape
            bound = 1.0 / math.sqrt(d_in)
            A = (torch.rand(batch_size, mcfg.rank, d_in, device=dev, generator=generator, dtype=dt) * 2 - 1) * bound
            layers[i][name] = (A, torch.zeros(batch_size, d_out, mcfg.rank, device=dev, dtype=dt))
    return FastWeights(layers, mcfg.scale)


def flat(fast):
    """The tensors of phi in a fixed order (layers, then gate/up/down, then A/B)."""
    return [p for i in sorted(fast.layers) for name in TARGETS for p in fast.layers[i][name]]


def unflat(fast, tensors):
    """FastWeights shaped as `fast`, holding `tensors` (in flat's order)."""
    it = iter(tensors)
    return FastWeights({i: {name: tuple(next(it) for _ in fast.layers[i][name]) for name in TARGETS}
                        for i in sorted(fast.layers)}, fast.scale)


def clip_per_sequence(g, max_norm):
    """Scale each sequence's gradient of one fast-weight tensor to norm <= max_norm."""
    norm = g.flatten(1).norm(dim=1).clamp(min=1e-12)
    return g * (max_norm / norm).clamp(max=1.0).view(-1, *[1] * (g.dim() - 1))


def sgd_step(fast, grads, mcfg):
    """Eq. 6: phi_k = phi_{k-1} - eta * clip(grad), each tensor clipped on its own (per-parameter:
    the paper measured global clipping worse)."""
    return unflat(fast, [p - mcfg.lr * clip_per_sequence(g, mcfg.clip) for p, g in zip(flat(fast), grads)])


def extend_mask(mask, maskable, n_target, generator=None):
    """Add random masks among the maskable, still visible tokens until each row has
    n_target[b] masked tokens (rows already at or above it are left as they are)."""
    cand = maskable & ~mask
    score = torch.where(cand, torch.rand(mask.shape, device=mask.device, generator=generator), -1.0)
    rank = score.argsort(dim=1, descending=True).argsort(dim=1)
    k = (n_target - mask.sum(1)).clamp(min=0)
    return mask | (cand & (rank < k[:, None]))


def pre_anchor_count(mask_t, maskable, mcfg):
    """The pre-anchor's masked count per row, int(min(1, max(s r_t, r_t)) N) with r_t = n_t / N
    the anchor's realised ratio (N the maskable tokens): computed from the counts, as
    min(N, max(floor(s n_t), n_t)) in float64, it is the exact floor (for s = 1.5 or 1.25 and any
    count; a float32 ratio times N falls below it in 4% of cases, by one token)."""
    n, n_t = maskable.sum(1), mask_t.sum(1)
    return torch.minimum(torch.maximum(torch.floor(mcfg.pre_scale * n_t.double()).long(), n_t), n)


def trajectory(mask_t, maskable, mcfg, generator=None):
    """The K masks of the inner loop, noisiest first (nested: M_1 ⊇ ... ⊇ M_K), and for each
    whether it is the anchor state x_t itself (whose bottom-layer output the outer pass shares).

    Anchor-consistent (Sec. 3.2): the pre-anchor x_pre adds masks on top of M_t up to
    pre_anchor_count; K > 2 reveals the extra masks evenly; the last state is exactly x_t.
    """
    if mcfg.trajectory != "anchor":  # beyond the paper
        return variant_trajectory(mask_t, maskable, mcfg, generator)
    n_pre, n_t, masks, K = pre_anchor_count(mask_t, maskable, mcfg), mask_t.sum(1), [mask_t], mcfg.steps
    for k in range(1, K):  # the k-th state above the anchor; k = K-1 is x_pre
        masks.insert(0, extend_mask(masks[0], maskable, n_t + (n_pre - n_t) * k // (K - 1), generator))
    return masks, [False] * (K - 1) + [True]


def inner_loss(model, h, state, weighting):
    """L_inner^(k) of each sequence [B] at state x_k (Eq. 7-8), from the final hidden states h,
    in the authors' form: w * the mean of -log p_{theta,phi}(x0_i | x_k) over i in M_k, with
    w = 1/r_k = N / |M_k| ("ratio", training) or 1 ("uniform", adaptation). So a sequence's
    loss is its masked tokens' NLL summed and divided by |M_k|^2 / N: the scale the authors'
    per-tensor clip at 1.0 was tuned for (it nearly always acts: normalised SGD steps).
    The target is x0 at every masked position, in stage 1 too, where Eq. 7 writes x_t: the
    authors' code scores the clean tokens, so stage 1 also learns the tokens x_t still hides."""
    n_masked = state.mask.sum(1).clamp(min=1)
    w = state.rows.maskable.sum(1) / n_masked if weighting == "ratio" else torch.ones_like(n_masked)
    return masked_ce(model, h, state.rows.x0, state.mask, w / n_masked, at=state.at)


def inner_step(model, fast, state, mcfg):
    """Eq. 6 at one state: phi_k = phi_{k-1} - eta clip(grad_phi L_inner^(k)); returns phi_k and
    L_inner^(k) [B]. Only the layers above the split run (the bottom's output is state.h).
    Under no_grad it is first-order; with grad enabled, phi_k keeps the graph to theta and phi_{k-1}."""
    def loss_of(params):  # each sequence's loss depends on its own phi only: the sum's gradient is per sequence
        h = model.top(state.h, min(fast.layers), fast=unflat(fast, params), key_pad=state.rows.key_pad)
        loss = inner_loss(model, h, state, mcfg.weighting)
        return loss.sum(), loss
    # torch.func.grad is torch.autograd.grad(loss, phi) of the same function, taken as a function of
    # phi: the top pass, its backward, the clip and the update are then one function that
    # torch.compile can take whole (train.py compiles inner_step on the GPU)
    grads, loss = torch.func.grad(loss_of, has_aux=True)(flat(fast))
    return sgd_step(fast, grads, mcfg), loss


def inner_loop(model, fast, masks, rows, mcfg, *, bottoms=None, create_graph=False, inner_step=inner_step):
    """The inner loop (Eq. 6-8): one SGD step at each state of the trajectory `masks`, noisiest
    first. At the states above the anchor, inner stage 1 (Eq. 7, pre-anchor alignment: x_pre
    toward the clean tokens); at the anchor x_t, inner stage 2 (Eq. 8, anchor to target).

    bottoms[k], where given, is the bottom layers' output for state k, already computed (the
    anchor's, shared with the outer pass); other states run the bottom here. First-order, the
    loop records no graph; create_graph=True keeps it through the updates (the exact bi-level
    gradient). inner_step: inner_step, or its compiled form.
    Returns phi_K and the per-step inner losses (each [B], detached).
    """
    split = min(fast.layers)  # the stack splits below the first memory layer
    losses = []
    with torch.set_grad_enabled(create_graph and torch.is_grad_enabled()):  # Eq. 10, first-order: no graph
        for k, mask in enumerate(masks):
            if bottoms is not None and bottoms[k] is not None:  # x_t: stage 2 (Eq. 8)
                h = bottoms[k] if create_graph else bottoms[k].detach()
            else:  # above the anchor: stage 1 (Eq. 7)
                h = model(torch.where(mask, model.cfg.mask_id, rows.x0), key_pad=rows.key_pad, stop=split)
            fast, loss = inner_step(model, fast, State(rows, mask, h, gathered(model, mask)), mcfg)
            losses.append(loss.detach().clone())  # a copy: under CUDA graphs the next replay reuses the output
    return fast, losses


def memdlm_loss(model, x0, maskable, mcfg, *, key_pad=None, generator=None, create_graph=False, bottom=None,
                inner_step=inner_step):
    """The outer MemDLM loss (Eq. 9, the objective of Eq. 5) of one batch, and the inner losses.

    x0, maskable, key_pad: the batch (see Rows). bottom: what runs the layers below the memory
    for x_t with grad (default model; the DDP wrapper under torchrun, so that gradient sync
    covers every parameter). inner_step: inner_step, or its compiled form. mcfg.scope other
    than "response" (the paper's) is beyond the paper (scoped_inner_loop).
    """
    rows = Rows(x0, maskable, key_pad)
    x_t, mask_t, t = forward_process(x0, maskable, model.cfg.mask_id, generator=generator)  # Eq. 1: the anchor x_t
    fast = init_fast(model, len(x0), mcfg, generator)  # phi_0: delta W = 0
    split = min(fast.layers)  # the stack splits below the first memory layer
    h_t = (model if bottom is None else bottom)(x_t, key_pad=key_pad, stop=split)  # once, with grad: for stage 2 and Eq. 9
    if mcfg.scope == "response":
        masks, at_anchor = trajectory(mask_t, maskable, mcfg, generator)  # [x_pre, x_t]
        bottoms = [h_t if a else None for a in at_anchor]
        fast, inner = inner_loop(model, fast, masks, rows, mcfg, bottoms=bottoms, create_graph=create_graph,
                                 inner_step=inner_step)  # Eq. 6-8: phi_0 -> phi_K
    else:  # beyond the paper
        fast, inner = scoped_inner_loop(model, fast, rows, mask_t, t, mcfg, generator=generator,
                                        create_graph=create_graph, inner_step=inner_step)
    h = model.top(h_t, split, fast=fast, key_pad=key_pad)  # p_{theta, phi_K}( . | x_t), phi_K a constant (Eq. 10)
    return mdlm_loss(model, h, x0, mask_t, t, maskable), inner  # Eq. 9: Eq. 2 with phi_K


def bernoulli_anchor(maskable, ratio, generator=None):
    """An anchor mask of the prompt as the authors draw it at inference: each maskable token
    masked with probability `ratio`; a row that drew none gets one (here, not in their code:
    an empty anchor writes nothing into the memory, and short prompts draw none often)."""
    u = torch.where(maskable, torch.rand(maskable.shape, device=maskable.device, generator=generator), 2.0)
    return (u < ratio) | ((u == u.min(1, keepdim=True).values) & maskable)


@torch.no_grad()
def adapt(model, prompt_ids, mcfg=None, *, key_pad=None, ratio=ADAPT_RATIO, steps=None, lr=None, generator=None,
          inner_step=inner_step):
    """Inference-time memory (Sec. 4.5, "Train & Inference"): the inner loop on each prompt alone,
    into its own fresh fast weights, from an anchor that masks each (non-padding) prompt token with
    probability `ratio`, uniformly weighted (the mean NLL of the masked tokens). K and eta: mcfg's
    (the checkpoint's) unless steps, lr say otherwise. inner_step: it, or a wrapper (sample.py
    counts the steps). Returns (phi, losses)."""
    mcfg = replace(mcfg or MemoryConfig(), weighting="uniform", trajectory="anchor")
    mcfg = replace(mcfg, steps=mcfg.steps if steps is None else steps, lr=mcfg.lr if lr is None else lr)
    rows = Rows(prompt_ids, torch.ones_like(prompt_ids, dtype=torch.bool) if key_pad is None else ~key_pad, key_pad)
    mask_t = bernoulli_anchor(rows.maskable, ratio, generator)
    fast = init_fast(model, len(prompt_ids), mcfg, generator)
    masks, _ = trajectory(mask_t, rows.maskable, mcfg, generator)
    return inner_loop(model, fast, masks, rows, mcfg, inner_step=inner_step)


# =======================================================================================
# Beyond the paper: other trajectories, memory scopes, the full-rank adapter

def floor_count(ratio, n):
    """int(ratio * n) per row (the authors' rounding: down), at most n."""
    return torch.minimum(torch.floor(torch.as_tensor(ratio, dtype=n.dtype, device=n.device) * n), n).long()


def variant_trajectory(mask_t, maskable, mcfg, generator=None):
    """trajectory's variants (mcfg.trajectory), for ablations:
    anchor_only every step at x_t
    pre_only    every step at x_pre
    progressive the inconsistent variant: nested masks from 0.8 masked down to 0.8/K,
                drawn independently of the anchor
    """
    K, n = mcfg.steps, maskable.sum(1).float()
    if mcfg.trajectory == "anchor_only":
        return [mask_t] * K, [True] * K
    if mcfg.trajectory == "pre_only":
        return [extend_mask(mask_t, maskable, pre_anchor_count(mask_t, maskable, mcfg), generator)] * K, [False] * K
    ratios = [0.8 * (K - k) / K for k in range(K)]  # progressive, noisiest first
    masks = [extend_mask(torch.zeros_like(mask_t), maskable, floor_count(ratios[-1], n), generator)]
    for r in reversed(ratios[:-1]):
        masks.insert(0, extend_mask(masks[0], maskable, floor_count(r, n), generator))
    return masks, [False] * K


def scoped_inner_loop(model, fast, rows, mask_t, t, mcfg, *, generator=None, create_graph=False,
                      inner_step=inner_step):
    """The inner loop of the memory scopes beyond the paper's "response" (the maskable tokens):
      prompt  only the context (the tokens that are not maskable), seen alone as inference-time
              adapt sees it: the response is hidden by key padding, the anchor masks ADAPT_RATIO
              of the prompt; the memory never sees the answer
      all     every token: the anchor is x_t with the prompt also masked at rate t
    """
    visible = torch.ones_like(rows.maskable) if rows.key_pad is None else ~rows.key_pad
    if mcfg.scope == "prompt":
        inner = Rows(rows.x0, visible & ~rows.maskable, ~(visible & ~rows.maskable))
        anchor = bernoulli_anchor(inner.maskable, ADAPT_RATIO, generator)
    else:
        inner = Rows(rows.x0, visible, rows.key_pad)
        anchor = extend_mask(mask_t, inner.maskable, floor_count(t, inner.maskable.sum(1).float()), generator)
    masks, _ = trajectory(anchor, inner.maskable, mcfg, generator)
    return inner_loop(model, fast, masks, inner, mcfg, create_graph=create_graph, inner_step=inner_step)


def init_full(model, batch_size, mcfg):
    """phi_0 of the full-rank adapter: a delta D = 0 [B, d_out, d_in] per projection (model.fast_linear
    adds x D^T). The paper measured it worse than LoRA (0.602 vs 0.684)."""
    p = model.lm_head.weight
    return FastWeights({i: {name: (torch.zeros(batch_size, *getattr(model.layers[i].ffn, name).weight.shape,
                                               device=p.device, dtype=p.dtype),) for name in TARGETS}
                        for i in memory_layers(model.cfg.n_layer, mcfg.layer_frac)}, mcfg.scale)
