"""MemDLM's parametric memory: transient fast weights written by an inner loop.

For each batch (paper Sec. 3): draw the anchor state x_t, build a noisier pre-anchor state
x_pre (M_pre a superset of M_t), reset the fast weights phi_0 (B = 0, so delta W = 0), take
K plain SGD steps on the inner loss along the trajectory x_pre -> x_t -> x_0 (Eq. 6-8),
then compute the outer MDLM loss at x_t with phi_K applied (Eq. 9). First-order (Eq. 10):
phi_K is a constant for the outer backward; only theta learns. phi is thrown away.

Where the paper is silent this follows the authors' code (JarvisPei/MemDLM): the inner
loss's normalisation, the layer rule, the pre-anchor's count. One deliberate difference:
the fast weights carry a batch dimension and each sequence's inner loss is its own, so one
gradient of the summed losses yields every sequence's own gradient and a sequence's update
equals its update alone (the authors share one set of fast weights per micro-batch).
"""
import math
from dataclasses import dataclass, fields

import torch

from model import FastWeights, forward_process, masked_ce, mdlm_loss

TARGETS = ("gate_proj", "up_proj", "down_proj")
TRAJECTORIES = ("anchor", "anchor_only", "pre_only", "progressive")
SCOPES = ("response", "prompt", "all")
ADAPT_RATIO = 0.2  # the anchor mask ratio of inference-time adaptation (paper Sec. 4.5)


