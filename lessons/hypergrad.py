"""First-order vs exact hypergradient (paper Eq. 10), measured on a trained checkpoint.

    python -m lessons.hypergrad                                 # the checkpoint in out (train.py --config small)
    python -m lessons.hypergrad --out_dir=out-tiny --batches=2   # CPU, seconds

The measurement that goes with lesson 6 (lessons/06_hypergradient: implement the exact path).

MemDLM updates theta with the gradient of the outer loss (Eq. 9) taken at phi_K, the fast
weights after K inner SGD steps (Eq. 6-8). phi_K depends on theta through every inner
gradient. The paper's first-order update (Eq. 10) treats phi_K as a constant: no gradient
flows back through the inner loop. The exact hypergradient keeps the graph of the K updates
(create_graph=True) and differentiates through them, which costs second derivatives of the
inner loss (Hessian-vector products).

For each K this computes both on the same batches with the same draws (t, masks, phi_0) and
prints a markdown table: the cosine similarity of the two gradients over all of theta and
over two groups (the embedding and the layers below the memory; the layers with fast
weights, the final norm and the head), the norm ratio |first-order| / |exact|, and the time
and peak memory of each, averaged over --batches batches. Both run in float32 on PyTorch's
math attention (the flash and memory-efficient kernels have no double backward) and without
torch.compile, so their costs compare with each other, not with train.py's steps.
"""

if not __package__:  # run as a file: the imports below need the repository root on the path
    raise SystemExit("run it from the repository root as a module: python -m lessons.hypergrad")

import argparse
import math
import time
from dataclasses import replace
from functools import partial

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from data.tokenizer import open_split, windows
from memory import MemoryConfig, memdlm_loss, memory_layers
from model import ends_in_one_line, load_model, pick_device, seed_arg
from niah import NiahData


def training_batches(cfg, n, batch_size, seed, device):
    """n batches (x0, maskable, key_pad) of the checkpoint's training data, drawn as train.py
    draws them: windows of data/<dataset>/train.bin, every token maskable, or needle rows."""
    gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    if cfg["dataset"] == "niah":
        data = NiahData({**cfg, "batch_size": batch_size}, device)
        return [data.batch("train", g) for g in gens]
    tokens = open_split(cfg["dataset"], "train", cfg["tokenizer"])
    xs = [windows(tokens, cfg["block_size"], batch_size, g).to(device) for g in gens]
    return [(x, torch.ones_like(x, dtype=torch.bool), None) for x in xs]


def outer_gradient(model, batch, mcfg, seed, exact):
    """The outer loss (Eq. 9) of one batch and its gradient w.r.t. theta (one tensor per
    parameter): first-order (Eq. 10, phi_K a constant) or exact (through the K inner updates).
    The draws (t, masks, phi_0) depend on seed alone: both ways see the same ones."""
    x0, maskable, key_pad = batch
    params = list(model.parameters())
    with sdpa_kernel(SDPBackend.MATH):  # the only attention with a double backward
        loss, _ = memdlm_loss(model, x0, maskable, mcfg, key_pad=key_pad,
                              generator=torch.Generator(x0.device).manual_seed(seed), create_graph=exact)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def measured(fn, device):
    """fn's result, its wall time (s) and the peak GPU memory it allocated (MiB; None on the CPU)."""
    on_gpu = device.startswith("cuda")
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    if on_gpu:
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0, torch.cuda.max_memory_allocated() / 2 ** 20 if on_gpu else None


def cosine(a, b):
    a, b = torch.cat([g.flatten() for g in a]).double(), torch.cat([g.flatten() for g in b]).double()
    return (a @ b / (a.norm() * b.norm()).clamp(min=1e-300)).item()


def norm(grads):
    return torch.cat([g.flatten() for g in grads]).double().norm().item()


