"""The needle-in-a-haystack evaluation of train.py checkpoints: the paper's Table 1 in miniature.

    python -m experiments.niah_eval --out_dir out-mdlm out-memdlm --lengths=256,512 --n=50

Every checkpoint is evaluated on the same examples (niah.make_example), decoded by
sample.generate with and without inference-time memory (--adapt), scored as RULER does
(niah.score). Prints a markdown table of mean +- standard error per task x length and writes
every sample to a JSON file.

Where attention cannot reach (the memory as the only way to the answer):
  --hide       write-then-hide: three more rows per checkpoint decode from the prompt with the
               facts that hold the answer cut out (niah.hide_answers): with no memory (chance),
               with the memory of the cut prompt (a control, at chance) and with the memory of
               the full prompt (in-weight retrieval: the measure)
  attn_chunk   a checkpoint trained with local attention (train.py --attn_chunk=W) gets a table
               of the score against the needle's distance from the answer, in chunks: at 0
               attention reaches the needle, beyond it only the memory can
  --rope       RoPE scaling past the trained length (ntk, pi; a comma list: one row each), so
               that a position failure is not taken for a memory effect
  --adapt_*    the inference-time inner loop's budget (default: the checkpoint's K and lr)
"""

if not __package__:  # run as a file: the imports below need the repository root on the path
    raise SystemExit("run it from the repository root as a module: python -m experiments.niah_eval")

import argparse
import json
import os
import random
import time
from dataclasses import replace

import numpy as np
import torch
from tqdm import tqdm

from data.tokenizer import decode, get_encoding
from experiments.common import int_list, mean_stderr, repeat, row_label, writable, write_atomic
from memory import MemoryConfig
from model import ROPE_SCALINGS, ends_in_one_line, load_model, pick_device, seed_arg, seeded_generator
from niah import FORMS, HAYSTACKS, NIAH_DEFAULTS, TASKS, hide_answers, make_example, parse_tasks, score
from sample import generate, plan


# a row: (the prompt decoded from, the prompt the memory is written from or None), "cut" the
# prompt with the answer's facts cut out; the first two are the Table 1 rows (adapt off / on)
VIEWS = {"plain": ("full", None), "adapt": ("full", "full"), "cut": ("cut", None),
         "cut_adapt": ("cut", "cut"), "hidden": ("cut", "full")}
VIEW_NAMES = {"cut": "needle cut, no memory", "cut_adapt": "needle cut, memory of the cut prompt",
              "hidden": "needle cut, memory of the full prompt"}


def distance(example, chunk):
    """The needle's distance from the answer in chunks of `chunk` tokens, counted from the needle's
    last token (0: some of it shares the answer's chunk, which attention reaches), or None without
    chunks or needle."""
    if not chunk or example["needle_pos"] is None:
        return None
    return len(example["prompt"]) // chunk - (example["fact_spans"][0][1] - 1) // chunk


def cells(samples, tasks, lengths):
    """{task: {length: summary and its per-depth summaries}} of a row's samples."""
    out = {}
    for t in tasks:
        out[t] = {}
        for L in lengths:
            sel = [s for s in samples if s["task"] == t and s["length"] == L]
            depths = sorted({s["depth"] for s in sel if s["depth"] is not None})
            out[t][str(L)] = {**mean_stderr([s["score"] for s in sel]), "depths": {
                str(dep): mean_stderr([s["score"] for s in sel if s["depth"] == dep]) for dep in depths}}
    return out


