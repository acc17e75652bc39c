"""Sample from a trained masked diffusion LM by iterative unmasking, optionally with MemDLM's
inference-time parametric memory (--adapt).

    python sample.py --out_dir=out-tiny --prompt="The with statement"
    python sample.py --out_dir=out --prompt_file=p.txt --gen_len=128 --block_len=32 --adapt

The generated part starts fully masked after the prompt. Each step predicts every masked
position at once and reveals the most confident predictions; the others stay masked for the
next step (paper Sec. 2.1, "Inference via Iterative Denoising"; LLaDA's low-confidence
remasking). With block_len < gen_len the blocks are decoded left to right (semi-autoregressive).
--adapt first writes the prompt into fresh fast weights with the inner loop, then decodes with
them applied (paper Sec. 4.5, "MemDLM Train & Inference").
--prefix_cache reuses the keys/values of the positions before the current block within it
(Fast-dLLM's approximate prefix KV cache, see generate).
"""
import argparse
import math
import sys
from contextlib import nullcontext

import torch
from tqdm import tqdm

from data.tokenizer import decode, get_encoding
from memory import ADAPT_RATIO, MemoryConfig, adapt as adapt_memory, flat, unflat
from model import load_model, pick_device

REMASKING = ("low_confidence", "random")


def pad_batch(seqs, pad_id):
    """Right-pad token lists into ids [B, T] and key_pad [B, T] (True at padding). Right padding
    keeps each row's positions (and so its RoPE angles) those of the row alone."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    key_pad = torch.ones(len(seqs), T, dtype=torch.bool)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s, dtype=torch.long)
        key_pad[b, :len(s)] = False
    return ids, key_pad


def reveal_schedule(n_masks, steps):
    """Tokens to reveal at each of `steps` steps: an equal share, the remainder to the first steps
    (a linear schedule reveals the same expected number each step), so none is left at the end."""
    return [n_masks // steps + (i < n_masks % steps) for i in range(steps)]


def plan(gen_len, steps, block_len=None):
    """Check the block layout and return (block_len, the reveal schedule of one block)."""
    block_len = gen_len if block_len is None else block_len
    if gen_len < 1 or block_len < 1 or gen_len % block_len:
        raise ValueError(f"gen_len={gen_len} must be a positive multiple of block_len={block_len}: "
                         f"pick a block_len that divides gen_len")
    n_blocks = gen_len // block_len
    if steps < n_blocks or steps % n_blocks:
        raise ValueError(f"steps={steps} must be a multiple of the {n_blocks} blocks (gen_len / block_len), "
                         f"as each block gets steps / {n_blocks} steps: try steps={n_blocks * max(1, round(steps / n_blocks))}")
    if steps // n_blocks > block_len:
        raise ValueError(f"steps={steps} gives {steps // n_blocks} steps to a block of {block_len} tokens: "
                         f"at most one step per token, use steps <= gen_len={gen_len}")
    return block_len, reveal_schedule(block_len, steps // n_blocks)


def block_cache(kv, ends, n_active):
    """The prefix cache of a block from a full forward's per-layer (k, v) [B, H, T, D]: the
    positions before each row's block start ends [B], cut to the longest such prefix P. Returns
    (past, key_pad [B, P + n_active]): key_pad hides a row's cached positions from its block
    start on (its own block, later blocks, padding), as the active region recomputes them; the
    active region itself (the row's block to its end of canvas) has no padding."""
    P = int(ends.max())
    past = [(k[:, :, :P], v[:, :, :P]) for k, v in kv]
    stale = torch.arange(P, device=ends.device) >= ends[:, None]
    if not stale.any():  # rows of one prompt length: no mask, SDPA may use its fastest kernel
        return past, None
    return past, torch.cat([stale, stale.new_zeros(len(ends), n_active)], 1)


def row_uniform(gens, active, shape, device):
    """U[0, 1) draws [B, *shape] in float64, row b from gens[b] alone. Rows with nothing left to
    reveal draw nothing, so a row's stream never depends on its batch-mates."""
    return torch.stack([torch.rand(shape, generator=g, device=device, dtype=torch.float64) if a
                        else torch.full(shape, 0.5, device=device, dtype=torch.float64)
                        for g, a in zip(gens, active)])


def propose(logits, temperature, remasking, gens, active):
    """A candidate token and its confidence at every position of the block ([B, L] each)."""
    if temperature > 0:
        # Gumbel-max: argmax(logits / T + g), g ~ Gumbel(0, 1), is a sample of softmax(logits / T);
        # float64 noise, as low-precision Gumbel noise degrades masked diffusion samples (arXiv:2409.02908)
        u = row_uniform(gens, active, logits.shape[1:], logits.device)
        x = (logits.double() / temperature - (-u.log()).log()).argmax(-1)
    else:
        x = logits.argmax(-1)
    if remasking == "random":
        return x, row_uniform(gens, active, logits.shape[1:2], logits.device)
    return x, logits.softmax(-1).gather(-1, x[..., None]).squeeze(-1)


def sampling_autocast(device):
    """bf16 on the GPU, full precision on the CPU: the sampler's (and adaptation's) precision."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if torch.device(device).type == "cuda" else nullcontext()


def write_memory(model, prompts, mcfg, ratio, steps, lr, generator):
    """Each prompt written into its own fresh fast weights (memory.adapt): the inner loop on the
    prompt alone, anchor mask ratio `ratio` (paper Sec. 4.5). Returns (fast, per-step losses [B])."""
    if not all(prompts):
        raise ValueError("adapt=True writes the prompt into the memory: every row needs a non-empty prompt")
    dev = next(model.parameters()).device
    kw = dict(ratio=ratio, steps=steps, lr=lr)
    if not isinstance(generator, (list, tuple)):  # one padded batch, the rows sharing one stream
        ids, key_pad = pad_batch(prompts, model.cfg.eot_id)
        return adapt_memory(model, ids.to(dev), mcfg, key_pad=key_pad.to(dev) if key_pad.any() else None,
                            generator=generator, **kw)
    # memory.adapt draws a whole batch's masks and phi_0 from one generator: rows with a generator
    # of their own adapt one at a time, so each gets exactly its memory alone
    rows = [adapt_memory(model, torch.tensor([p], device=dev), mcfg, generator=g, **kw)
            for p, g in zip(prompts, generator)]
    fast = unflat(rows[0][0], [torch.cat(ts) for ts in zip(*(flat(f) for f, _ in rows))])
    return fast, [torch.cat(ls) for ls in zip(*(losses for _, losses in rows))]


@torch.no_grad()
def generate(model, prompts, gen_len=64, steps=64, block_len=None, temperature=0.0,
             remasking="low_confidence", threshold=None, generator=None,
             adapt=False, adapt_steps=2, adapt_lr=0.1, adapt_ratio=ADAPT_RATIO, mcfg=None, progress=False,
             prefix_cache=False):
    """prompts: list of lists of token ids (may be empty lists = unconditional, lengths may differ).
    Returns (tokens LongTensor [B, gen_len] of the generated part, adapt_losses list or None).

    block_len: decode blocks of this many tokens left to right, steps / n_blocks steps each
    (None: one block, fully parallel). remasking: which masked positions a step reveals, the most
    confident ("low_confidence") or random ones. threshold: also reveal every masked position of
    the block whose confidence is above it, ending the block early once it has no mask left; a
    step still reveals at least its scheduled share, so the budget of steps is an upper bound.
    generator: one torch.Generator shared by the batch, or a list of one per row: then a row
    draws from its own only (adapt's masks and phi_0, Gumbel noise, random confidences), and
    gets exactly what it gets decoded alone. adapt: write each prompt into its own fresh memory
    first (adapt_* and mcfg as memory.adapt takes them) and decode with it.
    prefix_cache: Fast-dLLM's approximate prefix KV cache. The first step of a block is a full
    forward that also keeps every layer's keys/values of the positions before the block (prompt
    and decoded blocks); its other steps run the model only from the block to the end of the
    canvas, attending to that cache. Approximate, as the bidirectional prefix's keys/values
    depend on the block's tokens, which change within it; refreshed at every block start. With
    one step per block, exactly the plain path.
    """
    if remasking not in REMASKING:
        raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    block_len, schedule = plan(gen_len, steps, block_len)
    cfg, B = model.cfg, len(prompts)
    gens = list(generator) if isinstance(generator, (list, tuple)) else [generator] * B
    if len(gens) != B:
        raise ValueError(f"{len(gens)} generators for {B} prompts: give one per row, or a single one")
    dev = next(model.parameters()).device
    canvas, key_pad = pad_batch([list(p) + [cfg.mask_id] * gen_len for p in prompts], cfg.eot_id)
    canvas = canvas.to(dev)
    key_pad = key_pad.to(dev) if key_pad.any() else None  # no padding: SDPA may use its fastest kernel
    # canvas positions of the generated tokens: each row's start at its own prompt length
    gen_pos = torch.tensor([len(p) for p in prompts], device=dev)[:, None] + torch.arange(gen_len, device=dev)
    fast = losses = None
    with sampling_autocast(dev):
        if adapt:
            fast, losses = write_memory(model, prompts, mcfg, adapt_ratio, adapt_steps, adapt_lr, generator)
        bar = tqdm(total=steps, disable=not progress, desc="unmasking", leave=False, dynamic_ncols=True)
        for start in range(0, gen_len, block_len):
            pos = gen_pos[:, start:start + block_len]  # the current block
            act = gen_pos[:, start:]  # with the cache: the block and the masked blocks after it
            past = None  # the block's prefix cache, set by its first (full) forward
            for k in schedule:
                cur = canvas.gather(1, pos)
                masked = cur == cfg.mask_id
                active = masked.any(1).tolist()
                if not any(active):  # threshold mode finished the block early
                    break
                if past is None:
                    kv = [] if prefix_cache else None
                    h, where = model(canvas, fast=fast, key_pad=key_pad, kv_out=kv), pos
                    if prefix_cache:
                        past, past_pad = block_cache(kv, pos[:, 0], act.shape[1])
                else:  # the block is the first block_len positions of the active region
                    h = model(canvas.gather(1, act), fast=fast, key_pad=past_pad, pos=act, past=past)
                    where = torch.arange(block_len, device=dev).expand(B, -1)
                # score only the current block; drop the embedding's padding rows and the mask itself
                logits = model.logits(h.gather(1, where[..., None].expand(-1, -1, h.shape[-1]))).float()
                logits = logits[..., :cfg.n_vocab]
                logits[..., cfg.mask_id] = float("-inf")
                x, conf = propose(logits, temperature, remasking, gens, active)
                conf = conf.masked_fill(~masked, float("-inf"))  # prompt and revealed tokens stay
                n = torch.full((B,), k, device=dev)
                if threshold is not None:
                    n = torch.maximum(n, (conf > threshold).sum(1))
                rank = conf.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
                canvas.scatter_(1, pos, torch.where(masked & (rank < n[:, None]), x, cur))
                bar.update()
        bar.close()
    return canvas.gather(1, gen_pos), losses


def main(argv=None):
    p = argparse.ArgumentParser(description="Sample from a checkpoint of train.py by iterative unmasking.")
    p.add_argument("--out_dir", required=True, help="directory holding ckpt.pt")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="", help="text to continue (none: unconditional samples)")
    src.add_argument("--prompt_file", help="read the prompt from this file")
    p.add_argument("--num_samples", type=int, default=1, help="samples of the prompt, decoded as one batch")
    p.add_argument("--gen_len", type=int, default=64, help="tokens to generate")
    p.add_argument("--steps", type=int, default=None, help="denoising steps in all (default gen_len)")
    p.add_argument("--block_len", type=int, default=None, help="semi-autoregressive block (default gen_len)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--remasking", choices=REMASKING, default="low_confidence")
    p.add_argument("--threshold", type=float, default=None, help="also reveal all above this confidence")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--adapt", action=argparse.BooleanOptionalAction, default=False,
                   help="write the prompt into fast weights first")
    p.add_argument("--adapt_steps", type=int, default=2)
    p.add_argument("--adapt_lr", type=float, default=0.1)
    p.add_argument("--adapt_ratio", type=float, default=ADAPT_RATIO)
    p.add_argument("--prefix_cache", action=argparse.BooleanOptionalAction, default=False,
                   help="reuse the keys/values before the current block within it (approximate, faster)")
    a = p.parse_args(argv)
    steps = a.gen_len if a.steps is None else a.steps
    if (a.num_samples < 1 or not a.temperature >= 0 or a.adapt_steps < 1 or not 0 < a.adapt_ratio <= 1
            or not 0 <= a.adapt_lr < math.inf):
        raise SystemExit("need --num_samples >= 1, --temperature >= 0, --adapt_steps >= 1, 0 < --adapt_ratio <= 1 "
                         "and a finite --adapt_lr >= 0")
    try:
        plan(a.gen_len, steps, a.block_len)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    text = a.prompt
    if a.prompt_file:
        try:
            with open(a.prompt_file, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise SystemExit(f"cannot read --prompt_file={a.prompt_file}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise SystemExit(f"--prompt_file={a.prompt_file} is not UTF-8 text (byte {e.object[e.start]:#04x} at "
                             f"offset {e.start}): save it as UTF-8") from None
        if not text.strip():
            raise SystemExit(f"--prompt_file={a.prompt_file} is empty: write a prompt in it, or leave the "
                             f"prompt out for unconditional samples")
    if a.adapt and not text:
        raise SystemExit("--adapt writes the prompt into the memory: give --prompt or --prompt_file")

    device = pick_device(a.device)
    model, cfg = load_model(a.out_dir, device)
    enc = get_encoding(cfg["tokenizer"])
    prompt = enc.encode_ordinary(text)
    if len(prompt) + a.gen_len > model.cfg.block_size:
        print(f"warning: prompt ({len(prompt)} tokens) + gen_len ({a.gen_len}) exceeds the training context "
              f"block_size={model.cfg.block_size}; RoPE extrapolates, quality may drop", file=sys.stderr)
    # a generator per sample: sample i is the same whatever --num_samples
    gens = [torch.Generator(device).manual_seed(a.seed * 1_000_003 + i) for i in range(a.num_samples)]
    out, losses = generate(model, [prompt] * a.num_samples, a.gen_len, steps, a.block_len, a.temperature,
                           a.remasking, a.threshold, gens, a.adapt, a.adapt_steps, a.adapt_lr, a.adapt_ratio,
                           MemoryConfig.from_config(cfg), progress=steps >= 64, prefix_cache=a.prefix_cache)
    bad = next((k for k, v in enumerate(losses or []) if not v.isfinite().all()), None)
    if bad is not None:  # the memory holds NaN or infinite weights: the samples would be noise
        raise SystemExit(f"--adapt: the inner loss of step {bad + 1} is not finite "
                         f"({' '.join(f'{v:.4g}' for v in losses[bad].tolist())}): the memory is unusable, "
                         f"no samples printed; lower --adapt_lr (now {a.adapt_lr})")
    for k, l in enumerate(losses or []):
        print(f"adapt step {k + 1}/{len(losses)}: inner loss " + " ".join(f"{v:.4f}" for v in l.tolist()))
    for i, row in enumerate(out.tolist()):
        print(f"---------- sample {i + 1}/{a.num_samples} ----------")
        print(text + decode(enc, row))


if __name__ == "__main__":
    main()
