"""Sample from a trained masked diffusion LM by iterative unmasking, optionally with MemDLM's
inference-time parametric memory (--adapt).

    python sample.py --adapt                            # after python train.py --config small
    python sample.py --show                             # watch the denoising, one line per step
    python sample.py --out_dir=out-tiny --prompt="The with statement"
    python sample.py --prompt_file=p.txt --gen_len=256 --block_len=64 --adapt
    python sample.py --unconditional

The generated part starts fully masked after the prompt. Each step predicts every masked
position at once and reveals the most confident predictions; the others stay masked for the
next step (paper Sec. 2.1, "Inference via Iterative Denoising"; LLaDA's low-confidence
remasking). With block_len < gen_len the blocks are decoded left to right (semi-autoregressive).
--adapt first writes the prompt into fresh fast weights with the inner loop, then decodes with
them applied (paper Sec. 4.5, "MemDLM Train & Inference").
--prefix_cache reuses the keys/values of the positions before the current block within it
(Fast-dLLM's approximate prefix KV cache, see block_logits_cached).

Defaults of the command line: --out_dir=out (where train.py --config small writes); 128
tokens (at most half the training context) in blocks of 32, one token per step (LLaDA's semi-autoregressive layout: a block is
decoded once the text to its left is final, so a short-context model never fills the far end
first); temperature 0 (the most likely token). A checkpoint's train.py preset may name other
defaults (sample_block_len, sample_temperature): cpu decodes in blocks of 4 at temperature 1, as
its weak model, in longer blocks or greedily, fills the text with runs of spaces.
With no prompt given, a passage of the checkpoint's held-out split is the prompt (printed
first: it is what --adapt writes into the memory): the training context left after gen_len (128
tokens for the small preset), from a line start to a word end inside a sentence of prose.
"""
import argparse
import math
import os
import random
import re
import shlex
import sys
from dataclasses import replace

import numpy as np
import torch
from tqdm import tqdm

from data.tokenizer import decode, get_encoding, open_split
from memory import ADAPT_RATIO, MemoryConfig, adapt as adapt_memory, flat, inner_step, unflat
from model import (KVCache, autocast, ends_in_one_line, load_model, pick_device, proposal_logits, seed_arg,
                   seeded_generator)
from niah import NIAH_DEFAULTS, make_example, parse_tasks

REMASKING = ("low_confidence", "random")
GEN_LEN, BLOCK_LEN = 128, 32  # the command line's defaults: 4 blocks of 32, one token per step (a checkpoint's
# sample_block_len, from its train.py preset, replaces BLOCK_LEN)
MASK_CHAR, NEWLINE_CHAR = "█", "⏎"  # --show: a masked position, a newline
CPU_OUT_DIR = "out-cpu"  # train.py --config cpu's out_dir (a test holds the two equal; no script imports a script)
PROGRESS_DELAY = 1.0  # seconds of work before a progress bar shows: long work never looks hung, short work prints none


def pad_batch(seqs, pad_id):
    """Right-pad token lists into ids and key_pad [B, T] (True at padding): each row keeps its positions alone."""
    T = max(len(s) for s in seqs)
    return (torch.tensor([list(s) + [pad_id] * (T - len(s)) for s in seqs], dtype=torch.long),
            torch.tensor([[False] * len(s) + [True] * (T - len(s)) for s in seqs], dtype=torch.bool))


