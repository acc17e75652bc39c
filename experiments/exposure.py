"""The exposure-bias ratio of the paper's Fig. 3 (Eq. 3-4) on held-out needle rows.

    python -m experiments.exposure --out_dir out-mdlm out-memdlm --n=256        # measure one run of each
    python -m experiments.exposure --summary out-proto/s*/exposure.json --png=exposure.png   # the mean over runs

Rows come from NiahData's val split with the checkpoint's settings: a prompt, then the
answer window of A tokens (the response). For m = A, A-1, ..., 1 masked response tokens
(t = m / A, the forward process's ratio):
  L_static(t)  the mean NLL of the ground truth at the masked response tokens, m of them
               masked at random and the others the ground truth (Eq. 3);
  L_seq(t)     the same where the visible response tokens are the model's own: the response
               decoded from fully masked, greedily, the most confident token each step (as
               niah_eval decodes with its default steps), until m are left masked (Eq. 4).
R_EB(t) = L_seq / L_static; at t = 1 nothing is decoded yet and R_EB = 1. Rows: a checkpoint
trained with mem=False is "Standard MDLM"; one with mem=True gives "MemDLM (Train-Only)" and
"MemDLM (Train & Inference)", whose prompts are first written into fast weights
(memory.adapt) that stay applied. Float32 throughout.
"""

if not __package__:  # run as a file: the imports below need the repository root on the path
    raise SystemExit("run it from the repository root as a module: python -m experiments.exposure")

import argparse
import json
import os

import torch
import torch.nn.functional as F

from memory import MemoryConfig, adapt
from model import ends_in_one_line, load_model, pick_device, proposal_logits, seed_arg
from experiments.common import mean_stderr, repeat, row_label, writable, write_atomic
from niah import FORMS, NIAH_DEFAULTS, NiahData


def val_rows(cfg, n, device, forms=None, seed=0):
    """n rows of NiahData's val split for the train config cfg, each with its answer window
    maskable (no fully maskable rows): (x0, maskable, key_pad) [n, block_size]."""
    over = {"batch_size": n, "niah_full_frac": 0.0, **({"niah_forms": forms} if forms else {})}
    return NiahData({**NIAH_DEFAULTS, **cfg, **over}, device).batch("val", torch.Generator().manual_seed(seed))


def _nll(model, x, pos, target, fast, key_pad):
    """Logits [B, A, V] at the response positions pos [B, A] and the NLL of target there."""
    h = model(x, fast=fast, key_pad=key_pad)
    logits = model.logits(h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1]))).float()
    return logits, F.cross_entropy(logits.transpose(1, 2), target, reduction="none")


@torch.no_grad()
def curves(model, x0, maskable, key_pad=None, fast=None, generator=None):
    """(L_static, L_seq), each [A], for m = A, ..., 1 masked response tokens: the mean NLL over
    the rows' masked response tokens; and the decoded responses [B, A]. Each row's maskable
    tokens are its response, A in all rows. fast: the rows' fast weights (Train & Inference)
    or None. generator: the static masks."""
    B, A = x0.shape[0], int(maskable[0].sum())
    pos = maskable.nonzero()[:, 1].view(B, A)
    target, mask_id = x0.gather(1, pos), model.cfg.mask_id
    canvas = x0.masked_fill(maskable, mask_id)
    static, seq = [], []
    for k in range(A):
        m = A - k
        logits, nll = _nll(model, canvas, pos, target, fast, key_pad)
        hidden = canvas.gather(1, pos) == mask_id  # m per row
        seq.append((nll * hidden).sum() / hidden.sum())
        # reveal one token of the model's own: its most confident prediction among the masked
        # positions (sample.generate's low-confidence step; the mask and padding rows never proposed)
        conf, tok = proposal_logits(logits, model.cfg).softmax(-1).max(-1)
        j = conf.masked_fill(~hidden, -1.0).argmax(1, keepdim=True)
        canvas.scatter_(1, pos.gather(1, j), tok.gather(1, j))
        # the forward process at the same ratio: m response tokens of the ground truth masked at random
        u = torch.rand(B, A, device=x0.device, generator=generator)
        hide = u.argsort(1).argsort(1) < m
        _, nll = _nll(model, x0.scatter(1, pos, target.masked_fill(hide, mask_id)), pos, target, fast, key_pad)
        static.append((nll * hide).sum() / hide.sum())
    return torch.stack(static), torch.stack(seq), canvas.gather(1, pos)


