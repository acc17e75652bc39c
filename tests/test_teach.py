"""Tests of the first run and the lessons: sample.py with no arguments (a held-out prompt),
sample.py --show, hypergrad.py (its table, and the exact hypergradient against finite
differences), and the reading budget of one MemDLM step and one adaptive sampling call. CPU only,
seconds: python -m pytest -q tests/test_teach.py"""
import inspect
import os
import re
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from lessons import hypergrad
import sample
import train
from data.tokenizer import decode, get_encoding
from memory import MemoryConfig, memdlm_loss
from model import load_model

ENC = get_encoding("byte")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A directory whose out/ holds a tiny checkpoint, as train.py --config small leaves out/."""
    d = tmp_path_factory.mktemp("first_run")
    train.main(["--config", "tiny", f"--out_dir={d / 'out'}", "--max_iters=5", "--eval_iters=1"])
    return d


def printed(capsys, argv):
    sample.main(argv)
    return capsys.readouterr().out.splitlines()


def test_first_run_prompts_with_held_out_text(workdir, capsys, monkeypatch):
    monkeypatch.chdir(workdir)
    lines = printed(capsys, [])  # --out_dir defaults to out, no prompt given
    assert lines[0].startswith("---------- prompt: ") and "tokens of data/pydoc/val.bin, held out" in lines[0]
    end = lines.index("---------- sample 1/1 ----------")
    prompt = "\n".join(lines[1:end])
    val = np.memmap(os.path.join(os.path.dirname(sample.__file__), "data", "pydoc", "val.bin"), dtype=np.uint16)
    docs = [decode(ENC, doc.tolist()) for doc in np.split(val, np.flatnonzero(val == ENC.eot_token) + 1)]
    assert len(prompt) >= 4 and any(prompt in doc for doc in docs)  # a passage of one held-out document
    assert not prompt[-1].isspace() and sample.in_prose(prompt)  # cut at a word end, inside a sentence
    sample_text = "\n".join(lines[end + 1:])
    assert sample_text.startswith(prompt) and len(sample_text) > len(prompt)
    # another seed, another passage; --unconditional (or an empty prompt) prints none
    assert printed(capsys, ["--seed=7", "--gen_len=8"])[1:3] != lines[1:3]
    for argv in (["--unconditional"], ["--prompt="]):
        out = printed(capsys, argv + ["--gen_len=8"])
        assert out[0] == "---------- sample 1/1 ----------"


def test_held_out_prompts_end_inside_a_sentence_of_prose():
    assert sample.in_prose("the view reflects these changes,\nthe") and sample.in_prose("a, b,")
    for text in ("ends a paragraph.", "a footnote [3]", "   iter(d)", "| as \"del s[:]\") |\n| s.copy", "x = 1\n   "):
        assert not sample.in_prose(text), text
    cfg = train.parse_config(["--config", "tiny"])
    prompts = [sample.held_out_prompt(cfg, ENC, 48, seed)[0] for seed in range(20)]
    assert all(sample.in_prose(p) for p in prompts) and len(set(prompts)) == 20


def test_show_one_line_per_step(workdir, capsys):
    out = str(workdir / "out")
    lines = printed(capsys, [f"--out_dir={out}", "--prompt=The with", "--show", "--adapt", "--gen_len=16",
                             "--block_len=8", "--steps=8"])
    start = lines.index(f"---------- sample 1, one line per step ({sample.MASK_CHAR} masked) ----------")
    steps = lines[start + 1:start + 9]
    assert lines[start + 9].startswith("adapt step 1/2")  # 8 steps, then the rest
    masks = [s.count(sample.MASK_CHAR) for s in steps]
    assert masks[0] > 0 and masks[-1] == 0 and all(a >= b for a, b in zip(masks, masks[1:]))
    # the final line is the sample's continuation, newlines shown as NEWLINE_CHAR
    continuation = "\n".join(lines[lines.index("---------- sample 1/1 ----------") + 1:])[len("The with"):]
    assert steps[-1] == continuation.replace("\n", sample.NEWLINE_CHAR)


def test_show_line():
    mask = 257
    ids = list(b"a") + [mask] + list(b"\nb") + [mask, ENC.eot_token] + list(b"c")
    assert sample.show_line(ENC, ids, mask) == f"a{sample.MASK_CHAR}{sample.NEWLINE_CHAR}b{sample.MASK_CHAR}"


def test_hypergrad_table(workdir, capsys):
    hypergrad.main([f"--out_dir={workdir / 'out'}", "--ks=1,2", "--batches=1", "--batch_size=2"])
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split("|")[1:-1] for line in lines if line.startswith(("| 1 ", "| 2 "))]
    assert len(rows) == 2 and lines[-4].startswith("| K | cos, all theta |") and len(lines[-4].split("|")) == 11
    for row in rows:
        assert all(-1 <= float(v) <= 1 for v in row[1:4]) and float(row[4]) > 0
        assert row[7].strip() == row[8].strip() == "-"  # no GPU memory on the CPU


def test_exact_hypergradient_matches_finite_differences(workdir):
    """Along the direction u where the two gradients differ, the loss changes at the exact
    gradient's rate, not the first-order one's (K = 2, no clipping, float64)."""
    model, cfg = load_model(str(workdir / "out"))
    model.double()
    mcfg = replace(MemoryConfig.from_config(cfg), steps=2, clip=1e9)
    batch = hypergrad.training_batches(cfg, 1, 2, 0, "cpu")[0]
    loss_fo, fo = hypergrad.outer_gradient(model, batch, mcfg, 0, exact=False)
    loss_ex, ex = hypergrad.outer_gradient(model, batch, mcfg, 0, exact=True)
    assert loss_fo == loss_ex  # the same draws, the same loss
    assert 0 < hypergrad.cosine(fo, ex) < 1
    fo, ex = torch.cat([g.flatten() for g in fo]), torch.cat([g.flatten() for g in ex])
    u = (ex - fo) / (ex - fo).norm()
    params = list(model.parameters())

    def loss_at(eps):
        with torch.no_grad():
            for p, d in zip(params, u.split([p.numel() for p in params])):
                p += eps * d.view_as(p)
            loss = memdlm_loss(model, *batch[:2], mcfg, key_pad=batch[2], generator=torch.Generator().manual_seed(0))[0].item()
            for p, d in zip(params, u.split([p.numel() for p in params])):
                p -= eps * d.view_as(p)
        return loss

    slope = (loss_at(1e-3) - loss_at(-1e-3)) / 2e-3
    gap = (u @ ex - u @ fo).item()  # = |ex - fo| > 0
    assert abs(slope - (u @ ex).item()) < 0.02 * gap


def test_the_paper_to_code_map_names_functions_that_exist():
    """README's map, "`module.name` (file.py)": file.py defines a function (or class) name."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
    with open(os.path.join(here, "README.md")) as f:
        refs = re.findall(r"`(?:\w+\.)?(\w+)` \(([\w/]+\.py)[,:)]", f.read())
    assert len(refs) >= 10
    for name, path in refs:
        with open(os.path.join(here, path)) as f:
            assert re.search(rf"^(def|class) {name}\b", f.read(), re.M), f"README names {name} in {path}, which has no def {name}"


