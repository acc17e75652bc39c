"""Where attention cannot reach: the tables of the chunked-attention, write-then-hide and
length-extrapolation runs, over seeds, from the results files of experiments.niah_eval (--hide,
--rope, checkpoints trained with --attn_chunk).

    python -m experiments.reach --root=out-reach                       # root/s*/reach.json
    python -m experiments.reach --root=out-reach --pattern='sweep_*.json' --against=cut --seeds=2,3,4,5
    python -m experiments.reach --root=out-ext --pattern=extrap.json   # --lengths past training, --rope rows

Per seed S, root/sS/<pattern> holds one niah_eval run over the checkpoints root/sS/<run>. For
each row (a run, a view: plain, adapt, and the write-then-hide views cut, cut_adapt, hidden, and
a RoPE scaling) and each length x distance cell (the needle's distance from the answer, in
chunks; none under full attention), the mean over seeds of two scores: RULER's (the answer
found whole) and the digit score (the share of the answer's characters written at their place:
partial retrieval, chance 0.1 for digits). Then each row minus the row named by --against of the
same run and RoPE scaling, or the same view of the run named by --against (default: Standard
MDLM, the plain view of ft_mdlm), paired over seeds, with the 95% t interval, and the seeds that interval would need to shrink to +-3 points
at the spread measured.
"""

if not __package__:  # run as a file: the imports below need the repository root on the path
    raise SystemExit("run it from the repository root as a module: python -m experiments.reach")

import argparse
import glob
import json
import os
import random

from data.tokenizer import get_encoding
from experiments.common import fmt_diff, int_list, mean_stderr, paired, seeds_for
from niah import make_example

STANDARD = ("ft_mdlm", "plain")  # Standard MDLM: the MDLM fine-tune decoded from the full prompt, no memory
RUN_NAMES = {"base": "MDLM base", "ft_mdlm": "Standard MDLM", "ft_mem": "MemDLM scope response",
             "ft_prompt": "MemDLM scope prompt", "ft_exact": "MemDLM scope response, exact hypergradient"}
VIEW_NAMES = {"plain": "", "adapt": " + adapt", "cut": ": needle cut", "cut_adapt": ": cut, memory of the cut prompt",
              "hidden": ": cut, memory of the full prompt"}


def digit_score(output, answer):
    """The share of the answer's characters that the output (its first word) has at their place."""
    words = output.split()
    out = words[0] if words else ""
    return sum(a == b for a, b in zip(out, answer)) / len(answer)


def answers(result):
    """The reference answers of a niah_eval results file's examples, drawn again as it drew them
    (an example depends only on the seed, task, length and index)."""
    a, enc = result["args"], get_encoding("byte")
    out = []
    for L in a["lengths"]:
        for t in a["tasks"]:
            for i in range(a["n"]):
                ex = make_example(t, L, a["depths"][i % len(a["depths"])], random.Random(f"{a['seed']}:{t}:{L}:{i}"),
                                  enc, a["haystack"], result["answer_len"], result["forms"])
                out.append(ex["answers"][0])
    return out


def seed_cells(path):
    """{(run, view, rope): {(length, distance): (score, digit score)}} of one results file."""
    result = json.load(open(path))
    refs = answers(result)
    cells = {}
    for row in result["rows"]:
        key = (os.path.basename(row["out_dir"].rstrip("/")), row.get("view", "adapt" if row["adapt"] else "plain"),
               row.get("rope", "none"))
        if key in cells:  # runs pair across seeds by their directory's name
            raise SystemExit(f"{path}: two checkpoints are named {key[0]}: the tables pair runs across seeds by "
                             f"their directory's name; evaluate them under distinct names")
        by = {}
        for s, ref in zip(row["samples"], refs):
            by.setdefault((s["length"], s["distance"]), []).append((s["score"], digit_score(s["output"], ref)))
        cells[key] = {c: tuple(sum(v[k] for v in vs) / len(vs) for k in (0, 1)) for c, vs in by.items()}
    return cells


def read_cells(path):
    """seed_cells of a results file, or one line saying what is wrong with it."""
    try:
        return seed_cells(path)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise SystemExit(f"{path}: not a results file of python -m experiments.niah_eval "
                         f"({type(e).__name__}: {str(e)[:120]}): rerun it or leave it out with --pattern/--seeds") from None


