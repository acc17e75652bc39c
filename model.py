"""A bidirectional transformer for masked diffusion, the forward (masking) process and the
MDLM loss.

The FFN of every layer accepts optional per-sequence fast weights (MemDLM's parametric
memory, see memory.py) as plain tensors passed into the forward (FastWeights). Nothing is
patched into the modules; with no fast weights, or with B = 0, the output is exactly the
base model's.
"""
import json
import math
import os
import pickle
import re
import signal
import stat
import threading
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

MASK_EPS = 1e-3  # t ~ U(eps, 1)


@dataclass
class ModelConfig:
    vocab_size: int = 320      # embedding rows: the tokenizer's n_vocab rounded up to 64
    n_vocab: int = 258         # real tokens (the sampler never proposes the padding rows)
    mask_id: int = 257
    eot_id: int = 256
    block_size: int = 256      # training context; RoPE lets the model run longer
    n_layer: int = 8           # (these defaults are train.py's)
    n_head: int = 6
    n_embd: int = 384
    ffn_mult: float = 8 / 3    # SwiGLU hidden = ffn_mult * n_embd, rounded up to 64
    rope_theta: float = 10000.0
    attn_chunk: int = 0        # 0: full attention; W > 0: each token attends only within its chunk of W tokens
    rope_scaling: str = "none" # past block_size at inference: "ntk" (NTK-aware theta) or "pi" (position interpolation)

    @property
    def ffn_hidden(self):
        return 64 * math.ceil(self.ffn_mult * self.n_embd / 64)


ROPE_SCALINGS = ("none", "ntk", "pi")


def rope_tables(T, head_dim, theta, device, trained=None, scaling="none"):
    """cos, sin [T, head_dim / 2] of RoPE's angles. Past the trained length, scaling stretches
    them by s = T / trained so that T positions span the angles the model saw: "pi" divides the
    positions by s (position interpolation, arXiv:2306.15595), "ntk" raises the base theta by
    s^(d / (d - 2)) (NTK-aware scaling), which keeps the fastest rotations as trained."""
    s = T / trained if trained and T > trained else 1.0
    if scaling == "ntk":
        theta = theta * s ** (head_dim / (head_dim - 2))
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    pos = torch.arange(T, device=device, dtype=torch.float32)
    ang = torch.outer(pos / s if scaling == "pi" else pos, inv)
    return ang.cos(), ang.sin()


def apply_rope(x, cos, sin):
    # x: [B, H, T, D]; rotate pairs (first half, second half)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


@dataclass
class FastWeights:
    """phi: per-sequence fast weights. layers maps a layer index to that layer's fast weights,
    {"gate_proj" | "up_proj" | "down_proj": the projection's tensors}: a LoRA pair (A [B, r, d_in],
    B [B, d_out, r]), or beyond the paper a full-rank delta (D [B, d_out, d_in],). scale is the
    LoRA alpha / r. Both belong to the memory (memory.py), not to the model: any rank and alpha
    run on any checkpoint."""
    layers: dict
    scale: float = 1.0


def fast_linear(x, lin, phi, scale):
    """lin(x) plus the per-sequence delta of this projection's fast weights phi: Eq. 5's LoRA,
    scale * x A^T B^T for phi = (A, B); x D^T for a full-rank phi = (D,)."""
    y = lin(x)
    if phi is None:
        return y
    if len(phi) == 1:  # the full-rank adapter (memory.py, beyond the paper)
        return y + torch.bmm(x, phi[0].mT.to(x.dtype))
    A, B = phi
    return y + scale * torch.bmm(torch.bmm(x, A.mT.to(x.dtype)), B.mT.to(x.dtype))


