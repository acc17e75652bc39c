"""Tests of niah.py: every example is solvable from its prompt, lengths and depths are as asked,
examples are reproducible, RULER scoring, NiahData rows, errors, and the evaluation CLI end to end.
CPU only: python -m pytest -q test_niah.py"""
import json
import random
import os
import re
from collections import Counter

import pytest
import torch

import niah
from experiments import common, niah_eval
from data.tokenizer import decode

ENC = niah.byte_encoding()
A = 32  # answer window


def solve(task, text):
    """A rule-based reader of a prompt: the answers the generator meant."""
    context, question = text.rsplit("\n", 1)
    if task in ("single", "multikey", "multivalue"):
        key = re.search(r"magic numbers? of (\w+)\?", question).group(1)
        found = re.findall(rf"The magic number of {key} is (\d+)\.", context)
        return found if task == "multivalue" else found[-1:]
    if task == "vartrack":
        value = re.search(r"value (\d+)\?", question).group(1)
        held = {}
        for var, src in re.findall(r"VAR (\w+) = (VAR \w+|\d+)\.", context):
            held[var] = held.get(src[4:]) if src.startswith("VAR ") else src
        return [v for v, h in held.items() if h == value]
    if task == "cwe":
        k = int(re.search(r"Which (\d+) words", question).group(1))
        counts = Counter(re.findall(r"\d+\. (\w+)", context)).most_common()
        assert counts[k - 1][1] > counts[k][1]  # the common words are strictly more common
        return [w for w, _ in counts[:k]]
    name = re.search(r"Where is (\w+)\?", question).group(1)
    return re.findall(rf"{name} (?:{'|'.join(niah.VERBS)}) the (\w+)\.", context)[-1:]


@pytest.mark.parametrize("task", niah.TASKS)
@pytest.mark.parametrize("haystack", niah.HAYSTACKS)
def test_answer_recoverable_and_length(task, haystack):
    for seed in range(40):
        length, depth = 200 + 37 * seed, (seed * 13) % 101
        ex = niah.make_example(task, length, depth, seed, ENC, haystack, A)
        assert sorted(solve(task, decode(ENC, ex["prompt"]))) == sorted(ex["answers"])
        assert niah.score(ex["target"], ex["answers"]) == 1.0
        assert len(ENC.encode_ordinary(ex["target"])) < A  # the window ends with <|endoftext|>
        gap = length - A - len(ex["prompt"])
        assert gap == 0 if task != "cwe" else 0 <= gap <= 12  # cwe: within one list item
        assert ENC.eot_token not in ex["prompt"]


FACT = re.compile(rf" The magic number of \w+ is \d+\.| VAR \w+ = (?:VAR \w+|\d+)\."
                  rf"| \w+ (?:{'|'.join(niah.VERBS)}) the \w+\.")


@pytest.mark.parametrize("task", [t for t in niah.TASKS if t != "cwe"])
@pytest.mark.parametrize("haystack,tol", [("noise", 11), ("prose", 50)])  # half the longest sentence
def test_needle_depth(task, haystack, tol):
    """depth = the share of the haystack (the context less the facts) before the needle."""
    for seed, length in enumerate((256, 512, 1024, 2048)):
        for depth in (0, 10, 25, 50, 75, 90, 100):
            ex = niah.make_example(task, length, depth, seed, ENC, haystack)
            # in tokens (prose has multi-byte characters); facts and question are ASCII: 1 char = 1 token
            context, question = decode(ENC, ex["prompt"]).rsplit("\n", 1)
            pos = ex["needle_pos"]
            needle = FACT.match(decode(ENC, ex["prompt"][pos:])).group()
            assert ex["answers"][0] in needle  # the needle is the fact that answers the question
            haystack_len = len(ex["prompt"]) - len(question) - 1 - sum(map(len, FACT.findall(context)))
            before = pos - sum(map(len, FACT.findall(decode(ENC, ex["prompt"][:pos]))))
            assert abs(before - depth / 100 * haystack_len) <= tol
    assert niah.make_example("cwe", 512, 50, 0, ENC)["needle_pos"] is None