def plot(row, lengths, depths, path):
    """Heatmap of the mean score over the needle tasks (cwe has no depth), length x depth."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    grid = np.full((len(lengths), len(depths)), np.nan)
    for i, L in enumerate(lengths):
        for j, d in enumerate(depths):
            s = [s["score"] for s in row["samples"] if s["length"] == L and s["depth"] == d]
            grid[i, j] = 100 * sum(s) / len(s) if s else np.nan
    fig, ax = plt.subplots(figsize=(3 + 0.7 * len(depths), 2 + 0.4 * len(lengths)))
    im = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8)
    ax.set(xticks=range(len(depths)), xticklabels=depths, yticks=range(len(lengths)), yticklabels=lengths,
           xlabel="needle depth (%)", ylabel="context length (tokens)")
    ax.set_title(row["label"], fontsize=9)
    fig.colorbar(im, ax=ax, label="score (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse(argv):
    p = argparse.ArgumentParser(description="Needle-in-a-haystack evaluation of train.py checkpoints.",
                                allow_abbrev=False)
    p.add_argument("--out_dir", nargs="+", required=True, help="checkpoint directories, evaluated on the same examples")
    p.add_argument("more_dirs", nargs="*", help=argparse.SUPPRESS)  # --out_dir=a b c
    p.add_argument("--adapt", choices=("off", "on", "both"), default="both", help="inference-time memory")
    p.add_argument("--hide", action="store_true", help="write-then-hide rows: decode with the answer's facts cut out")
    p.add_argument("--rope", default="none", help=f"RoPE scaling past the trained length: comma list of "
                                                  f"{', '.join(ROPE_SCALINGS)}, one row set each")
    p.add_argument("--adapt_steps", type=int, default=None, help="inner steps K of adapt (default: the checkpoint's)")
    p.add_argument("--adapt_lr", type=float, default=None, help="inner lr of adapt (default: the checkpoint's)")
    p.add_argument("--adapt_rank", type=int, default=None, help="LoRA rank of adapt's memory (default: the checkpoint's)")
    p.add_argument("--adapt_ratio", type=float, default=None, help="anchor mask ratio of adapt (default 0.2)")
    p.add_argument("--tasks", default="all", help=f"comma list of {', '.join(TASKS)}, or all")
    p.add_argument("--lengths", type=int_list, default=[256, 512], help="context lengths: prompt + answer window")
    p.add_argument("--depths", type=int_list, default=[0, 25, 50, 75, 100], help="needle depths in percent")
    p.add_argument("--n", type=int, default=25, help="examples per task and length, spread over the depths")
    p.add_argument("--seed", type=seed_arg, default=0)
    p.add_argument("--haystack", choices=HAYSTACKS, default="noise")
    p.add_argument("--forms", choices=FORMS, default=None,
                   help="surface forms (heldout: those training never saw; default: the first checkpoint's)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--answer_len", type=int, default=None, help="answer window (default: the first checkpoint's)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: answer_len)")
    p.add_argument("--threshold", type=float, default=None, help="sampler: also reveal all above this confidence")
    p.add_argument("--prefix_cache", action="store_true", help="sampler: approximate prefix KV cache")
    p.add_argument("--json", default=None, help="results file (default: niah.json in the first out_dir)")
    p.add_argument("--overwrite", action="store_true", help="replace the results file (and --plot's heatmaps) if they exist")
    p.add_argument("--plot", action="store_true", help="a length x depth heatmap PNG per row (matplotlib)")
    a = p.parse_args(argv)
    if a.n < 1 or a.batch_size < 1 or min(a.lengths) < 1 or not all(0 <= d <= 100 for d in a.depths):
        raise SystemExit("--n, --batch_size and --lengths must be >= 1, --depths within 0-100")
    for k in ("answer_len", "steps", "adapt_steps", "adapt_rank"):
        if getattr(a, k) is not None and getattr(a, k) < 1:
            raise SystemExit(f"--{k}={getattr(a, k)}: must be a positive integer")
    if a.adapt_lr is not None and not 0 <= a.adapt_lr < float("inf"):
        raise SystemExit(f"--adapt_lr={a.adapt_lr}: must be a finite number >= 0")
    if a.threshold is not None and not 0 <= a.threshold <= 1:
        raise SystemExit(f"--threshold={a.threshold}: a confidence within 0 and 1")
    if a.adapt_ratio is not None and not 0 < a.adapt_ratio <= 1:
        raise SystemExit(f"--adapt_ratio={a.adapt_ratio}: must be within 0 (exclusive) and 1")
    budget = [k for k in ("adapt_steps", "adapt_lr", "adapt_rank", "adapt_ratio") if getattr(a, k) is not None]
    if budget and a.adapt == "off" and not a.hide:
        raise SystemExit(f"--{budget[0]} sets the memory of --adapt=on or both (and of --hide's rows): "
                         f"leave it out with --adapt=off")
    a.rope = a.rope.split(",")
    if not set(a.rope) <= set(ROPE_SCALINGS):
        raise SystemExit(f"--rope={','.join(a.rope)}: use {', '.join(ROPE_SCALINGS)} or a comma list of them")
    try:
        a.tasks = list(dict.fromkeys(parse_tasks(a.tasks)))  # each task once, whatever its training weight
    except ValueError as e:
        raise SystemExit(str(e)) from None
    return a


def make_examples(a, enc, answer_len, forms):
    """The same examples for every checkpoint; an example depends only on (seed, task, length, i)."""
    examples = []
    try:
        for L in a.lengths:
            for t in a.tasks:
                for i in range(a.n):
                    d = a.depths[i % len(a.depths)]
                    ex = make_example(t, L, d, random.Random(f"{a.seed}:{t}:{L}:{i}"), enc, a.haystack, answer_len, forms)
                    examples.append({**ex, "task": t, "length": L, "depth": None if t == "cwe" else d,
                                     "cut": hide_answers(ex, enc) if a.hide else None})
    except ValueError as e:
        raise SystemExit(str(e)) from None
    return examples


def adapt_memory_config(a, cfg):
    """The checkpoint's memory settings with the command line's adapt budget on top."""
    mcfg = MemoryConfig.from_config(cfg)
    if a.adapt_rank:  # the LoRA scale alpha / r kept as trained
        mcfg = replace(mcfg, rank=a.adapt_rank, alpha=mcfg.scale * a.adapt_rank)
    return replace(mcfg, steps=a.adapt_steps or mcfg.steps, lr=mcfg.lr if a.adapt_lr is None else a.adapt_lr)


def decode_row(model, examples, view, a, *, mcfg, enc, answer_len, steps, device, bar):
    """Outputs, scores and decoding seconds of one row (a VIEWS entry) over the examples."""
    source, memory = VIEWS[view]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    outputs, scores, decode_s = [], [], 0.0
    for k in range(0, len(examples), a.batch_size):
        batch = examples[k:k + a.batch_size]
        prompts = {"full": [e["prompt"] for e in batch], "cut": [e["cut"] for e in batch]}
        g = seeded_generator(a.seed, index=k, device=device)  # adapt's masks and phi_0
        sync()
        t0 = time.perf_counter()
        tokens, _ = generate(model, prompts[source], gen_len=answer_len, steps=steps, block_len=None, temperature=0.0,
                             remasking="low_confidence", generator=g, threshold=a.threshold, adapt=memory is not None,
                             memory_prompts=prompts[memory] if memory else None, mcfg=mcfg,
                             **({"adapt_ratio": a.adapt_ratio} if a.adapt_ratio else {}), prefix_cache=a.prefix_cache)
        sync()
        decode_s += time.perf_counter() - t0
        for e, ids in zip(batch, tokens.tolist()):
            outputs.append(decode(enc, ids))
            scores.append(score(outputs[-1], e["answers"]))
        bar.update(len(batch))
    return outputs, scores, decode_s


def print_tables(rows, a, examples):
    cols = [(t, L) for t in a.tasks for L in a.lengths]
    print("| model | " + " | ".join(f"{t} {L}" for t, L in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for r in rows:
        cell = [r["cells"][t][str(L)] for t, L in cols]
        print(f"| {r['label']} | " + " | ".join(f"{100 * c['mean']:.1f} ± {100 * c['stderr']:.1f} ({c['n']})"
                                                for c in cell) + " |")
    dists = sorted({(s["length"], s["distance"]) for r in rows for s in r["samples"] if s["distance"] is not None})
    if dists:  # local attention: the score against the needle's distance from the answer
        print("\nscore by the needle's distance from the answer, in chunks (0: attention reaches it)")
        print("| model | " + " | ".join(f"{L}: distance {d}" for L, d in dists) + " |")
        print("|---|" + "---|" * len(dists))
        for r in rows:
            by = [mean_stderr([s["score"] for s in r["samples"] if (s["length"], s["distance"]) == ld])
                  for ld in dists]
            print(f"| {r['label']} | " + " | ".join(f"{100 * c['mean']:.1f} ± {100 * c['stderr']:.1f} ({c['n']})"
                                                    for c in by) + " |")
    # the sampler's speed (--threshold and --prefix_cache trade it against the table), and adapt's
    # share of its row: the row's time over the plain row's (decoding with the memory costs a little more)
    plain = {(r["out_dir"], r["rope"]): r["decode_s"] for r in rows if r["view"] == "plain"}
    for r in rows:
        p = plain.get((r["out_dir"], r["rope"])) if r["view"] == "adapt" else None
        share = "" if p is None else f", writing the memory about {100 * max(0.0, 1 - p / r['decode_s']):.0f}% of it"
        print(f"{r['label']}: {r['decode_s']:.1f} s decoding, {len(examples) / r['decode_s']:.1f} answers/s{share}")


def heatmap_path(out_dir, rope, view):
    name = {"plain": "base"}.get(view, view) + ("" if rope == "none" else "_" + rope)
    return os.path.join(out_dir, f"niah_{name}.png")


def main(argv=None):
    with ends_in_one_line("interrupted: no results written (an earlier results file is left as it was)"):
        evaluate(argv)


def evaluate(argv):
    a = parse(argv)
    dirs = a.out_dir + a.more_dirs
    if twice := repeat(dirs):
        raise SystemExit(f"--out_dir: {dirs[twice[1]]} is named twice: give each checkpoint once")
    device = pick_device(a.device)
    runs = [(d, *load_model(d, device, usable_for="evaluate")) for d in dirs]
    path = a.json or os.path.join(dirs[0], "niah.json")  # checked now, not after the evaluation
    writable(path, "--json", a.overwrite)
    tokenizers = {cfg["tokenizer"] for _, _, cfg in runs}
    if len(tokenizers) > 1:
        raise SystemExit(f"the checkpoints use different tokenizers ({', '.join(sorted(tokenizers))}): "
                         f"evaluate them separately")
    if a.prefix_cache and any(m.cfg.attn_chunk for _, m, _ in runs):
        raise SystemExit("--prefix_cache attends to a whole prefix: leave it out for checkpoints trained with attn_chunk")
    enc = get_encoding(tokenizers.pop())
    answer_len = a.answer_len or runs[0][2].get("niah_answer_len", NIAH_DEFAULTS["niah_answer_len"])
    steps = a.steps or answer_len
    forms = a.forms or runs[0][2].get("niah_forms", NIAH_DEFAULTS["niah_forms"])
    try:
        plan(answer_len, steps)  # the sampler's own check of gen_len and steps
    except ValueError as e:
        raise SystemExit(str(e)) from None
    examples = make_examples(a, enc, answer_len, forms)
    for d, model, cfg in runs:
        if cfg["dataset"] != "niah":
            print(f"note: {d} was trained on text (--dataset={cfg['dataset']}), not on needle rows: its scores say how "
                  f"a text model answers them")
        if max(a.lengths) > model.cfg.block_size:
            print(f"note: {d} was trained at block_size={model.cfg.block_size}; longer lengths test extrapolation")
        if set(a.rope) - {"none"} and min(a.lengths) <= model.cfg.block_size:
            print(f"note: RoPE scaling changes the angles only past {d}'s block_size={model.cfg.block_size}: "
                  f"up to it the --rope rows equal the none rows")

    views = {"off": ["plain"], "on": ["adapt"], "both": ["plain", "adapt"]}[a.adapt] + \
        (["cut", "cut_adapt", "hidden"] if a.hide else [])
    pngs = {(d, rope, view): heatmap_path(d, rope, view) for d in dirs for rope in a.rope for view in views}
    taken = next((p for p in pngs.values() if os.path.exists(p)), None) if a.plot and not a.overwrite else None
    if taken:
        raise SystemExit(f"--plot: {taken} exists (an earlier heatmap): pass --overwrite to replace it, or move it away")
    bar = tqdm(total=len(runs) * len(a.rope) * len(views) * len(examples), desc="niah", dynamic_ncols=True)
    rows = []
    for d, model, cfg in runs:
        mcfg = adapt_memory_config(a, cfg)
        # one untimed batch first: the device's start-up (CUDA context, kernel plans, and for adapt
        # torch.func's first call, about 4 s on an H200) is not the sampler's speed
        generate(model, [e["prompt"] for e in examples[:a.batch_size]], gen_len=answer_len, steps=1,
                 prefix_cache=a.prefix_cache, adapt=any(VIEWS[v][1] for v in views), mcfg=mcfg)
        for rope in a.rope:
            model.cfg.rope_scaling = rope
            for view in views:
                outputs, scores, decode_s = decode_row(model, examples, view, a, mcfg=mcfg, enc=enc,
                                                       answer_len=answer_len, steps=steps, device=device, bar=bar)
                samples = [dict(task=e["task"], length=e["length"], depth=e["depth"],
                                distance=distance(e, model.cfg.attn_chunk), output=o, score=s)
                           for e, o, s in zip(examples, outputs, scores)]
                label = row_label(cfg, view == "adapt", d) if view in ("plain", "adapt") else \
                    f"{row_label(cfg, False, d)}: {VIEW_NAMES[view]}"
                rows.append(dict(label=label + ("" if rope == "none" else f" (RoPE {rope})"), out_dir=d,
                                 adapt=VIEWS[view][1] is not None, view=view, rope=rope, decode_s=decode_s,
                                 cells=cells(samples, a.tasks, a.lengths), samples=samples))
    bar.close()
    print_tables(rows, a, examples)
    write_atomic(path, json.dumps(dict(args=vars(a), answer_len=answer_len, steps=steps, forms=forms,
                                       adapt=dict(steps=mcfg.steps, lr=mcfg.lr, rank=mcfg.rank, ratio=a.adapt_ratio),
                                       rows=rows), indent=1))
    print(f"wrote {path}")
    if a.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("note: --plot needs matplotlib (pip install matplotlib); no heatmaps written")
            return
        for r in rows:
            png = pngs[r["out_dir"], r["rope"], r["view"]]
            plot(r, a.lengths, a.depths, png)
            print(f"wrote {png}")


if __name__ == "__main__":
    main()