class KVCache:
    """The keys and values of a prefix of the canvas, per layer, for sample.py's prefix cache
    (as nanochat's KVCache, here for a bidirectional model). Two modes:

    recording  (reading=False) a forward of the whole canvas stores each layer's keys (rotated)
               and values [B, H, T, D]; keep_prefix then cuts them to a prefix and switches
    reading    (reading=True) a forward of a slice of the canvas at positions pos [B, T] (for
               RoPE) attends to the cached keys/values [B, H, P, D] and then to its own
    """

    def __init__(self):
        self.keys, self.values = {}, {}  # layer index -> [B, H, P, D]
        self.pad = None       # [B, P], True at cached positions the reader must not see; None: all seen
        self.pos = None       # [B, T], the positions of the tokens a reading forward runs
        self.reading = False

    def update(self, layer, k, v):
        """A layer's own keys/values [B, H, T, D] -> the keys/values it attends to."""
        if not self.reading:
            self.keys[layer], self.values[layer] = k, v
            return k, v
        return torch.cat([self.keys[layer], k], 2), torch.cat([self.values[layer], v], 2)

    def keep_prefix(self, ends, pos):
        """Keep each row's positions before ends [B] (cut to the longest such prefix, P; a row's
        positions from its end on are hidden by pad) and read from now on, at positions pos [B, T]."""
        P = int(ends.max())
        self.keys = {i: k[:, :, :P] for i, k in self.keys.items()}
        self.values = {i: v[:, :, :P] for i, v in self.values.items()}
        stale = torch.arange(P, device=ends.device) >= ends[:, None]
        self.pad = stale if stale.any() else None  # no mask at all: SDPA may use its fastest kernel
        self.pos, self.reading = pos, True


def chunked_attention(q, k, v, visible, W):
    """Bidirectional attention within chunks of W positions (0-W, W-2W, ...): q, k, v [B, H, T, D],
    visible [B, T] (False at padding) or None. The chunks are folded into the batch, so SDPA keeps
    its fast kernels and costs T W rather than T^2. T is padded up to a multiple of W with hidden
    keys; a chunk with no visible key (all padding) sees all of its own: its queries are padding
    too, and a query that sees no key would give NaN."""
    B, H, T, D = q.shape
    n = -(-T // W)
    mask = None
    if visible is not None or n * W > T:  # no mask at all where none is needed: SDPA's fastest kernel
        real = (torch.arange(n * W, device=q.device) < T).view(1, n, W)  # False at the padding up to n W
        visible = F.pad(torch.ones(B, T, dtype=torch.bool, device=q.device) if visible is None else visible,
                        (0, n * W - T)).view(B, n, W)
        mask = (visible | (real & ~visible.any(-1, keepdim=True))).view(B * n, 1, 1, W)
    q, k, v = (F.pad(x, (0, 0, 0, n * W - T)) for x in (q, k, v))
    fold = lambda x: x.view(B, H, n, W, D).transpose(1, 2).reshape(B * n, H, W, D)
    y = F.scaled_dot_product_attention(fold(q), fold(k), fold(v), attn_mask=mask)
    return y.view(B, n, H, W, D).transpose(1, 2).reshape(B, H, n * W, D)[:, :, :T]


class Attention(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.n_head, self.layer, self.chunk = cfg.n_head, layer, cfg.attn_chunk
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, attn_mask, cache=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # [B, H, T, D] each
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.chunk and T > self.chunk:  # local attention (a model option: see ModelConfig.attn_chunk)
            if cache is not None:
                raise ValueError("the prefix cache attends to a whole prefix: it cannot run with attn_chunk")
            y = chunked_attention(q, k, v, None if attn_mask is None else attn_mask[:, 0, 0], self.chunk)
            return self.proj(y.transpose(1, 2).reshape(B, T, C))
        if cache is not None:  # record k, v; or attend to the cached prefix's too: [B, H, P + T, D]
            k, v = cache.update(self.layer, k, v)
        # bidirectional: every position sees every (non-padding) position
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=False)  # [B, H, T, D]
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=False)

    def forward(self, x, phi=None, scale=1.0):
        """phi: this layer's fast weights, {projection name: its tensors} (FastWeights.layers[i])."""
        phi = phi or {}
        g = fast_linear(x, self.gate_proj, phi.get("gate_proj"), scale)
        u = fast_linear(x, self.up_proj, phi.get("up_proj"), scale)
        return fast_linear(F.silu(g) * u, self.down_proj, phi.get("down_proj"), scale)