def compare(model, batches, mcfg, ks, seed=0):
    """One row per K: the two gradients' agreement on each batch and each one's cost, averaged."""
    device = str(next(model.parameters()).device)
    first = memory_layers(model.cfg.n_layer, mcfg.layer_frac)[0]
    below = {id(p) for m in [model.tok_emb, *model.layers[:first]] for p in m.parameters()}
    is_below = [id(p) in below for p in model.parameters()]

    def group(grads, low):
        return [g for g, b in zip(grads, is_below) if b == low]

    for exact in (False, True):  # warm-up, not timed
        outer_gradient(model, batches[0], replace(mcfg, steps=1), seed, exact)
    rows = []
    for K in ks:
        per_batch = []
        for b, batch in enumerate(batches):
            args = (model, batch, replace(mcfg, steps=K), seed + b)
            (_, fo), s_fo, mib_fo = measured(partial(outer_gradient, *args, exact=False), device)
            (_, ex), s_ex, mib_ex = measured(partial(outer_gradient, *args, exact=True), device)
            per_batch.append({"cos": cosine(fo, ex), "cos_below": cosine(group(fo, True), group(ex, True)),
                              "cos_above": cosine(group(fo, False), group(ex, False)),
                              "norm_ratio": norm(fo) / norm(ex), "s_fo": s_fo, "s_ex": s_ex,
                              "mib_fo": mib_fo, "mib_ex": mib_ex})
        rows.append({"K": K, **{k: None if per_batch[0][k] is None else sum(r[k] for r in per_batch) / len(per_batch)
                                for k in per_batch[0]}})
    return rows


def table(rows):
    """The rows as a markdown table."""
    def mib(v):
        return "-" if v is None else f"{v:.0f}"
    lines = [("| K | cos, all theta | cos, below the memory | cos, memory layers and head | norm first-order / exact "
              "| first-order ms | exact ms | first-order peak MiB | exact peak MiB |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['K']} | {r['cos']:.4f} | {r['cos_below']:.4f} | {r['cos_above']:.4f} | "
                     f"{r['norm_ratio']:.3f} | {1e3 * r['s_fo']:.1f} | {1e3 * r['s_ex']:.1f} | "
                     f"{mib(r['mib_fo'])} | {mib(r['mib_ex'])} |")
    return "\n".join(lines)


def main(argv=None):
    with ends_in_one_line("interrupted: the comparison writes nothing; run the command again"):
        _main(argv)


def _main(argv):
    p = argparse.ArgumentParser(description="First-order vs exact hypergradient (Eq. 10) on a checkpoint of train.py.",
                                allow_abbrev=False)  # --batch is not --batches
    p.add_argument("--out_dir", default="out", help="directory holding ckpt.pt (default out: train.py --config small)")
    p.add_argument("--ks", default="1,2,3", help="inner steps K to compare, a comma list")
    p.add_argument("--batches", type=int, default=4, help="batches averaged over")
    p.add_argument("--batch_size", type=int, default=None, help="rows per batch (default: the checkpoint's)")
    p.add_argument("--clip", type=float, default=None, help="the inner clip (default: the checkpoint's mem_clip)")
    p.add_argument("--seed", type=seed_arg, default=0, help="the batches and the draws (t, masks, phi_0)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    a = p.parse_args(argv)
    try:
        ks = [int(k) for k in a.ks.split(",")]
    except ValueError:
        raise SystemExit(f"--ks={a.ks}: write a comma list of inner step counts, e.g. 1,2,3") from None
    if a.batches < 1 or min(ks) < 1 or (a.batch_size is not None and a.batch_size < 1) or \
            (a.clip is not None and not (math.isfinite(a.clip) and a.clip > 0)):  # nan <= 0 is False: ask for finite
        raise SystemExit("need --batches >= 1, every K >= 1, --batch_size >= 1 and a finite --clip > 0")
    device = pick_device(a.device)
    model, cfg = load_model(a.out_dir, device, usable_for="measure")
    mcfg = MemoryConfig.from_config(cfg)
    mcfg = replace(mcfg, clip=mcfg.clip if a.clip is None else a.clip)
    try:  # an unknown trajectory (or any bad mem_* value) would otherwise run as the anchor one
        mcfg.validate()
    except ValueError as e:
        raise SystemExit(f"{a.out_dir}/ckpt.pt: its memory config is not one this code runs ({e})") from None
    batch_size = a.batch_size or cfg["batch_size"]
    batches = training_batches(cfg, a.batches, batch_size, a.seed, device)
    print(f"{a.out_dir}: {model.num_params() / 1e6:.2f}M parameters, fast weights on layers "
          f"{memory_layers(model.cfg.n_layer, mcfg.layer_frac)}, {a.batches} batches of {batch_size} x "
          f"{batches[0][0].shape[1]} tokens, inner lr {mcfg.lr}, clip {mcfg.clip}, device {device}, float32\n")
    print(table(compare(model, batches, mcfg, ks, a.seed)))


if __name__ == "__main__":
    main()