def table(seeds, against, which, half=3.0):
    """Markdown: every row's mean over seeds per cell, its paired difference with `against`, and
    the seeds that difference's 95% interval would need for a half-width of `half` points (the
    last two None where no row has its reference in the results)."""
    order = lambda names, k: (list(names).index(k), "") if k in names else (len(names), k)  # unknown ones last
    rows = sorted({r for s in seeds.values() for r in s},
                  key=lambda r: (order(RUN_NAMES, r[0]), r[2] != "none", r[2], order(VIEW_NAMES, r[1])))
    cols = sorted({c for s in seeds.values() for r in s.values() for c in r}, key=lambda c: (c[0], c[1] is None, c[1]))
    name = lambda r: (RUN_NAMES.get(r[0], r[0]) + VIEW_NAMES.get(r[1], " " + r[1]) +
                      ("" if r[2] == "none" else f" (RoPE {r[2]})"))
    head = "| row | " + " | ".join(str(L) if d is None else f"{L}: d {d}" for L, d in cols) + " |\n|---|" + \
        "---|" * len(cols) + "\n"
    means, diffs, needed = head, head, head
    for r in rows:
        have = [s for s in seeds.values() if r in s]
        cell = [mean_stderr([100 * s[r][c][which] for s in have]) for c in cols]
        means += f"| {name(r)} | " + " | ".join(f"{m['mean']:.1f} ± {m['stderr']:.1f}" for m in cell) + " |\n"
        ref = ((*STANDARD, r[2]) if against == "standard" else (r[0], against, r[2]) if against in VIEW_NAMES
               else (against, r[1], r[2]))
        if r == ref:
            continue
        both = [s for s in have if ref in s]
        if not both:  # its reference was not evaluated (no ft_mdlm, say)
            continue
        d = [paired([100 * s[r][c][which] for s in both], [100 * s[ref][c][which] for s in both]) for c in cols]
        diffs += f"| {name(r)} | " + " | ".join(fmt_diff(x) for x in d) + " |\n"
        needed += f"| {name(r)} | " + " | ".join(str(seeds_for(x["stderr"] * x["n"] ** 0.5, half)) if x["n"] > 1
                                                 else "n/a" for x in d) + " |\n"
    return (means, diffs, needed) if diffs != head else (means, None, None)


def main(argv=None):
    p = argparse.ArgumentParser(description="The chunked-attention and write-then-hide tables over seeds.",
                                allow_abbrev=False)
    p.add_argument("--root", required=True, help="directory of the seeds' directories s1, s2, ...")
    p.add_argument("--pattern", default="reach.json", help="the niah_eval results file(s) in each seed's directory")
    p.add_argument("--seeds", type=int_list, default=None, help="the seeds to tabulate (default: every sS)")
    p.add_argument("--against", default="standard",
                   help="the reference of the differences: standard (Standard MDLM), a view of the same run "
                        "(cut_adapt: the control of write-then-hide) or a run, its same view (ft_mem)")
    a = p.parse_args(argv)
    if os.sep in a.pattern or a.pattern in (".", ".."):
        raise SystemExit(f"--pattern={a.pattern}: a file name (wildcards allowed) in each seed's directory, no path")
    every = sorted(glob.glob(os.path.join(glob.escape(a.root), "s*", a.pattern)))
    files = [f for f in every if a.seeds is None or f.split(os.sep)[-2] in {f"s{s}" for s in a.seeds}]
    if not every:
        raise SystemExit(f"no {a.pattern} under {a.root}/s*/: run python -m experiments.niah_eval --hide first")
    if not files:
        raise SystemExit(f"--seeds={','.join(map(str, a.seeds))}: no {a.pattern} in those seeds' directories; "
                         f"{a.root} has {', '.join(sorted({f.split(os.sep)[-2] for f in every}))}")
    for pattern in sorted({os.path.basename(f) for f in files}):
        seeds = {f.split(os.sep)[-2]: read_cells(f) for f in files if os.path.basename(f) == pattern}
        runs = {r[0] for s in seeds.values() for r in s}
        if a.against not in ("standard", *VIEW_NAMES, *runs):
            raise SystemExit(f"--against={a.against}: use standard, a view ({', '.join(VIEW_NAMES)}) or a run of "
                             f"{pattern} ({', '.join(sorted(runs))})")
        against = ("Standard MDLM" if a.against == "standard" else f"the same run's view {a.against}"
                   if a.against in VIEW_NAMES else f"the same view of {RUN_NAMES.get(a.against, a.against)}")
        print(f"## {pattern}: {len(seeds)} seeds ({', '.join(sorted(seeds))}); cells: length, distance in chunks\n")
        for which, what in ((0, "score (%, the answer whole)"), (1, "digit score (%, characters at their place)")):
            means, diffs, needed = table(seeds, a.against, which)
            print(f"### {what}: mean ± standard error over seeds\n\n{means}")
            if diffs is None:
                print(f"(no differences: no row has its reference, {against}, in {pattern}; --against picks another)\n")
                continue
            print(f"### {what}: minus {against}, paired over seeds [95% t interval]\n\n{diffs}")
            print(f"### {what}: seeds for a 95% interval of ± 3 points at this spread\n\n{needed}")


if __name__ == "__main__":
    main()