def test_reproducible():
    for task in niah.TASKS:
        a = niah.make_example(task, 400, 30, 7, ENC, "prose")
        assert a == niah.make_example(task, 400, 30, 7, ENC, "prose")
        assert a == niah.make_example(task, 400, 30, niah.random.Random(7), ENC, "prose")
        assert a["prompt"] != niah.make_example(task, 400, 30, 8, ENC, "prose")["prompt"]
    assert niah.make_example("single", 300, 50, 1) == niah.make_example("single", 300, 50, 1, ENC)  # default enc


def test_score():
    assert niah.score("The numbers are 123, 456 and 789.", ["123", "456", "789"]) == 1.0
    assert niah.score("kitchen", ["Kitchen"]) == 1.0
    assert niah.score("ABC def", ["abc", "DEF", "GHI"]) == pytest.approx(2 / 3)
    assert niah.score("", ["1234567"]) == 0.0
    assert niah.score("123456", ["1234567"]) == 0.0


def test_errors():
    with pytest.raises(ValueError, match=r"unknown task 'x': choose from single, multikey"):
        niah.make_example("x", 256, 50, 0)
    with pytest.raises(ValueError, match=r"unknown task 'nope'"):
        niah.parse_tasks("single,nope")
    with pytest.raises(ValueError, match=r"length 60 is too short for task multikey: needs at least \d+ tokens"):
        niah.make_example("multikey", 60, 50, 0)
    with pytest.raises(ValueError, match="unknown haystack"):
        niah.make_example("single", 256, 50, 0, haystack="essay")
    with pytest.raises(ValueError, match="raise answer_len"):
        niah.make_example("multivalue", 256, 50, 0, answer_len=8)
    with pytest.raises(SystemExit, match="too short"):
        niah.NiahData(dict(niah.NIAH_DEFAULTS, block_size=128, batch_size=2, seed=0, tokenizer="byte"), "cpu")
    with pytest.raises(SystemExit, match="unknown task"):
        niah.NiahData(dict(niah.NIAH_DEFAULTS, block_size=256, batch_size=2, seed=0, tokenizer="byte", niah_tasks="single,foo"), "cpu")


def test_niah_data():
    cfg = dict(niah.NIAH_DEFAULTS, block_size=320, batch_size=64, seed=3, tokenizer="byte")
    data = niah.NiahData(cfg, "cpu")
    eot, lengths, full = ENC.eot_token, [], []
    for step in range(40):
        x, maskable, key_pad = data.batch("train", torch.Generator().manual_seed(step))
        assert x.shape == maskable.shape == key_pad.shape == (64, 320)
        assert x.dtype == torch.long and maskable.dtype == key_pad.dtype == torch.bool
        full.append(bool(maskable[0, 0]))
        for b in range(64):
            n = int((~key_pad[b]).sum())
            assert not key_pad[b, :n].any() and (x[b, n:] == eot).all() and not maskable[b, n:].any()
            lengths.append(n)
            if full[-1]:  # a fully maskable batch: every row maskable up to its padding
                assert maskable[b, :n].all()
                continue
            p = n - A  # prompt, then the answer window: all of it maskable, nothing before
            assert maskable[b, p:n].all() and not maskable[b, :p].any()
            assert decode(ENC, x[b, :p].tolist()).endswith("Answer:")
            window = x[b, p:n].tolist()
            k = window.index(eot)
            assert k > 0 and all(t == eot for t in window[k:])
    assert 4 <= sum(full) <= 18  # niah_full_frac = 0.25 of 40 batches (10 expected)
    assert min(lengths) < 230 and max(lengths) == 320  # lengths spread up to block_size
    # reproducible from the generator; val rows come from another stream
    same = [data.batch("train", torch.Generator().manual_seed(9)) for _ in range(2)]
    assert all(torch.equal(u, v) for u, v in zip(*same))
    val = data.batch("val", torch.Generator().manual_seed(9))
    assert not {tuple(r) for r in same[0][0].tolist()} & {tuple(r) for r in val[0].tolist()}
    # options: one task, no full rows, a longer shortest length, prose
    data = niah.NiahData({**cfg, "niah_tasks": "babi", "niah_full_frac": 0.0, "niah_min_len": 300,
                          "niah_haystack": "prose", "niah_answer_len": 16}, "cpu")
    x, maskable, key_pad = data.batch("train", torch.Generator().manual_seed(0))
    assert (maskable.sum(1) == 16).all() and ((~key_pad).sum(1) >= 300).all()
    assert all("Where is" in decode(ENC, row.tolist()) for row in x)
    # a task named twice is drawn twice as often
    data = niah.NiahData({**cfg, "niah_tasks": "single,cwe,cwe"}, "cpu")
    drawn = [t for step in range(8) for t in data.batch("train", torch.Generator().manual_seed(step), with_tasks=True)[1]]
    assert set(drawn) == {"single", "cwe"} and 0.58 < drawn.count("cwe") / len(drawn) < 0.75  # 2/3 of 512 rows
    # a block_size that only some draws fit: those that do not are drawn again
    data = niah.NiahData({**cfg, "block_size": 200, "niah_tasks": "multivalue"}, "cpu")
    for step in range(4):
        _, _, key_pad = data.batch("train", torch.Generator().manual_seed(step))
        assert key_pad.shape == (64, 200) and (~key_pad).sum(1).min() >= 190