def measure(dirs, n, batch_size, device, forms=None, seed=0):
    """The curves of every row of the checkpoints in dirs on the same n rows and static masks."""
    runs = [(d, *load_model(d, device, usable_for="evaluate")) for d in dirs]
    for d, _, cfg in runs:  # one set of rows for every checkpoint: needle rows of one shape
        if cfg.get("dataset") != "niah":
            raise SystemExit(f"{d} was trained on dataset={cfg.get('dataset')}: the ratio is measured on needle rows, "
                             f"give checkpoints trained with --dataset=niah")
        for k in ("block_size", "niah_answer_len", "tokenizer"):
            if cfg.get(k) != runs[0][2].get(k):
                raise SystemExit(f"{d} has {k}={cfg.get(k)!r}, {dirs[0]} {runs[0][2].get(k)!r}: measure checkpoints "
                                 f"of one setting together")
    x0, maskable, key_pad = val_rows(runs[0][2], n, device, forms, seed)
    A = int(maskable[0].sum())
    rows = []
    for d, model, cfg in runs:
        mcfg = MemoryConfig.from_config(cfg)
        for on in (False, True) if cfg["mem"] else (False,):
            g_static = torch.Generator(device).manual_seed(seed)  # the same static masks for every row
            g_adapt = torch.Generator(device).manual_seed(seed + 1)
            sums, correct = torch.zeros(2, A, dtype=torch.float64), 0
            for i in range(0, n, batch_size):
                x, m, pad = x0[i:i + batch_size], maskable[i:i + batch_size], key_pad[i:i + batch_size]
                # the prompt alone is written into the memory, as sample.py --adapt does
                fast = adapt(model, x, mcfg, key_pad=m | pad, generator=g_adapt)[0] if on else None
                static, seq, decoded = curves(model, x, m, pad, fast, g_static)
                sums += torch.stack([static, seq]).double().cpu() * len(x)
                correct += (decoded == x[m].view(len(x), A)).sum().item()
            static, seq = (sums / n).tolist()
            rows.append(dict(label=row_label(cfg, on, d), kind=row_label(cfg, on, "").strip(), out_dir=d, adapt=on,
                             token_acc=correct / (n * A), static=static, seq=seq,
                             ratio=[q / s for q, s in zip(seq, static)]))
    forms = forms or runs[0][2].get("niah_forms", NIAH_DEFAULTS["niah_forms"])
    return dict(n=n, seed=seed, forms=forms, answer_len=A, t=[(A - k) / A for k in range(A)], rows=rows)


def summary(results):
    """The mean over runs (seeds) of each row kind, step by step: {kind: dict(n, token_acc,
    ratio, ratio_se, static, seq)}, and the t of each step."""
    t = results[0]["t"]
    if any(r["t"] != t for r in results):
        raise SystemExit("the results have different answer windows: summarise runs of one setting together")
    kinds = {}
    for res in results:
        for row in res["rows"]:
            kinds.setdefault(row["kind"], []).append(row)
    out = {}
    for kind, rows in kinds.items():
        stats = [mean_stderr([r["ratio"][k] for r in rows]) for k in range(len(t))]
        out[kind] = dict(n=len(rows), token_acc=sum(r["token_acc"] for r in rows) / len(rows),
                         ratio=[s["mean"] for s in stats], ratio_se=[s["stderr"] for s in stats],
                         **{key: [sum(r[key][k] for r in rows) / len(rows) for k in range(len(t))]
                            for key in ("static", "seq")})
    return t, out