@dataclass
class MemoryConfig:
    """The memory's settings; train.py's key for each field is mem_<field>."""
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
            (math.isfinite(self.alpha), f"alpha must be finite, got {self.alpha}"),
            (0 < self.layer_frac <= 1, f"layer_frac must be in (0, 1], got {self.layer_frac}"),
            (math.isfinite(self.lr) and self.lr >= 0, f"lr must be finite and >= 0, got {self.lr}"),
            (self.clip > 0, f"clip must be > 0, got {self.clip}"),
            (math.isfinite(self.pre_scale) and self.pre_scale >= 1, f"pre_scale must be >= 1, got {self.pre_scale}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


def memory_layers(n_layer, layer_frac):
    """The layers with fast weights, as the authors count them: from floor((1 - frac) L) to the
    top (2 of 14 layers at 10%, 1 of 8), at least the top layer."""
    first = min(int((1 - layer_frac) * n_layer), n_layer - 1)
    return list(range(first, n_layer))


def init_fast(model, batch_size, mcfg, generator=None):
    """phi_0 for a batch: A ~ Kaiming-uniform(a=sqrt(5)) i.e. U(-1/sqrt(d_in), 1/sqrt(d_in)),
    B = 0 (LoRA), or D = 0 (full): delta W = 0. Float32 tensors (inner_step differentiates
    with respect to them as a function's inputs)."""
    dev, dt = model.lm_head.weight.device, model.lm_head.weight.dtype
    layers = {}
    for i in memory_layers(model.cfg.n_layer, mcfg.layer_frac):
        layers[i] = {}
        for name in TARGETS:
            d_out, d_in = getattr(model.layers[i].ffn, name).weight.shape
            if mcfg.adapter == "lora":
                bound = 1.0 / math.sqrt(d_in)
                A = (torch.rand(batch_size, mcfg.rank, d_in, device=dev, generator=generator, dtype=dt) * 2 - 1) * bound
                B = torch.zeros(batch_size, d_out, mcfg.rank, device=dev, dtype=dt)
                layers[i][name] = (A, B)
            else:
                layers[i][name] = (torch.zeros(batch_size, d_out, d_in, device=dev, dtype=dt),)
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


def bernoulli_anchor(maskable, ratio, generator=None):
    """An anchor mask of the prompt as the authors draw it at inference: each maskable token
    masked with probability `ratio`; a row that drew none gets one (here, not in their code:
    an empty anchor writes nothing into the memory, and short prompts draw none often)."""
    u = torch.where(maskable, torch.rand(maskable.shape, device=maskable.device, generator=generator), 2.0)
    return (u < ratio) | ((u == u.min(1, keepdim=True).values) & maskable)


def floor_count(ratio, n):
    """int(ratio * n) per row (the authors' rounding: down), at most n."""
    return torch.minimum(torch.floor(torch.as_tensor(ratio, dtype=n.dtype, device=n.device) * n), n).long()


def trajectory(mask_t, maskable, mcfg, generator=None):
    """The K masks of the inner loop, noisiest first, and for each whether it is the anchor
    state x_t itself (whose bottom-layer output the outer pass shares).

    anchor      (paper default) x_pre -> ... -> x_t: the pre-anchor adds masks on top of M_t
                to reach int(min(1, max(s r_t, r_t)) N) (r_t the realised ratio, N the maskable
                tokens); K > 2 reveals the extra masks evenly; the last state is exactly x_t
    anchor_only every step at x_t
    pre_only    every step at x_pre
    progressive the inconsistent variant: nested masks from 0.8 masked down to 0.8/K,
                drawn independently of the anchor
    """
    K, n = mcfg.steps, maskable.sum(1).float()
    if mcfg.trajectory == "progressive":
        ratios = [0.8 * (K - k) / K for k in range(K)]  # noisiest first
        masks = [extend_mask(torch.zeros_like(mask_t), maskable, floor_count(ratios[-1], n), generator)]
        for r in reversed(ratios[:-1]):
            masks.insert(0, extend_mask(masks[0], maskable, floor_count(r, n), generator))
        return masks, [False] * K
    r_t = mask_t.sum(1) / n.clamp(min=1)
    n_pre = floor_count(torch.clamp(torch.maximum(mcfg.pre_scale * r_t, r_t), max=1.0), n)
    if mcfg.trajectory == "anchor_only":
        return [mask_t] * K, [True] * K
    if mcfg.trajectory == "pre_only":
        return [extend_mask(mask_t, maskable, n_pre, generator)] * K, [False] * K
    n_t, masks = mask_t.sum(1), [mask_t]
    for k in range(1, K):  # the k-th state above the anchor; k = K-1 is x_pre
        masks.insert(0, extend_mask(masks[0], maskable, n_t + (n_pre - n_t) * k // (K - 1), generator))
    return masks, [False] * (K - 1) + [True]


# ---------------------------------------------------------------------------------------
# Inner loop and the MemDLM training loss

def inner_loss(model, h, x0, mask, maskable, weighting):
    """L_inner^(k) of each sequence [B] (Eq. 7-8) at state x_k (masked positions M_k), in the
    authors' form: w * the mean of -log p_{theta,phi}(x0_i | x_k) over i in M_k, with
    w = 1/r_k = N / |M_k| ("ratio", training) or 1 ("uniform", adaptation). So a sequence's
    loss is its masked tokens' NLL summed and divided by |M_k|^2 / N: the scale the authors'
    per-tensor clip at 1.0 was tuned for (it nearly always acts: normalised SGD steps).
    The target is x0 at every masked position, in stage 1 too, where Eq. 7 writes x_t: the
    authors' code scores the clean tokens, so stage 1 also learns the tokens x_t still hides."""
    n_masked = mask.sum(1).clamp(min=1)
    w = maskable.sum(1) / n_masked if weighting == "ratio" else torch.ones_like(n_masked)
    return masked_ce(model, h, x0, mask, w / n_masked)


def inner_step(model, h, x0, mask, maskable, fast, mcfg, key_pad=None):
    """One SGD step on the fast weights at state x_k (Eq. 6-8): phi_k and L_inner^(k) [B].
    h: the hidden states of x_k entering the first memory layer. The gradient is a function
    of phi alone (torch.func.grad), so the top pass, its backward, the clip and the update are
    one function torch.compile can take whole (train.py compiles it on the GPU). Under
    no_grad it is first-order; with grad enabled, phi_k keeps the graph to theta and phi_{k-1}."""
    def total(params):  # each sequence's loss depends on its own phi only: the sum's gradient is per sequence
        loss = inner_loss(model, model(h, fast=unflat(fast, params), key_pad=key_pad, lo=min(fast.layers)),
                          x0, mask, maskable, mcfg.weighting)
        return loss.sum(), loss
    grads, loss = torch.func.grad(total, has_aux=True)(flat(fast))
    return sgd_step(fast, grads, mcfg), loss


def inner_loop(model, x0, masks, maskable, fast, mcfg, key_pad=None, bottoms=None, create_graph=False,
               step=inner_step):
    """K SGD steps on the fast weights along the trajectory `masks` (Eq. 6-8).

    First-order, the loop records no graph: the layers below the memory run plain, or, where
    bottoms[k] is given, their output for step k's state is already computed (the anchor
    state's, shared with the outer pass), and step differentiates the top with respect to phi
    alone. create_graph=True keeps the graph through the updates (exact bi-level). step:
    inner_step, or its compiled form.
    Returns phi_K and the per-step inner losses (each [B], detached).
    """
    first_mem = min(fast.layers)  # the stack splits below the first memory layer
    losses = []
    with torch.set_grad_enabled(create_graph and torch.is_grad_enabled()):  # first-order (Eq. 10): no graph
        for k, m in enumerate(masks):
            if bottoms is not None and bottoms[k] is not None:
                h = bottoms[k] if create_graph else bottoms[k].detach()
            else:
                h = model(torch.where(m, model.cfg.mask_id, x0), key_pad=key_pad, hi=first_mem)
            fast, loss = step(model, h, x0, m, maskable, fast, mcfg, key_pad)
            losses.append(loss.detach().clone())  # a copy: under CUDA graphs the next replay reuses the output
    return fast, losses


def scoped_inner_loop(model, x0, maskable, mask_t, t, fast, mcfg, key_pad=None, generator=None,
                      create_graph=False, step=inner_step):
    """The inner loop of the memory scopes beyond the paper's (see memdlm_loss)."""
    visible = torch.ones_like(maskable) if key_pad is None else ~key_pad
    if mcfg.scope == "prompt":  # the context alone, as adapt sees it: the response is padding
        inner_maskable = visible & ~maskable
        inner_pad = ~inner_maskable
        anchor = bernoulli_anchor(inner_maskable, ADAPT_RATIO, generator)
    else:  # "all": x_t with the prompt also masked at rate t
        inner_maskable, inner_pad = visible, key_pad
        anchor = extend_mask(mask_t, inner_maskable, floor_count(t, inner_maskable.sum(1).float()), generator)
    masks, _ = trajectory(anchor, inner_maskable, mcfg, generator)
    return inner_loop(model, x0, masks, inner_maskable, fast, mcfg, inner_pad, None, create_graph, step)


def memdlm_loss(model, x0, maskable, mcfg, key_pad=None, generator=None, bottom=None, create_graph=False,
                step=inner_step):
    """The outer MemDLM loss (Eq. 9) of one batch and the inner losses.

    mcfg.scope says which tokens the inner loop masks and scores:
      response  the paper: the maskable (scored) tokens; the trajectory ends at the outer x_t,
                whose bottom-layer output is shared by the last inner step and the outer pass
      prompt    only the context (the tokens that are not maskable), seen alone as
                inference-time adapt sees it: the response is hidden by key padding, the
                anchor masks ADAPT_RATIO of the prompt; the memory never sees the answer
      all       every token: the anchor is x_t with the prompt also masked at rate t
    bottom: the module that runs the layers below the fast weights for x_t with grad (the
    DDP wrapper under torchrun, so gradient sync covers every parameter). step: inner_step, or
    its compiled form.
    """
    x_t, mask_t, t = forward_process(x0, maskable, model.cfg.mask_id, generator=generator)  # Eq. 1
    fast = init_fast(model, x0.shape[0], mcfg, generator)  # phi_0
    first_mem = min(fast.layers)  # the stack splits below the first memory layer
    h_bottom = (model if bottom is None else bottom)(x_t, key_pad=key_pad, hi=first_mem)
    if mcfg.scope == "response":
        masks, at_anchor = trajectory(mask_t, maskable, mcfg, generator)
        bottoms = [h_bottom if a else None for a in at_anchor]
        fast, inner = inner_loop(model, x0, masks, maskable, fast, mcfg, key_pad, bottoms, create_graph, step)
    else:
        fast, inner = scoped_inner_loop(model, x0, maskable, mask_t, t, fast, mcfg, key_pad, generator, create_graph,
                                        step)
    h = model(h_bottom, fast=fast, key_pad=key_pad, lo=first_mem)  # p_{theta, phi_K}( . | x_t)
    return mdlm_loss(model, h, x0, mask_t, t, maskable), inner  # Eq. 9 (Eq. 2 with phi_K)


@torch.no_grad()
def adapt(model, prompt_ids, mcfg=None, key_pad=None, ratio=ADAPT_RATIO, steps=2, lr=0.1, generator=None):
    """Inference-time memory (paper Sec. 4.5, "Train & Inference"): write each prompt into its
    own fresh fast weights. Every (non-padding) prompt token is maskable; the anchor masks each
    with probability `ratio` (bernoulli_anchor), the pre-anchor raises the realised ratio
    by pre_scale (1.5); uniform weights, so each step's loss is the mean NLL over the masked
    prompt tokens; `steps` SGD steps.
    Returns (phi, losses)."""
    mcfg = MemoryConfig(**{**(mcfg or MemoryConfig()).__dict__, "steps": steps, "lr": lr,
                           "weighting": "uniform", "trajectory": "anchor"})
    maskable = torch.ones_like(prompt_ids, dtype=torch.bool) if key_pad is None else ~key_pad
    mask_t = bernoulli_anchor(maskable, ratio, generator)
    fast = init_fast(model, prompt_ids.shape[0], mcfg, generator)
    masks, _ = trajectory(mask_t, maskable, mcfg, generator)
    return inner_loop(model, prompt_ids, masks, maskable, fast, mcfg, key_pad)