def test_length_curriculum():
    """fill=0 is the example's minimum (no haystack); NiahData's curriculum grows the longest
    training row with the step, while val rows and steps past the curriculum span block_size."""
    lengths = {fill: [len(niah.make_example("single", (0, 256), 50, i, answer_len=16, fill=fill)["prompt"]) + 16
                      for i in range(30)] for fill in (0.0, 0.5, 1.0)}
    assert max(lengths[0.0]) < 100 and max(lengths[0.5]) < 180 and max(lengths[1.0]) > 230
    cfg = dict(niah.NIAH_DEFAULTS, block_size=256, batch_size=32, seed=0, tokenizer="byte", niah_tasks="single",
               niah_curriculum=1000, niah_full_frac=0.0, niah_answer_len=16)
    data = niah.NiahData(cfg, "cpu")
    longest = lambda split, step: int((~data.batch(split, torch.Generator().manual_seed(1), step)[2]).sum(1).max())
    assert longest("train", 0) < 100 < longest("train", 500) < 190 < longest("train", 1000) == longest("train", 5000)
    assert longest("val", 0) > 230 and longest("train", None) == longest("train", 1000)


def test_cli_end_to_end(tmp_path, capsys):
    import train
    dirs = [str(tmp_path / "mem"), str(tmp_path / "mdlm")]
    train.main(["--config", "niah_tiny", "--out_dir=" + dirs[0], "--max_iters=2"])
    train.main(["--config", "niah_tiny", "--out_dir=" + dirs[1], "--max_iters=2", "--mem=False"])
    capsys.readouterr()
    # each task's answer accuracy is logged beside the pooled one, which lies between them
    records = [json.loads(line) for d in dirs for line in open(os.path.join(d, "log.jsonl"))]
    evals = [r for r in records if "eval_loss" in r]
    assert all(k in {"step", "eval_loss", "eval_loss_mem", "eval_answer_acc", "eval_answer_acc_single",
                     "eval_answer_acc_babi"} for r in evals for k in r)
    both = [r for r in evals if "eval_answer_acc_single" in r and "eval_answer_acc_babi" in r]
    assert both and all(min(r["eval_answer_acc_single"], r["eval_answer_acc_babi"]) <= r["eval_answer_acc"]
                        <= max(r["eval_answer_acc_single"], r["eval_answer_acc_babi"]) for r in both)
    out_json = tmp_path / "r.json"
    niah_eval.main(["--out_dir=" + dirs[0], dirs[1], "--tasks=single,vartrack,single", "--lengths=200,240",
               "--depths=0,100", "--n=2", "--answer_len=16", "--steps=8", "--batch_size=3",
               "--device=cpu", f"--json={out_json}", "--plot"])
    out = capsys.readouterr().out
    assert "| model | single 200 | single 240 | vartrack 200 | vartrack 240 |\n" in out  # a weighted task once
    for label, d in (("MemDLM (Train-Only)", 0), ("MemDLM (Train & Inference)", 0), ("Standard MDLM", 1),
                     ("Standard MDLM + adapt", 1)):
        assert f"| {label} {dirs[d]} |" in out
    assert re.search(r"\| \d+\.\d ± \d+\.\d \(2\) \|", out)
    assert "matplotlib" in out or "niah_adapt.png" in out
    assert re.search(rf"Standard MDLM {re.escape(dirs[1])}: \d+\.\d s decoding, \d+\.\d answers/s\n", out)
    assert re.search(rf"Standard MDLM \+ adapt {re.escape(dirs[1])}: \d+\.\d s decoding, \d+\.\d answers/s, "
                     r"writing the memory about \d+% of it\n", out)
    res = json.loads(out_json.read_text())
    assert [(r["out_dir"], r["adapt"]) for r in res["rows"]] == [(d, s) for d in dirs for s in (False, True)]
    assert all(r["decode_s"] > 0 for r in res["rows"])
    cell = res["rows"][0]["cells"]["single"]["200"]
    assert cell["n"] == 2 and set(cell["depths"]) == {"0", "100"} and 0 <= cell["mean"] <= 1
    assert len(res["rows"][0]["samples"]) == 8
    with pytest.raises(SystemExit, match="too short for task single"):
        niah_eval.main(["--out_dir=" + dirs[0], "--tasks=single", "--lengths=64", "--device=cpu"])
    with pytest.raises(SystemExit, match="unknown task 'foo'"):
        niah_eval.main(["--out_dir=" + dirs[0], "--tasks=foo"])
    with pytest.raises(SystemExit, match="no checkpoint"):
        niah_eval.main(["--out_dir=" + str(tmp_path / "none"), "--device=cpu"])