# ---- the reading budget of the teaching core --------------------------------------------

CORE = [os.path.abspath(f) for f in ("train.py", "memory.py", "model.py", "sample.py", "niah.py", "data/tokenizer.py")]


def functions_run(fn):
    """{(file, first line): line count} of the core's functions that fn() runs, each once,
    docstrings and untaken branches included (a reader reads them); nested ones (closures,
    comprehensions) are inside their parent's lines."""
    codes = set()

    def tracer(frame, event, arg):
        if event == "call" and os.path.abspath(frame.f_code.co_filename) in CORE:
            codes.add(frame.f_code)
    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    spans = {}
    for c in codes:
        if not c.co_name.startswith("<"):
            src, first = inspect.getsourcelines(c)
            spans[(c.co_filename, first)] = first + len(src) - 1
    return {(f, a): b - a + 1 for (f, a), b in spans.items()
            if not any(g == f and a2 < a and b <= b2 for (g, a2), b2 in spans.items())}


def test_one_memdlm_step_and_one_adaptive_sampling_call_read_in_350_and_150_lines():
    # the step: train_step on a batch, the batch drawn (StepBatches), lr_at, and train_run's loop body
    cfg = train.parse_config(["--config", "tiny", "--batch_size=2"])
    raw = train.DiffusionLM(train.model_config(cfg, ENC))
    nets, opt, mcfg = train.compiled(raw, cfg, "cpu"), train.make_optimizer(raw, cfg, False), MemoryConfig.from_config(cfg)
    data = train.make_data(cfg, "cpu")

    def step():
        batch = train.StepBatches(data, cfg["seed"], 0)[0]
        train.lr_at(0, cfg)
        train.train_step(nets, opt, batch, cfg, mcfg, train.step_generator(cfg["seed"], 0, 0, "cpu")[0])
    read = functions_run(step)
    src = inspect.getsource(train.train_run).split("\n")
    loop = next(i for i, line in enumerate(src) if line.strip() == "for step in bar:")
    indent = len(src[loop]) - len(src[loop].lstrip())
    body = next(i for i in range(loop + 1, len(src)) if src[i].strip() and len(src[i]) - len(src[i].lstrip()) <= indent)
    assert sum(read.values()) + body - loop <= 350
    sampled = functions_run(lambda: sample.generate(raw.eval(), [[1, 2, 3, 4]], gen_len=8, steps=8, block_len=4,
                                                    threshold=0.9, adapt=True, mcfg=mcfg))
    assert sum(n for k, n in sampled.items() if k not in read) <= 150