def table(t, kinds):
    """Markdown: R_EB at eight points of the decoding and its mean over all steps, mean ± standard
    error over runs, and the share of the response tokens decoded right."""
    A = len(t)
    cols = sorted({min(A - 1, round(i * A / 8)) for i in range(8)} | {A - 1})
    lines = [(f"R_EB = L_seq / L_static on the answer window ({A} tokens), by masked fraction t (the steps "
              "decoded so far: A (1 - t)); mean ± standard error over runs. Decoded right: the share of the "
              "response tokens (answer and <|endoftext|> padding) the decoding got right."), "",
             "| row | " + " | ".join(f"t={t[k]:.2f}" for k in cols) + " | mean over t | decoded right |",
             "|---|" + "---|" * (len(cols) + 2)]
    for kind, s in kinds.items():
        lines.append(f"| {kind} (n={s['n']}) | " + " | ".join(f"{s['ratio'][k]:.2f} ± {s['ratio_se'][k]:.2f}"
                                                              for k in cols) + f" | {sum(s['ratio']) / A:.2f} | {s['token_acc']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(t, kinds, path):
    """Paper Fig. 3: R_EB against the denoising steps, a line per row, ± standard error shaded."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = list(range(len(t)))
    for kind, s in kinds.items():
        lo = [r - e for r, e in zip(s["ratio"], s["ratio_se"])]
        hi = [r + e for r, e in zip(s["ratio"], s["ratio_se"])]
        ax.plot(steps, s["ratio"], lw=2, label=f"{kind} (n={s['n']})")
        ax.fill_between(steps, lo, hi, alpha=0.2)
    ax.axhline(1.0, color="gray", ls="--", label="Ideal robustness")
    ax.set_yscale("log")  # a ratio; it spans orders of magnitude once the static loss is near 0
    ax.set(xlabel="denoising steps (tokens decoded)", ylabel="exposure-bias ratio L_seq / L_static")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read_measurement(path):
    """One --json file of --out_dir, checked: one line for a file that is not one."""
    if not os.path.isfile(path):
        raise SystemExit(f"{path} is not a file: give the files --out_dir wrote")
    try:
        with open(path) as f:
            res = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"cannot read {path}: {e}") from None
    keys = ("kind", "token_acc", "static", "seq", "ratio")
    if not (isinstance(res, dict) and isinstance(res.get("t"), list) and isinstance(res.get("rows"), list)
            and all(isinstance(r, dict) and all(k in r for k in keys) for r in res["rows"])):
        raise SystemExit(f"{path} is not a measurement: give the files --out_dir wrote")
    return res


def main(argv=None):
    with ends_in_one_line("interrupted; a file already written is whole (each is written at once, then renamed): "
                          "run the command again"):
        return _main(argv)


def _main(argv):
    p = argparse.ArgumentParser(description="The exposure-bias ratio (paper Fig. 3) of train.py needle checkpoints.",
                                allow_abbrev=False)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--out_dir", nargs="+", help="checkpoint directories: measure them on the same rows")
    src.add_argument("--summary", nargs="+", help="JSON files of earlier measurements: their mean")
    p.add_argument("--n", type=int, default=256, help="val rows")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--forms", default=None, choices=FORMS,
                   help="the rows' surface forms (default: the first checkpoint's)")
    p.add_argument("--seed", type=seed_arg, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="results (default: exposure.json in the first out_dir)")
    p.add_argument("--md", default=None, help="also write the table here")
    p.add_argument("--png", default=None, help="also draw the curves here (matplotlib)")
    p.add_argument("--overwrite", action="store_true", help="replace --json, --md and --png files that exist")
    a = p.parse_args(argv)
    if a.n < 1 or a.batch_size < 1:
        raise SystemExit("--n and --batch_size must be >= 1")
    for d in a.out_dir or []:
        if not os.path.isfile(os.path.join(d, "ckpt.pt")):
            raise SystemExit(f"no checkpoint at {os.path.join(d, 'ckpt.pt')}: train one first "
                             f"(python train.py --config niah --out_dir={d})")
    path = a.json or (os.path.join(a.out_dir[0], "exposure.json") if a.out_dir else None)
    outputs = [(what, f) for what, f in (("--json", path), ("--md", a.md), ("--png", a.png)) if f]
    for what, f in outputs:
        writable(f, what, a.overwrite)
    if same := repeat([f for _, f in outputs]):
        (first, _), (what, f) = outputs[same[0]], outputs[same[1]]
        raise SystemExit(f"{first} and {what} name the same file ({f}): give each its own")
    if a.png and os.path.splitext(a.png)[1].lower() not in (".png", ".pdf", ".svg"):
        raise SystemExit(f"--png={a.png}: name a .png, .pdf or .svg file")
    if a.out_dir:
        results = [measure(a.out_dir, a.n, a.batch_size, pick_device(a.device), a.forms, a.seed)]
        out = results[0]
    else:
        if repeat(a.summary):
            raise SystemExit("--summary names a file twice: give each measurement once")
        results = [read_measurement(f) for f in a.summary]
    t, kinds = summary(results)
    if a.summary:
        out = dict(files=a.summary, t=t, kinds=kinds)
    text = table(t, kinds)
    print(text)  # first: should a write fail, the numbers are on the screen
    if path:
        write_atomic(path, json.dumps(out, indent=1))
        print(f"wrote {path}")
    if a.md:
        write_atomic(a.md, text)
    if a.png:
        try:
            plot(t, kinds, a.png)
            print(f"wrote {a.png}")
        except ImportError:
            print("note: --png needs matplotlib (pip install matplotlib); no figure written")

if __name__ == "__main__":
    main()