@pytest.mark.parametrize("task", ["single", "multikey", "multivalue", "vartrack", "babi"])
def test_hide_answers_cuts_every_fact_that_holds_an_answer_and_nothing_else(task):
    ex = niah.make_example(task, 400, 50, 3, ENC, answer_len=32)
    cut = niah.hide_answers(ex, ENC)
    text, kept = decode(ENC, ex["prompt"]), decode(ENC, cut)
    assert niah.score(text, ex["answers"]) == 1.0 and niah.score(kept, ex["answers"]) == 0.0
    spans = [s for s in ex["fact_spans"] if any(a.lower() in decode(ENC, ex["prompt"][s[0]:s[1]]).lower()
                                                for a in ex["answers"])]
    assert len(cut) == len(ex["prompt"]) - sum(b - a for a, b in spans) and cut[-20:] == ex["prompt"][-20:]
    needle = decode(ENC, ex["prompt"][slice(*ex["fact_spans"][0])])
    assert needle.strip() and needle not in kept and all(a in ex["fact_spans"] for a in spans)


def test_the_needle_distance_counts_chunks_from_the_needles_last_token():
    ex = {"prompt": [0] * 240, "needle_pos": 100, "fact_spans": [(100, 130)]}
    assert niah_eval.distance(ex, 128) == 0  # its end shares the answer's chunk (128-255)
    assert niah_eval.distance({**ex, "fact_spans": [(90, 120)]}, 128) == 1
    assert niah_eval.distance({**ex, "fact_spans": [(10, 40)]}, 64) == 3 and niah_eval.distance(ex, 0) is None
    assert niah_eval.distance({**ex, "needle_pos": None, "fact_spans": []}, 128) is None


def test_write_then_hide_decodes_the_cut_prompt_with_the_memory_of_the_full_one(tmp_path, capsys, monkeypatch):
    import sample
    import train
    out = str(tmp_path / "m")
    train.main(["--config", "niah_tiny", f"--out_dir={out}", "--max_iters=1", "--niah_tasks=single",
                "--attn_chunk=64"])
    written, decoded = [], []
    real_write, real_block = sample.write_memory, sample.block_logits

    def write(model, prompts, *a, **k):
        written.append([len(p) for p in prompts])
        return real_write(model, prompts, *a, **k)

    def block(model, canvas, *a, **k):
        decoded.append(canvas.shape[1])
        return real_block(model, canvas, *a, **k)
    monkeypatch.setattr(sample, "write_memory", write)
    monkeypatch.setattr(sample, "block_logits", block)
    path = tmp_path / "r.json"
    niah_eval.main([f"--out_dir={out}", "--hide", "--tasks=single", "--lengths=256", "--n=2", "--depths=0,100",
                    "--answer_len=16", "--steps=4", "--device=cpu", f"--json={path}", "--adapt_steps=3"])
    res = json.loads(path.read_text())
    assert [r["view"] for r in res["rows"]] == ["plain", "adapt", "cut", "cut_adapt", "hidden"]
    full = 256 - 16
    examples = [niah.make_example("single", 256, d, random.Random(f"0:single:256:{i}"), ENC, "noise", 16, "fixed")
                for i, d in enumerate((0, 100))]
    cut = [len(niah.hide_answers(e, ENC)) for e in examples]
    # the untimed first batch writes a memory too (torch.func's first call); then adapt, cut_adapt, hidden:
    # hidden writes the full prompts
    assert written == [[full, full], [full, full], cut, [full, full]]
    # one untimed step of the full prompts first (the device's start-up), then 4 steps a row; hidden decodes the cut ones
    assert len(decoded) == 1 + 5 * 4 and decoded[0] == full + 16 and decoded[17:] == [max(cut) + 16] * 4
    assert res["adapt"]["steps"] == 3 and all(s["distance"] in (0, 1, 2, 3) for s in res["rows"][0]["samples"])
    assert "score by the needle's distance from the answer" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--prefix_cache attends to a whole prefix"):
        niah_eval.main([f"--out_dir={out}", "--prefix_cache", "--device=cpu", f"--json={tmp_path / 'x.json'}"])
    with pytest.raises(SystemExit, match="--rope=yarn: use none, ntk, pi"):
        niah_eval.main([f"--out_dir={out}", "--rope=yarn"])