def reveal_schedule(n_masks, steps):
    """Tokens to reveal at each of `steps` steps: an equal share, the remainder to the first steps
    (a linear schedule reveals the same expected number each step), so none is left at the end."""
    return [n_masks // steps + (i < n_masks % steps) for i in range(steps)]


def plan(gen_len, steps, block_len=None):
    """Check the block layout and return (block_len, the reveal schedule of one block)."""
    block_len = gen_len if block_len is None else block_len
    if gen_len < 1 or block_len < 1 or gen_len % block_len:
        raise ValueError(f"gen_len={gen_len} must be a positive multiple of block_len={block_len}: pick one that divides it")
    n_blocks = gen_len // block_len
    if steps < n_blocks or steps % n_blocks:
        raise ValueError(f"steps={steps} must be a multiple of the {n_blocks} blocks (gen_len / block_len), "
                         f"as each block gets steps / {n_blocks} steps: try steps={n_blocks * max(1, round(steps / n_blocks))}")
    if steps // n_blocks > block_len:
        raise ValueError(f"steps={steps}: at most one step per token of a block, use steps <= gen_len={gen_len}")
    return block_len, reveal_schedule(block_len, steps // n_blocks)


def row_uniform(gens, rows_left, shape, device):
    """U[0, 1) draws [B, *shape] in float64, row b from gens[b] alone. Rows with nothing left to
    reveal draw nothing, so a row's stream never depends on its batch-mates."""
    return torch.stack([torch.rand(shape, generator=g, device=device, dtype=torch.float64) if left
                        else torch.full(shape, 0.5, device=device, dtype=torch.float64)
                        for g, left in zip(gens, rows_left)])


def propose(logits, temperature, remasking, gens, rows_left):
    """A candidate token and its confidence at every position of the block ([B, L] each)."""
    if temperature > 0:
        # Gumbel-max: argmax(logits / T + g), g ~ Gumbel(0, 1), is a sample of softmax(logits / T);
        # float64 noise, as low-precision Gumbel noise degrades masked diffusion samples (arXiv:2409.02908)
        u = row_uniform(gens, rows_left, logits.shape[1:], logits.device)
        proposal = (logits.double() / temperature - (-u.log()).log()).argmax(-1)
    else:
        proposal = logits.argmax(-1)
    if remasking == "random":
        return proposal, row_uniform(gens, rows_left, logits.shape[1:2], logits.device)
    return proposal, logits.softmax(-1).gather(-1, proposal[..., None]).squeeze(-1)


def choose(confidence, masked, n_reveal, threshold=None):
    """Which positions of the block [B, L] to reveal: the n_reveal most confident masked ones
    (and, with a threshold, every masked one above it)."""
    confidence = confidence.masked_fill(~masked, float("-inf"))  # prompt and revealed tokens stay
    n = torch.full((len(masked), 1), n_reveal, device=masked.device)
    if threshold is not None:
        n = torch.maximum(n, (confidence > threshold).sum(1, keepdim=True))
    rank = confidence.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    return masked & (rank < n)


def write_memory(model, prompts, mcfg, *, ratio=ADAPT_RATIO, generator=None, progress=False):
    """Each prompt written into its own fresh fast weights by memory.adapt (mcfg's K and inner lr,
    anchor mask ratio `ratio`). progress: a bar (stderr) of the inner steps. Returns (fast, per-step losses [B])."""
    if not all(prompts):
        raise ValueError("adapt=True writes the prompt into the memory: every row needs a non-empty prompt")
    device = next(model.parameters()).device
    per_row = isinstance(generator, (list, tuple))
    with tqdm(total=mcfg.steps * (len(prompts) if per_row else 1), disable=not progress, desc="adapt", leave=False,
              delay=PROGRESS_DELAY, dynamic_ncols=True) as bar:
        def counted(*a):  # memory.inner_step, one tick of the bar each
            out = inner_step(*a)
            bar.update()
            return out
        if not per_row:  # one padded batch, the rows sharing one stream
            ids, key_pad = pad_batch(prompts, model.cfg.eot_id)
            return adapt_memory(model, ids.to(device), mcfg, key_pad=key_pad.to(device) if key_pad.any() else None,
                                ratio=ratio, generator=generator, inner_step=counted)
        # memory.adapt draws a whole batch's masks and phi_0 from one generator: rows with a generator
        # of their own adapt one at a time, so each gets exactly its memory alone
        rows = [adapt_memory(model, torch.tensor([p], device=device), mcfg, ratio=ratio, generator=g,
                             inner_step=counted) for p, g in zip(prompts, generator)]
    fast = unflat(rows[0][0], [torch.cat(ts) for ts in zip(*(flat(f) for f, _ in rows))])
    return fast, [torch.cat(ls) for ls in zip(*(losses for _, losses in rows))]


def block_logits(model, canvas, block, fast, key_pad, cache=None):
    """model.proposal_logits, in float, [B, L, n_vocab] at the block's canvas positions [B, L], from a
    forward of the whole canvas (recording its keys/values into cache, if given)."""
    h = model(canvas, fast=fast, key_pad=key_pad, cache=cache)
    h = h.gather(1, block[..., None].expand(-1, -1, h.shape[-1]))
    return proposal_logits(model.logits(h).float(), model.cfg)


def block_logits_cached(model, canvas, active, block_len, fast, key_pad, cache):
    """block_logits with Fast-dLLM's approximate prefix KV cache. active [B, A]: each row's
    positions from its block start to its end of canvas (the block, then the masked blocks
    after it). cache: this block's KVCache. Its first call is a full forward that records every
    layer's keys/values, keeping those before the block (prompt and decoded blocks); later
    calls run the model on the active region alone, which attends to that cache. Approximate,
    as the bidirectional prefix's keys/values depend on the block's tokens, which change within
    it: refreshed at every block start. With one step per block, exactly block_logits."""
    if not cache.reading:
        logits = block_logits(model, canvas, active[:, :block_len], fast, key_pad, cache)
        cache.keep_prefix(active[:, 0], active)
        return logits
    h = model(canvas.gather(1, active), fast=fast, cache=cache)
    return proposal_logits(model.logits(h[:, :block_len]).float(), model.cfg)


@torch.no_grad()
def generate(model, prompts, *, gen_len=64, steps=64, block_len=None, temperature=0.0,
             remasking="low_confidence", threshold=None, generator=None, adapt=False, mcfg=None,
             adapt_ratio=ADAPT_RATIO, memory_prompts=None, prefix_cache=False, progress=False, on_step=None):
    """prompts: lists of token ids (any lengths; empty: unconditional). Returns (the generated tokens
    [B, gen_len], adapt's inner losses or None). Blocks of block_len (None: one) decode left to right,
    steps / n_blocks steps each; a step reveals the most confident ("low_confidence") or random masked
    positions, with a threshold also every one above it (the steps are then a budget). generator: one
    for the batch, or one per row, which then decodes exactly as it would alone. adapt: first write
    each prompt, or memory_prompts[b] (write-then-hide), into its own fresh memory (write_memory).
    prefix_cache: see block_logits_cached. progress: bars (stderr) after PROGRESS_DELAY seconds;
    on_step(generated part) after every step (--show)."""
    if remasking not in REMASKING or not 0 <= temperature < math.inf:
        raise ValueError(f"remasking must be one of {REMASKING} and temperature a finite number >= 0, got "
                         f"{remasking!r}, {temperature}")
    block_len, schedule = plan(gen_len, steps, block_len)
    cfg, gens = model.cfg, list(generator) if isinstance(generator, (list, tuple)) else [generator] * len(prompts)
    if len(gens) != len(prompts):
        raise ValueError(f"{len(gens)} generators for {len(prompts)} prompts: give one per row, or a single one")
    device = next(model.parameters()).device
    canvas, key_pad = (t.to(device) for t in pad_batch([p + [cfg.mask_id] * gen_len for p in map(list, prompts)],
                                                        cfg.eot_id))
    key_pad = key_pad if key_pad.any() else None  # no padding: SDPA may use its fastest kernel
    # canvas positions of the generated tokens: each row's start at its own prompt length
    gen_pos = torch.tensor([len(p) for p in prompts], device=device)[:, None] + torch.arange(gen_len, device=device)
    with autocast(device):
        fast, losses = write_memory(model, prompts if memory_prompts is None else memory_prompts, mcfg or MemoryConfig(),
                                    ratio=adapt_ratio, generator=generator, progress=progress) if adapt else (None, None)
        with tqdm(total=steps, disable=not progress, desc="unmasking", leave=False, delay=PROGRESS_DELAY,
                  dynamic_ncols=True) as bar:
            for start in range(0, gen_len, block_len):
                active = gen_pos[:, start:]  # this block and the masked blocks after it
                block = active[:, :block_len]  # the canvas positions of this block [B, L]
                cache = KVCache() if prefix_cache else None
                for n_reveal in schedule:
                    tokens = canvas.gather(1, block)
                    masked = tokens == cfg.mask_id
                    rows_left = masked.any(1).tolist()
                    if not any(rows_left):  # threshold mode finished the block early
                        break
                    logits = block_logits(model, canvas, block, fast, key_pad) if cache is None else \
                        block_logits_cached(model, canvas, active, block_len, fast, key_pad, cache)
                    proposal, confidence = propose(logits, temperature, remasking, gens, rows_left)
                    reveal = choose(confidence, masked, n_reveal, threshold)
                    canvas.scatter_(1, block, torch.where(reveal, proposal, tokens))
                    bar.update()
                    if on_step is not None:
                        on_step(canvas.gather(1, gen_pos))
    return canvas.gather(1, gen_pos), losses


def held_out_prompt(cfg, enc, n_tokens, seed):
    """A prompt the model never trained on, and a line saying where it comes from: about n_tokens
    of the held-out split of the checkpoint's corpus (data/<dataset>/val.bin), inside one
    document, from a line start (else a word start) to a word end inside a sentence of prose
    (after a paragraph's end, a footnote or a table row the corpus goes on with whitespace, and
    so does a model that learned it); for the needle corpus (dataset niah) a needle example of
    niah.make_example, a quarter of block_size to n_tokens long."""
    rng = random.Random(seed)
    if cfg["dataset"] == "niah":
        task, depth = rng.choice(parse_tasks(cfg["niah_tasks"])), rng.randrange(0, 101, 25)
        try:
            ex = make_example(task, (cfg["block_size"] // 4, n_tokens), depth, rng, enc, cfg["niah_haystack"])
        except ValueError as e:
            raise SystemExit(f"{e}: give a --prompt") from None
        return decode(enc, ex["prompt"]), f"a needle example ({task}, depth {depth}%, answer {ex['target'].strip()})"
    tokens = open_split(cfg["dataset"], "val", cfg["tokenizer"], " (it makes the held-out split), or give --prompt")
    n = min(n_tokens, len(tokens))
    for _ in range(100):  # a window inside one document (no <|endoftext|> in it) that ends in prose
        start = rng.randrange(len(tokens) - n + 1)
        window = decode(enc, tokens[start:start + n].tolist())
        line = window.find("\n") + 1
        text = window[line:].lstrip("\n") if 0 < line <= len(window) // 2 else window[re.search(r"\s|$", window).end():]
        text = text[:re.search(r"\s*\S*$", text.rstrip()).start()] or window  # the last word may be cut: drop it
        if not (tokens[start:start + n] == enc.eot_token).any() and in_prose(text):
            break
    return text, f"{len(enc.encode_ordinary(text))} tokens of data/{cfg['dataset']}/val.bin, held out"


def in_prose(text):
    """Whether text stops inside a sentence of prose: on a word or a comma, in a line that is not
    a table's."""
    last = text.rsplit("\n", 1)[-1].lstrip()
    return bool(re.search(r"[A-Za-z,]$", text)) and not last.startswith(("|", "+", "="))


def show_line(enc, ids, mask_id):
    """The generated part on one line: MASK_CHAR at each masked position, newlines as NEWLINE_CHAR,
    the text up to the first <|endoftext|> (where the sample ends)."""
    pieces, run = [], []
    for i in ids + [enc.eot_token]:
        if i in (mask_id, enc.eot_token):
            pieces.append(decode(enc, run))
            run = []
            if i == enc.eot_token:
                break
            pieces.append(MASK_CHAR)
        else:
            run.append(i)
    return "".join(pieces).replace("\n", NEWLINE_CHAR)


def documents(enc, ids):
    """The text of every document of a token split ([N] ids), a newline between two: decode
    alone stops at the first <|endoftext|>, the end of the first document."""
    docs = np.split(ids, np.flatnonzero(ids == enc.eot_token) + 1)
    return "\n".join(decode(enc, doc.tolist()) for doc in docs if len(doc))


def readability(samples, corpus):
    """How much generated text looks like the corpus: the share of its words (runs of letters)
    that occur in the corpus and their number, its share of whitespace characters, and the
    corpus's own."""
    vocab = set(re.findall(r"[A-Za-z]+", corpus))
    words = [w for t in samples for w in re.findall(r"[A-Za-z]+", t)]
    white = lambda t: sum(c.isspace() for c in t) / max(1, len(t))
    return sum(w in vocab for w in words) / max(1, len(words)), len(words), white("".join(samples)), white(corpus)


def layout(a, gen_len, block=BLOCK_LEN):
    """(steps, block_len) of the command line for gen_len tokens, checked by plan; with no
    --block_len, blocks of `block` tokens where they divide gen_len, else one block."""
    steps = gen_len if a.steps is None else a.steps
    block_len = a.block_len if a.block_len is not None else block if gen_len % block == 0 else gen_len
    try:
        plan(gen_len, steps, block_len)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    return steps, block_len


def no_checkpoint(out_dir, device, argv):
    """The one line for sample.py with no checkpoint in the default out_dir (train.py --config
    small's): where the CPU recipe's checkpoint is, or how to train one on this machine."""
    cpu_dir = CPU_OUT_DIR
    again = shlex.join(["python", "sample.py", f"--out_dir={cpu_dir}", *argv])
    if os.path.exists(os.path.join(cpu_dir, "ckpt.pt")):
        return (f"no checkpoint in {out_dir}/ (python train.py --config small writes it); {cpu_dir}/ holds the CPU "
                f"recipe's: {again}")
    if device == "cpu":
        return (f"no checkpoint in {out_dir}/: train one first; without a GPU, python train.py --config cpu (under "
                f"10 minutes on 2 cores), then {again}")
    return f"no checkpoint in {out_dir}/: train one first, python train.py --config small (a few minutes on one GPU)"


def main(argv=None):
    with ends_in_one_line("interrupted: sampling stopped (sample.py writes no file); run the command again"):
        _main(argv)


def _main(argv):
    p = argparse.ArgumentParser(description="Sample from a checkpoint of train.py by iterative unmasking.",
                                allow_abbrev=False)  # --temp is not --temperature
    p.add_argument("--out_dir", default="out", help="directory holding ckpt.pt (default out: train.py --config small)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None,
                     help="text to continue (default: a passage of the checkpoint's held-out split, printed first)")
    src.add_argument("--prompt_file", help="read the prompt from this file")
    src.add_argument("--unconditional", action="store_true", help="no prompt: samples from nothing (as --prompt=)")
    p.add_argument("--num_samples", type=int, default=1, help="samples of the prompt, decoded as one batch")
    p.add_argument("--gen_len", type=int, default=None,
                   help=f"tokens to generate (default {GEN_LEN}, at most half the training context; a needle "
                        f"checkpoint: its answer window, niah_answer_len)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps in all (default gen_len)")
    p.add_argument("--block_len", type=int, default=None,
                   help=f"semi-autoregressive block (default: the checkpoint's sample_block_len, {BLOCK_LEN} "
                        f"unless its preset says otherwise (cpu: 4), where it divides gen_len, else gen_len)")
    p.add_argument("--temperature", type=float, default=None,
                   help="0: the most likely token (default: the checkpoint's sample_temperature, 0 unless its "
                        "preset says otherwise (cpu: 1))")
    p.add_argument("--remasking", choices=REMASKING, default="low_confidence")
    p.add_argument("--threshold", type=float, default=None, help="also reveal all above this confidence")
    p.add_argument("--seed", type=seed_arg, default=1337, help="the sampling noise and the held-out passage")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--adapt", action=argparse.BooleanOptionalAction, default=False,
                   help="write the prompt into fast weights first")
    p.add_argument("--adapt_steps", type=int, default=None, help="K, inner steps (default: the checkpoint's mem_steps)")
    p.add_argument("--adapt_lr", type=float, default=None, help="inner lr (default: the checkpoint's mem_lr)")
    p.add_argument("--adapt_ratio", type=float, default=ADAPT_RATIO)
    p.add_argument("--prefix_cache", action=argparse.BooleanOptionalAction, default=False,
                   help="reuse the keys/values before the current block within it (approximate, faster)")
    p.add_argument("--stats", action="store_true",
                   help="readability of the samples: the share of their words found in the training text, "
                        "and their share of whitespace next to its own")
    p.add_argument("--show", action="store_true",
                   help=f"watch the denoising: the first sample's generated part after every step, one line "
                        f"each, {MASK_CHAR} where still masked, {NEWLINE_CHAR} for a newline")
    a = p.parse_args(argv)
    if (a.num_samples < 1 or not (a.temperature is None or 0 <= a.temperature < math.inf)
            or not (a.adapt_steps is None or a.adapt_steps >= 1)
            or not 0 < a.adapt_ratio <= 1 or not (a.adapt_lr is None or 0 <= a.adapt_lr < math.inf)):
        raise SystemExit("need --num_samples >= 1, a finite --temperature >= 0, --adapt_steps >= 1, "
                         "0 < --adapt_ratio <= 1 and a finite --adapt_lr >= 0")
    if not a.adapt and (given := [f"--{k}" for k in ("adapt_steps", "adapt_lr") if getattr(a, k) is not None]):
        several = len(given) > 1
        raise SystemExit(f"{' and '.join(given)} {'set' if several else 'sets'} the inference-time memory's budget: "
                         f"add --adapt, or leave {'them' if several else 'it'} out")
    for name in ("gen_len", "steps"):  # 0 is refused, not read as "the default"
        if getattr(a, name) is not None and getattr(a, name) < 1:
            raise SystemExit(f"--{name}={getattr(a, name)}: must be a positive integer (leave it out for the default)")
    if a.threshold is not None and not 0 <= a.threshold <= 1:
        raise SystemExit(f"--threshold={a.threshold}: must be within 0 and 1 (a confidence)")
    if a.threshold is not None and a.remasking != "low_confidence":
        raise SystemExit(f"--threshold reveals the tokens the model is sure of: it needs --remasking=low_confidence, "
                         f"not {a.remasking}")
    if a.gen_len is not None and a.block_len is not None:  # a bad layout fails before the checkpoint loads
        layout(a, a.gen_len)
    text = "" if a.unconditional else a.prompt
    if text and any("\udc80" <= c <= "\udcff" for c in text):  # bytes the shell passed that are not UTF-8
        raise SystemExit("--prompt holds bytes that are not UTF-8 text: give it as UTF-8, or in a UTF-8 --prompt_file")
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
            raise SystemExit(f"--prompt_file={a.prompt_file} is empty: write a prompt in it, or use "
                             f"--unconditional for unconditional samples")
    if a.adapt and text == "":
        raise SystemExit("--adapt writes the prompt into the memory: give a prompt, or none for a held-out passage")

    device = pick_device(a.device)
    if a.out_dir == p.get_default("out_dir") and not os.path.exists(os.path.join(a.out_dir, "ckpt.pt")):
        raise SystemExit(no_checkpoint(a.out_dir, device, sys.argv[1:] if argv is None else argv))
    model, cfg = load_model(a.out_dir, device, usable_for="sample")
    if a.prefix_cache and model.cfg.attn_chunk:
        raise SystemExit(f"--prefix_cache attends to a whole prefix: leave it out for this checkpoint, trained with "
                         f"attn_chunk={model.cfg.attn_chunk}")
    enc = get_encoding(cfg["tokenizer"])
    if a.stats and cfg["dataset"] == "niah":  # before any sampling
        raise SystemExit("--stats compares samples with a text corpus; this checkpoint trained on needle rows")
    if a.gen_len is None:  # a needle checkpoint writes its answer window, as it trained
        a.gen_len = (cfg.get("niah_answer_len", NIAH_DEFAULTS["niah_answer_len"]) if cfg["dataset"] == "niah"
                     else min(GEN_LEN, model.cfg.block_size // 2))
    steps, block_len = layout(a, a.gen_len, cfg.get("sample_block_len", BLOCK_LEN))
    temperature = cfg.get("sample_temperature", 0.0) if a.temperature is None else a.temperature
    if a.num_samples > 1 and temperature == 0 and a.remasking == "low_confidence" and not a.adapt:
        print(f"note: temperature 0 decodes deterministically: the {a.num_samples} samples are the same; "
              f"--temperature=1 draws different ones", file=sys.stderr)
    if text is None:  # the prompt budget: the training context left after gen_len
        text, source = held_out_prompt(cfg, enc, max(model.cfg.block_size - a.gen_len, model.cfg.block_size // 4),
                                       a.seed)
        print(f"---------- prompt: {source} ----------")
        print(text)
    prompt = enc.encode_ordinary(text)
    if len(prompt) + a.gen_len > model.cfg.block_size:
        print(f"warning: prompt ({len(prompt)} tokens) + gen_len ({a.gen_len}) exceeds the training context "
              f"block_size={model.cfg.block_size}; RoPE extrapolates, quality may drop", file=sys.stderr)

    def show(generated):  # --show: the first sample's generated part after each step
        print(show_line(enc, generated[0].tolist(), model.cfg.mask_id))
    if a.show:
        print(f"---------- sample 1, one line per step ({MASK_CHAR} masked) ----------")
    mcfg = MemoryConfig.from_config(cfg)  # the checkpoint's K and inner lr, unless the flags say otherwise
    mcfg = replace(mcfg, steps=mcfg.steps if a.adapt_steps is None else a.adapt_steps, lr=mcfg.lr if a.adapt_lr is None else a.adapt_lr)
    gens = [seeded_generator(a.seed, index=i, device=device) for i in range(a.num_samples)]  # sample i: its own
    out, losses = generate(model, [prompt] * a.num_samples, gen_len=a.gen_len, steps=steps, block_len=block_len,
                           temperature=temperature, remasking=a.remasking, threshold=a.threshold, generator=gens,
                           adapt=a.adapt, mcfg=mcfg, adapt_ratio=a.adapt_ratio, prefix_cache=a.prefix_cache,
                           progress=not a.show, on_step=show if a.show else None)
    bad = next((k for k, v in enumerate(losses or []) if not v.isfinite().all()), None)
    if bad is not None:  # the memory holds NaN or infinite weights: the samples would be noise
        raise SystemExit(f"--adapt: the inner loss of step {bad + 1} is not finite "
                         f"({' '.join(f'{v:.4g}' for v in losses[bad].tolist())}): the memory is unusable, "
                         f"no samples printed; lower --adapt_lr (now {mcfg.lr})")
    for k, l in enumerate(losses or []):
        print(f"adapt step {k + 1}/{len(losses)}: inner loss " + " ".join(f"{v:.4f}" for v in l.tolist()))
    samples = [decode(enc, row) for row in out.tolist()]
    for i, sample in enumerate(samples):
        print(f"---------- sample {i + 1}/{a.num_samples} ----------")
        print(text + sample)
    if a.stats:
        corpus = documents(enc, open_split(cfg["dataset"], "train", cfg["tokenizer"]))
        words, n_words, white, corpus_white = readability(samples, corpus)
        print(f"stats: {100 * words:.1f}% of the {n_words} generated words occur in the training text; whitespace "
              f"{100 * white:.1f}% of the characters (the training text: {100 * corpus_white:.1f}%)")


if __name__ == "__main__":
    main()
