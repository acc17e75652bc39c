"""The needle-in-a-haystack evaluation of train.py checkpoints: the paper's Table 1 in miniature.

    python -m experiments.niah_eval --out_dir out-mdlm out-memdlm --lengths=256,512 --n=50

Every checkpoint is evaluated on the same examples (niah.make_example), decoded by
sample.generate with and without inference-time memory (--adapt), scored as RULER does
(niah.score). Prints a markdown table of mean +- standard error per task x length and writes
every sample to a JSON file.
"""
import argparse
import json
import os
import random
import time

import numpy as np
import torch
from tqdm import tqdm

from data.tokenizer import decode, get_encoding
from experiments.common import int_list, mean_stderr, row_label
from memory import MemoryConfig
from model import load_model, pick_device
from niah import FORMS, HAYSTACKS, NIAH_DEFAULTS, TASKS, make_example, parse_tasks, score
from sample import generate, plan


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


def main(argv=None):
    p = argparse.ArgumentParser(description="Needle-in-a-haystack evaluation of train.py checkpoints.")
    p.add_argument("--out_dir", nargs="+", required=True, help="checkpoint directories, evaluated on the same examples")
    p.add_argument("more_dirs", nargs="*", help=argparse.SUPPRESS)  # --out_dir=a b c
    p.add_argument("--adapt", choices=("off", "on", "both"), default="both", help="inference-time memory")
    p.add_argument("--tasks", default="all", help=f"comma list of {', '.join(TASKS)}, or all")
    p.add_argument("--lengths", type=int_list, default=[256, 512], help="context lengths: prompt + answer window")
    p.add_argument("--depths", type=int_list, default=[0, 25, 50, 75, 100], help="needle depths in percent")
    p.add_argument("--n", type=int, default=25, help="examples per task and length, spread over the depths")
    p.add_argument("--seed", type=int, default=0)
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
    p.add_argument("--overwrite", action="store_true", help="replace the results file if it exists")
    p.add_argument("--plot", action="store_true", help="a length x depth heatmap PNG per row (matplotlib)")
    a = p.parse_args(argv)
    if a.n < 1 or a.batch_size < 1 or min(a.lengths) < 1 or not all(0 <= d <= 100 for d in a.depths):
        raise SystemExit("--n, --batch_size and --lengths must be >= 1, --depths within 0-100")
    dirs = a.out_dir + a.more_dirs
    try:
        tasks = list(dict.fromkeys(parse_tasks(a.tasks)))  # each task once, whatever its training weight
    except ValueError as e:
        raise SystemExit(str(e)) from None

    device = pick_device(a.device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    runs = [(d, *load_model(d, device)) for d in dirs]
    path = a.json or os.path.join(dirs[0], "niah.json")  # checked now, not after the evaluation
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise SystemExit(f"--json={path}: the directory {os.path.dirname(os.path.abspath(path))} does not exist: "
                         f"create it or choose another file")
    if os.path.exists(path) and not a.overwrite:
        raise SystemExit(f"{path} exists: choose another --json file, or pass --overwrite to replace it")
    tokenizers = {cfg["tokenizer"] for _, _, cfg in runs}
    if len(tokenizers) > 1:
        raise SystemExit(f"the checkpoints use different tokenizers ({', '.join(sorted(tokenizers))}): "
                         f"evaluate them separately")
    enc = get_encoding(tokenizers.pop())
    answer_len = a.answer_len or runs[0][2].get("niah_answer_len", NIAH_DEFAULTS["niah_answer_len"])
    steps = a.steps or answer_len
    forms = a.forms or runs[0][2].get("niah_forms", NIAH_DEFAULTS["niah_forms"])
    try:
        plan(answer_len, steps)  # the sampler's own check of gen_len and steps
    except ValueError as e:
        raise SystemExit(str(e)) from None

    # the same examples for every checkpoint; an example depends only on (seed, task, length, i)
    examples = []
    try:
        for L in a.lengths:
            for t in tasks:
                for i in range(a.n):
                    d = a.depths[i % len(a.depths)]
                    ex = make_example(t, L, d, random.Random(f"{a.seed}:{t}:{L}:{i}"), enc, a.haystack, answer_len, forms)
                    examples.append({**ex, "task": t, "length": L, "depth": None if t == "cwe" else d})
    except ValueError as e:
        raise SystemExit(str(e)) from None
    for d, model, _ in runs:
        if max(a.lengths) > model.cfg.block_size:
            print(f"note: {d} was trained at block_size={model.cfg.block_size}; longer lengths test extrapolation")

    settings = {"off": [False], "on": [True], "both": [False, True]}[a.adapt]
    bar = tqdm(total=len(runs) * len(settings) * len(examples), desc="niah", dynamic_ncols=True)
    rows = []
    for d, model, cfg in runs:
        mcfg = MemoryConfig.from_config(cfg)
        for adapt in settings:
            outputs, scores, decode_s = [], [], 0.0
            for k in range(0, len(examples), a.batch_size):
                chunk = examples[k:k + a.batch_size]
                g = torch.Generator(device).manual_seed(a.seed * 1_000_003 + k)  # adapt's masks and phi_0
                sync()
                t0 = time.perf_counter()
                tokens, _ = generate(model, [e["prompt"] for e in chunk], gen_len=answer_len, steps=steps,
                                     block_len=None, temperature=0.0, remasking="low_confidence", generator=g,
                                     threshold=a.threshold, adapt=adapt, mcfg=mcfg, prefix_cache=a.prefix_cache)
                sync()
                decode_s += time.perf_counter() - t0
                for e, ids in zip(chunk, tokens.tolist()):
                    outputs.append(decode(enc, ids))
                    scores.append(score(outputs[-1], e["answers"]))
                bar.update(len(chunk))
            samples = [dict(task=e["task"], length=e["length"], depth=e["depth"], output=o, score=s)
                       for e, o, s in zip(examples, outputs, scores)]
            rows.append(dict(label=row_label(cfg, adapt, d), out_dir=d, adapt=adapt, decode_s=decode_s,
                             cells=cells(samples, tasks, a.lengths), samples=samples))
    bar.close()

    cols = [(t, L) for t in tasks for L in a.lengths]
    print("| model | " + " | ".join(f"{t} {L}" for t, L in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for r in rows:
        cell = [r["cells"][t][str(L)] for t, L in cols]
        print(f"| {r['label']} | " + " | ".join(f"{100 * c['mean']:.1f} ± {100 * c['stderr']:.1f} ({c['n']})"
                                                for c in cell) + " |")
    with open(path, "w") as f:
        json.dump(dict(args=vars(a), answer_len=answer_len, steps=steps, forms=forms, rows=rows), f, indent=1)
    for r in rows:  # the sampler's speed: --threshold and --prefix_cache trade it against the table
        print(f"{r['label']}: {r['decode_s']:.1f} s decoding, {len(examples) / r['decode_s']:.1f} answers/s")
    print(f"wrote {path}")
    if a.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("note: --plot needs matplotlib (pip install matplotlib); no heatmaps written")
            return
        for r in rows:
            png = os.path.join(r["out_dir"], f"niah_{'adapt' if r['adapt'] else 'base'}.png")
            plot(r, a.lengths, a.depths, png)
            print(f"wrote {png}")


if __name__ == "__main__":
    main()