def test_a_row_decoded_with_another_prompts_memory_gets_what_it_gets_alone():
    import sample
    from memory import MemoryConfig
    from model import DiffusionLM, ModelConfig
    torch.manual_seed(0)
    model = DiffusionLM(ModelConfig(n_layer=2, n_head=2, n_embd=32)).eval()
    prompts = [list(range(40, 60)), list(range(70, 85))]
    memories = [list(range(100, 130)), list(range(5, 12))]
    kw = dict(gen_len=8, steps=8, adapt=True, mcfg=MemoryConfig(rank=4, lr=5.0))
    gens = lambda i: [torch.Generator().manual_seed(10 + i)]
    both, _ = sample.generate(model, prompts, generator=[g for i in (0, 1) for g in gens(i)],
                              memory_prompts=memories, **kw)
    for i in (0, 1):
        alone, _ = sample.generate(model, prompts[i:i + 1], generator=gens(i), memory_prompts=memories[i:i + 1], **kw)
        assert torch.equal(both[i], alone[0])
    own, _ = sample.generate(model, prompts, generator=[g for i in (0, 1) for g in gens(i)], **kw)
    assert not torch.equal(own, both)  # the memory is the other prompts': it changes the output


def test_reach_tables_pair_each_row_with_its_reference_over_seeds(tmp_path, capsys):
    from experiments import reach
    assert reach.digit_score(" 1234999 and more", "1234567") == 4 / 7 and reach.digit_score("", "12") == 0
    args = dict(lengths=[256], tasks=["single"], n=2, depths=[0, 100], seed=0, haystack="noise")
    refs = reach.answers({"args": args, "answer_len": 16, "forms": "fixed"})
    assert refs == [niah.make_example("single", 256, d, random.Random(f"0:single:256:{i}"), ENC, "noise", 16,
                                      "fixed")["answers"][0] for i, d in enumerate((0, 100))]
    half = lambda r: r[:len(r) // 2] + "x" * (len(r) - len(r) // 2)
    for seed, (hidden, control) in {1: (refs, ["x"] * 2), 2: ([half(r) for r in refs], ["x"] * 2),
                                    3: (refs, [half(r) for r in refs])}.items():
        rows = [dict(out_dir=f"r/s{seed}/ft_mem", view=view, adapt=True,
                     samples=[dict(length=256, distance=d, output=o, score=float(o == r))
                              for d, o, r in zip((1, 1), outs, refs)])
                for view, outs in (("hidden", hidden), ("cut_adapt", control))]
        # the same views under RoPE ntk, every answer wrong: paired with ntk's own control, a zero difference
        rows += [dict(r, rope="ntk", samples=[dict(s, output="x", score=0.0) for s in r["samples"]]) for r in rows]
        (tmp_path / f"s{seed}").mkdir()
        (tmp_path / f"s{seed}" / "reach.json").write_text(json.dumps(dict(args=args, answer_len=16, forms="fixed",
                                                                          rows=rows)))
    reach.main([f"--root={tmp_path}", "--against=cut_adapt"])
    out = capsys.readouterr().out
    # digit scores, hidden minus control per seed: all, the first half, all but the first half
    halves = sum(len(r) // 2 / len(r) for r in refs) / 2
    diffs = [100.0, 100 * halves, 100 * (1 - halves)]
    assert f"| MemDLM scope response: cut, memory of the full prompt | {common.fmt_diff(common.paired(diffs, [0, 0, 0]))} |" in out
    assert "| MemDLM scope response: cut, memory of the full prompt | +66.7 [-" in out  # answers whole: 2 of 3 seeds
    assert "| MemDLM scope response: cut, memory of the full prompt (RoPE ntk) | +0.0 [+0.0, +0.0] tie |" in out
    # seeds for +-3 points at the spread of the digit-score differences (the t quantile over n - 1)
    sd = common.mean_stderr(diffs)["stderr"] * 3 ** 0.5
    assert f"| MemDLM scope response: cut, memory of the full prompt | {common.seeds_for(sd, 3.0)} |" in out
    assert "| 256: d 1 |" in out
    with pytest.raises(SystemExit, match="no reach.json under"):
        reach.main([f"--root={tmp_path / 'none'}"])
    # against a run: each row of another run (here one named by no preset) minus the same view of ft_mem
    for seed in (1, 2, 3):
        f = tmp_path / f"s{seed}" / "reach.json"
        res = json.loads(f.read_text())
        res["rows"] += [dict(r, out_dir=f"r/s{seed}/out-niah-tiny", samples=[dict(x, output="x", score=0.0)
                                                                           for x in r["samples"]]) for r in res["rows"]]
        f.write_text(json.dumps(res))
    reach.main([f"--root={tmp_path}", "--against=ft_mem"])
    out = capsys.readouterr().out
    assert f"| out-niah-tiny: cut, memory of the full prompt | {common.fmt_diff(common.paired([0, 0, 0], diffs))} |" \
        not in out  # hidden minus hidden, not minus the control
    hidden = [100.0, 100 * halves, 100.0]
    assert f"| out-niah-tiny: cut, memory of the full prompt | {common.fmt_diff(common.paired([0, 0, 0], hidden))} |" in out
    reach.main([f"--root={tmp_path}"])  # no ft_mdlm evaluated: the means alone, no differences
    out = capsys.readouterr().out
    assert "| out-niah-tiny: cut, memory of the full prompt | 0.0 ± 0.0 |" in out and "tie" not in out
    assert "(no differences: no row has its reference, Standard MDLM, in reach.json; --against picks another)" in out
    assert "minus Standard MDLM" not in out  # no empty tables
    with pytest.raises(SystemExit, match="--against=ft_none: use standard, a view"):
        reach.main([f"--root={tmp_path}", "--against=ft_none"])
    with pytest.raises(SystemExit, match="a file name .* no path"):
        reach.main([f"--root={tmp_path}", "--pattern=../s1/reach.json"])
    (tmp_path / "s1" / "reach.json").write_text('{"rows": [')
    with pytest.raises(SystemExit, match="not a results file of python -m experiments.niah_eval"):
        reach.main([f"--root={tmp_path}"])


def test_niah_eval_ends_in_one_line_on_ctrl_c_or_a_directory_as_results_file(tmp_path, monkeypatch):
    import train
    out = str(tmp_path / "m")
    train.main(["--config", "niah_tiny", f"--out_dir={out}", "--max_iters=1", "--niah_tasks=single"])
    argv = [f"--out_dir={out}", "--tasks=single", "--lengths=200", "--n=1", "--device=cpu"]
    with pytest.raises(SystemExit, match=r"r is a directory: give a file name in it"):
        (tmp_path / "r").mkdir()
        niah_eval.main(argv + [f"--json={tmp_path / 'r'}", "--overwrite"])
    (tmp_path / "old.json").write_text("earlier results")

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(niah_eval, "decode_row", interrupted)
    with pytest.raises(SystemExit, match=r"^interrupted: no results written") as e:
        niah_eval.main(argv + [f"--json={tmp_path / 'old.json'}", "--overwrite"])
    assert "\n" not in str(e.value) and (tmp_path / "old.json").read_text() == "earlier results"
    for bad, msg in (("--answer_len=0", "--answer_len=0: must be a positive integer"),
                     ("--steps=0", "--steps=0: must be a positive integer"),
                     ("--adapt_lr=inf", "--adapt_lr=inf: must be a finite number")):
        with pytest.raises(SystemExit, match=msg):  # refused, not read as "the default"
            niah_eval.main(argv + [bad])