class Block(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.n_embd)
        self.attn = Attention(cfg, layer)
        self.ffn_norm = nn.RMSNorm(cfg.n_embd)
        self.ffn = SwiGLU(cfg)

    def forward(self, x, cos, sin, attn_mask, phi=None, scale=1.0, cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, attn_mask, cache)
        return x + self.ffn(self.ffn_norm(x), phi, scale)


class DiffusionLM(nn.Module):
    """Bidirectional transformer, no time conditioning: the mask tokens say how noisy x_t is."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        # RoPE tables for the training length, computed once; longer inputs get fresh ones
        cos, sin = rope_tables(cfg.block_size, cfg.n_embd // cfg.n_head, cfg.rope_theta, None)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)
        for n, p in self.named_parameters():  # GPT-2 style scaled init of residual projections
            if n.endswith(("attn.proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, fast=None, key_pad=None, cache=None, stop=None):
        """Token ids [B, T] -> the final hidden states [B, T, C], of p_theta or, with fast weights
        (FastWeights), of p_{theta, phi}. key_pad: bool [B, T], True at padding (never attended to).
        stop=k: only the layers below k, no final norm: the bottom of the memory split (see top).
        cache: a KVCache (sample.py's prefix cache). Recording, the forward stores every layer's
        keys/values; reading, idx is a slice of the sequence at positions cache.pos, with no
        padding, which also attends to the cached prefix (key_pad is then cache.pad's)."""
        return self._layers(self.tok_emb(idx), 0, self.cfg.n_layer if stop is None else stop, fast, key_pad, cache)

    def top(self, h, start, fast=None, key_pad=None):
        """The hidden states [B, T, C] entering layer start -> the final hidden states: the top of
        the memory split. top(forward(x, stop=k), k) equals forward(x), so the memory's inner loop
        reuses the bottom layers' output of a state."""
        return self._layers(h, start, self.cfg.n_layer, fast, key_pad, None)

    def _layers(self, h, lo, hi, fast, key_pad, cache):
        """Layers [lo, hi) on the hidden states h; the final norm when hi reaches the top."""
        B, T = h.shape[:2]
        pos = cache.pos if cache is not None and cache.reading else None
        n = T if pos is None else int(pos.max()) + 1  # positions the RoPE tables must cover
        if n <= self.rope_cos.shape[0]:
            cos, sin = self.rope_cos[:n], self.rope_sin[:n]
        else:
            cos, sin = rope_tables(n, self.cfg.n_embd // self.cfg.n_head, self.cfg.rope_theta, h.device,
                                   trained=self.cfg.block_size, scaling=self.cfg.rope_scaling)
        if pos is not None:  # each row its own positions: [B, 1, T, D/2], broadcast over heads
            cos, sin = cos[pos][:, None], sin[pos][:, None]
            # the keys: the cached prefix's, then the T tokens' own (no padding among them)
            key_pad = None if cache.pad is None else torch.cat([cache.pad, cache.pad.new_zeros(B, T)], 1)
        attn_mask = None if key_pad is None else ~key_pad[:, None, None, :]  # [B, 1, 1, keys]
        for i in range(lo, hi):
            h = self.layers[i](h, cos, sin, attn_mask, None if fast is None else fast.layers.get(i),
                               1.0 if fast is None else fast.scale, cache)
        return self.norm(h) if hi == self.cfg.n_layer else h

    def logits(self, h):
        """Vocabulary logits of final hidden states; callers pass only the scored positions."""
        return self.lm_head(h)

    def nll(self, h, y):
        """-log p(y_i | h_i) of final hidden states [N, C] and targets [N], in float32 (float64
        stays). The head and the loss in one function: compiled (train.py), the logits' cast and
        log-softmax fuse into the loss's kernels, where run op by op each writes a copy of the
        [N, vocabulary] logits (13 GB at 16K tokens of o200k_base)."""
        logits = self.logits(h)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(logits, y, reduction="none")


# ---------------------------------------------------------------------------------------
# Forward process and MDLM loss (paper Eq. 1-2)

def forward_process(x0, maskable, mask_id, t=None, generator=None):
    """Absorbing-state masking with a linear schedule: each maskable token becomes <|mask|>
    with probability t, t ~ U(eps, 1) per sequence (Eq. 1). Returns x_t, mask M_t, t."""
    B = x0.shape[0]
    if t is None:
        t = MASK_EPS + (1 - MASK_EPS) * torch.rand(B, device=x0.device, generator=generator)
    mask = (torch.rand(x0.shape, device=x0.device, generator=generator) < t[:, None]) & maskable
    return torch.where(mask, mask_id, x0), mask, t


# Above this many logits (positions x vocabulary) masked_ce gathers the masked positions first.
GATHER_ABOVE = 2 ** 28


def gathers(n_positions, vocab_size):
    """Whether masked_ce takes the logits at the masked positions alone: more than GATHER_ABOVE logits."""
    return n_positions * vocab_size > GATHER_ABOVE


def gathered(model, mask):
    """The masked positions (b, i) where masked_ce takes logits there alone (a large vocabulary),
    else None. One host sync: their count. memory.py computes them where a state is made, outside
    the compiled inner step: a count that depends on the data is a graph break, and one inside
    torch.func.grad makes torch.compile run the whole step eagerly (torch 2.11)."""
    return mask.nonzero(as_tuple=True) if gathers(mask.numel(), model.cfg.vocab_size) else None


def masked_ce(model, h, x0, mask, weight, at=None):
    """sum over masked positions of weight[b] * -log p(x0_i | .), per sequence: [B].
    With a small vocabulary (the byte tokenizer's 320 rows) logits at every position cost
    less than gathering the masked ones, which needs their count on the host: a sync that
    stalls the queue of kernels every step. A large vocabulary gets logits only where masked
    (at: gathered(model, mask), if the caller has it)."""
    at = gathered(model, mask) if at is None else at
    if at is None:
        return (model.nll(h.flatten(0, 1), x0.flatten()).view(mask.shape) * mask * weight[:, None]).sum(1)
    b, i = at
    loss = model.nll(h[b, i], x0[b, i])
    return torch.zeros(x0.shape[0], device=x0.device, dtype=loss.dtype).index_add(0, b, loss * weight[b])


def mdlm_loss(model, h, x0, mask, t, maskable):
    """L_mdlm = sum_{i in M_t} (1/t) * -log p(x0_i | x_t) / N, N = maskable tokens in the
    batch (Eq. 2, token normalisation). h: final hidden states of x_t."""
    return masked_ce(model, h, x0, mask, 1.0 / t).sum() / maskable.sum().clamp(min=1)


def proposal_logits(logits, cfg):
    """Logits over what a sampler may propose: the real tokens (the embedding's padding rows cut
    off), the mask token ruled out."""
    logits = logits[..., :cfg.n_vocab].clone()
    logits[..., cfg.mask_id] = float("-inf")
    return logits


def pick_device(name):
    """'auto': the GPU if there is one, else the CPU; a GPU asked for must be there."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise SystemExit(f"--device={name}: use auto, cpu, cuda or cuda:N")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device={name} was asked for but no CUDA GPU is visible: use --device=cpu or auto")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise SystemExit(f"--device={name}: only {torch.cuda.device_count()} GPU(s) visible, cuda:0 to "
                         f"cuda:{torch.cuda.device_count() - 1}")
    return name


def autocast(device, dtype="bfloat16"):
    """Mixed precision on the GPU (bf16 by default), full precision on the CPU: train.py's and the sampler's."""
    return torch.autocast("cuda", dtype=getattr(torch, dtype)) if torch.device(device).type == "cuda" else nullcontext()


@contextmanager
def signal_handlers(handler, sigs=(signal.SIGINT, signal.SIGTERM)):
    """Inside it `handler` takes the signals `sigs`; the handlers it replaced come back after."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    kept = {sig: signal.signal(sig, handler) for sig in sigs}
    try:
        yield
    finally:
        for sig, old in kept.items():
            signal.signal(sig, old)


def sigterm_as_ctrl_c():
    """Inside it a SIGTERM (kill, a scheduler, torchrun stopping its workers) raises KeyboardInterrupt,
    so every script ends it as it ends Ctrl-C: in one line. The handler it replaced comes back after."""
    return signal_handlers(signal.default_int_handler, (signal.SIGTERM,))


@contextmanager
def ends_in_one_line(message):
    """Ctrl-C or SIGTERM inside it ends the script with `message` alone: no traceback."""
    try:
        with sigterm_as_ctrl_c():
            yield
    except KeyboardInterrupt:
        raise SystemExit(message) from None


def seed_arg(text):
    """argparse's type of a --seed: an integer within 0 and 2**32 - 1 (train.py's range too)."""
    import argparse
    if not (text.isdigit() and int(text) <= 2**32 - 1):
        raise argparse.ArgumentTypeError(f"{text}: an integer within 0 and 2**32-1")
    return int(text)


def seeded_generator(seed, step=0, index=0, device="cpu"):
    """A generator whose stream depends on (seed, step, index) alone: train.py's step and rank,
    sample.py's sample, so a resumed run, or a sample decoded in a larger batch, draws the same."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + step * 1009 + index)


KEPT_SUFFIX = ".before-overwrite"  # train.py --overwrite=True: the earlier run's files until the new one's first checkpoint


def read_checkpoint(path, device="cpu"):
    """torch.load of a checkpoint of train.py with weights_only=True: it holds tensors and plain
    values only (dicts, lists, numbers, strings), so loading one never runs code from the file.
    Anything else (a damaged, empty or foreign file, a pickled object) stops with one line."""
    if not os.path.exists(path) and os.path.exists(path + KEPT_SUFFIX):
        raise SystemExit(f"no checkpoint at {path}, but {path}{KEPT_SUFFIX} holds a run that --overwrite=True kept "
                         f"aside (the run after it was killed before its first checkpoint): rename it to ckpt.pt to "
                         f"use it")
    if os.path.isfile(os.path.dirname(path)):  # --out_dir=run/ckpt.pt: the file where its directory belongs
        raise SystemExit(f"{os.path.dirname(path)} is a file: give the run's directory "
                         f"({os.path.dirname(os.path.dirname(path)) or '.'}), not its checkpoint")
    if not os.path.exists(path):
        raise SystemExit(f"no checkpoint at {path}: train one first "
                         f"(python train.py --out_dir={os.path.dirname(path)})")
    kind = stat.S_IFMT(os.stat(path).st_mode)
    if kind != stat.S_IFREG:  # a FIFO would block torch.load for ever, a directory fails obscurely
        what = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket",
                stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}.get(kind, "not a regular file")
        raise SystemExit(f"{path} cannot be read as a checkpoint: it is {what}, not a regular file; give the "
                         f"out_dir whose ckpt.pt train.py wrote")
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol warning: the error below says it all
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"WeightsUnpickler error:\s*(.*?)(\.\s|\n|$)", str(e))
        raise SystemExit(f"{path} was not loaded: it is not a file of tensors and plain values "
                         f"({found.group(1) if found else 'not a torch checkpoint'}), and loading "
                         f"anything else could run code: use checkpoints written by train.py only") from None
    except Exception as e:  # torch.load raises RuntimeError, EOFError, OSError... on a damaged file
        why = re.split(r"\.\s|\n", str(e).strip())[0][:160] or "the file ends early"
        raise SystemExit(f"{path} cannot be read as a checkpoint ({type(e).__name__}: {why}): it is "
                         f"damaged or not a checkpoint; restore it or train again") from None
    if not isinstance(ckpt, dict) or not {"model", "model_args", "config", "step"} <= ckpt.keys():
        keys = list(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise SystemExit(f"{path} is not a checkpoint of this model (it holds {keys}, not model, model_args, "
                         f"config and step): use a checkpoint written by train.py")
    step = ckpt["step"]
    if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
        raise SystemExit(f"{path} holds step={step!r}, not a non-negative integer: it is damaged; restore it or "
                         f"train again")
    wall = ckpt.get("wall_s", 0.0)  # the training time behind it; older checkpoints hold none
    if not (isinstance(wall, (int, float)) and not isinstance(wall, bool) and 0 <= wall < math.inf):
        raise SystemExit(f"{path} holds wall_s={wall!r}, not a time in seconds: it is damaged; restore it or "
                         f"train again")
    for k in ("config", "model_args", "model"):
        if not isinstance(ckpt[k], dict):
            raise SystemExit(f"{path} holds a {type(ckpt[k]).__name__} as {k}, not a dict: it is damaged; "
                             f"restore it or train again")
    return ckpt


def read_log(path):
    """The records of a log.jsonl that train.py wrote; a line that is not a JSON record (a crash
    mid-write, an edit) is skipped, and reported in one line."""
    recs, bad = [], []
    with open(path, errors="replace") as f:
        for n, line in enumerate(f, 1):
            try:
                rec = json.loads(line)
            except ValueError:
                rec = None
            if isinstance(rec, dict) and isinstance(rec.get("step", 0), int):
                recs.append(rec)
            elif line.strip():
                bad.append(n)
    if bad:
        print(f"note: {path}: skipped {len(bad)} unreadable line(s): {', '.join(map(str, bad[:10]))}"
              f"{' ...' if len(bad) > 10 else ''}")
    return recs


def check_weights(path, ckpt, verb):
    """Refuse, in one line, weights that are not floating point or not finite: such a model decodes
    NUL bytes or mask tokens, or trains on, without a word."""
    for name, w in (ckpt["model"].items() if isinstance(ckpt["model"], dict) else ()):
        bad = ("not floating point" if not (torch.is_tensor(w) and w.is_floating_point())
               else "not finite" if not torch.isfinite(w).all() else None)
        if bad:
            raise SystemExit(f"{path}: weight {name} is {bad} ({w.dtype if torch.is_tensor(w) else type(w).__name__}): "
                             f"cannot {verb}: train again")


def load_model(out_dir, device="cpu", usable_for=None):
    """The model of out_dir/ckpt.pt (as train.py writes it) in eval mode, and its train config.
    usable_for (a verb, "sample"): also refuse, in one line, weights that are not floating point
    or not finite (such a model decodes NUL bytes or mask tokens without a word)."""
    path = os.path.join(out_dir, "ckpt.pt")
    ckpt = read_checkpoint(path, device)
    if usable_for is not None:
        check_weights(path, ckpt, usable_for)
    try:
        names = {f.name for f in fields(ModelConfig)}  # older checkpoints also hold the LoRA scale
        model = DiffusionLM(ModelConfig(**{k: v for k, v in ckpt["model_args"].items() if k in names}))
        model.load_state_dict(ckpt["model"])
    except (AttributeError, TypeError, RuntimeError) as e:
        raise SystemExit(f"{path} is not a checkpoint of this model ({type(e).__name__}: {str(e)[:200]})") from None
    if model.cfg.rope_scaling not in ROPE_SCALINGS:  # rope_tables would read it as "none" without a word
        raise SystemExit(f"{path} holds rope_scaling={model.cfg.rope_scaling!r}, not one of {', '.join(ROPE_SCALINGS)}: "
                         f"the checkpoint was edited or damaged; set it to one of them (torch.load, then torch.save)")
    return model.to(device).eval(), ckpt["config"]
