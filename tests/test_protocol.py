"""Tests of protocol.py (paired intervals, ties, skipping finished runs, scheduling, tables),
exposure.py (the exposure-bias ratio) and niah.py's surface forms. CPU, tiny, seconds."""
import json
import math
import os
import re
import sys
import time
from types import SimpleNamespace

import pytest
import torch

import niah
from experiments import common, exposure, niah_eval, protocol
import train
from data.tokenizer import decode
from memory import MemoryConfig, adapt
from model import DiffusionLM, ModelConfig

ENC = niah.byte_encoding()


# ---- statistics -------------------------------------------------------------------------

def test_paired_interval_by_hand():
    d = common.paired([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])  # differences 1, 2, 3: mean 2, sd 1
    half = 4.302653 / math.sqrt(3)  # t(0.975, 2) x sd / sqrt(n)
    assert d["mean"] == pytest.approx(2) and d["stderr"] == pytest.approx(1 / math.sqrt(3))
    assert (d["lo"], d["hi"]) == (pytest.approx(2 - half, abs=1e-3), pytest.approx(2 + half, abs=1e-3))
    assert d["tie"] and common.fmt_diff(d) == "+2.0 [-0.5, +4.5] tie"  # 3 seeds: t = 4.30
    # paired: a common per-seed shift cancels
    assert common.paired([11.0, 52.0, 93.0], [10.0, 50.0, 90.0])["mean"] == pytest.approx(2)
    # beyond the table: within 1e-3 of the exact quantiles (40: 2.0211, 120: 1.9799)
    assert common.t975(40) == pytest.approx(2.0211, abs=1e-3) and common.t975(120) == pytest.approx(1.9799, abs=1e-3)
    # seeds for +-3 at sd 5: n = 13 gives 2.179 x 5 / sqrt(13) = 3.02, n = 14 gives 2.160 x 5 / sqrt(14) = 2.89
    assert common.seeds_for(5.0, 3.0) == 14 and common.seeds_for(0.0, 3.0) == 2


def test_tie_marking():
    tie = common.paired([1.0, -1.0, 2.0], [0.0, 0.0, 0.0])
    assert tie["lo"] < 0 < tie["hi"] and tie["tie"] and common.fmt_diff(tie).endswith(" tie")
    worse = common.paired([0.0, 0.0, 0.0, 0.0], [3.0, 4.0, 3.5, 4.5])
    assert worse["hi"] < 0 and not worse["tie"] and "tie" not in common.fmt_diff(worse)
    one = common.paired([5.0], [1.0])
    assert one["tie"] is None and common.fmt_diff(one) == "+4.0 (n=1)"


# ---- skipping, resuming, scheduling -------------------------------------------------------

def fake_ckpt(out_dir, step, max_iters):
    os.makedirs(out_dir, exist_ok=True)
    torch.save({"model": {}, "model_args": {}, "step": step, "config": {"max_iters": max_iters, "block_size": 256, "niah_tasks": "single"}},
               os.path.join(out_dir, "ckpt.pt"))


def args(root, **kw):
    return SimpleNamespace(**{**dict(root=str(root), seeds=[1], config="niah", base_iters=None, ft_iters=10,
                                     forms="train,heldout", stages=list(protocol.STAGES), tasks=None, lengths=None,
                                     n=5, eval_batch=5, exposure_n=4, repeat=[]), **kw})


def test_finished_runs_are_skipped_and_interrupted_ones_resume(tmp_path):
    s = tmp_path / "s1"
    fake_ckpt(s / "base", 40, 40)      # finished
    fake_ckpt(s / "ft_mdlm", 5, 10)    # interrupted
    fake_ckpt(s / "scratch", 40, 40)   # finished, but a longer base is asked for below
    for r in ("ft_mem", "ft_prompt"):
        fake_ckpt(s / r, 10, 10)
    time.sleep(0.01)
    (s / "niah_scratch_train.json").write_text("{}")  # newer than the checkpoint: done
    jobs = {j.name: j for j in protocol.plan(args(tmp_path), ["--lr=1e-3"])}
    state = protocol.initial_state(jobs.values())
    assert [n for n, v in state.items() if v == "skipped"] == ["s1/base", "s1/ft_mem", "s1/ft_prompt", "s1/scratch",
                                                               "s1/niah_scratch_train"]
    ft = jobs["s1/ft_mdlm"].argv()
    assert ft[-1] == "--resume=True" and "--lr=1e-3" in ft and "--max_iters=10" in ft and "--mem=False" in ft
    # an interrupted fine-tune continues its own run: train.py refuses --init_from with --resume
    assert not any(x.startswith("--init_from=") for x in ft) and jobs["s1/ft_mdlm"].note() == "resumes at step 5"
    assert train.parse_config(ft[2:])["resume"]
    new_ft = {j.name: j for j in protocol.plan(args(tmp_path, seeds=[2]), [])}["s2/ft_mem"].argv()
    assert f"--init_from={tmp_path / 's2' / 'base'}" in new_ft and "--resume=True" not in new_ft
    ev = jobs["s1/niah_ft_heldout"].argv()
    assert "--forms=heldout" in ev and "--tasks=single" in ev and "--lengths=256,512" in ev
    assert ev[ev.index("--out_dir") + 1:ev.index("--out_dir") + 5] == [str(s / r) for r in protocol.EVALS["ft"]]
    # a newer checkpoint makes its evaluation stale; more base steps make the base resume
    (s / "niah_ft_train.json").write_text("{}")
    assert jobs["s1/niah_ft_train"].done()
    later = os.path.getmtime(s / "niah_ft_train.json") + 1
    os.utime(s / "ft_mem" / "ckpt.pt", (later, later))
    assert not jobs["s1/niah_ft_train"].done()
    # ... and its rerun replaces the stale results (niah_eval and exposure refuse an existing file without it)
    from experiments import niah_eval
    assert niah_eval.parse(jobs["s1/niah_ft_train"].argv()[3:]).overwrite and "--overwrite" in jobs["s1/exposure"].argv()
    longer = {j.name: j for j in protocol.plan(args(tmp_path, base_iters=80), [])}
    assert not longer["s1/base"].done() and longer["s1/base"].argv()[-2:] == ["--max_iters=80", "--resume=True"]
    fresh = {j.name: j for j in protocol.plan(args(tmp_path, seeds=[2]), [])}["s2/base"].argv()
    assert "--resume=True" not in fresh and "--seed=2" in fresh and f"--out_dir={tmp_path / 's2' / 'base'}" in fresh
    assert "--overwrite=True" not in fresh
    (tmp_path / "s4" / "base").mkdir(parents=True)
    (tmp_path / "s4" / "base" / "log.jsonl").write_text('{"step": 5, "loss": 3.0}\n')  # stopped before a checkpoint
    again = {j.name: j for j in protocol.plan(args(tmp_path, seeds=[4]), [])}["s4/base"].argv()
    assert "--overwrite=True" in again and "--resume=True" not in again
    # --repeat: the same base command again, into base_repeat, for the asked seeds only
    repeat = {j.name: j for j in protocol.plan(args(tmp_path, seeds=[2, 3], repeat=[2]), ["--lr=1e-3"])}
    assert "s2/base_repeat" in repeat and "s3/base_repeat" not in repeat
    a, b = repeat["s2/base"].argv(), repeat["s2/base_repeat"].argv()
    assert b == [x.replace(f"{os.sep}base", f"{os.sep}base_repeat") if x.startswith("--out_dir=") else x for x in a]
    # --stages: a job left out blocks what needs it unless its results exist
    only = protocol.plan(args(tmp_path, seeds=[2], stages=["finetune"]), [])
    assert protocol.initial_state(only)["s2/base"] == "excluded"


def test_run_jobs_order_gpus_failures(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()

    def job(name, deps=(), fail=False):
        path = out / name
        code = f"import os, sys; open({str(path)!r}, 'w').write(os.environ.get('CUDA_VISIBLE_DEVICES', '-'))"
        code += "; sys.exit(3)" if fail else ""
        return protocol.Job(name, "base", list(deps), lambda: [sys.executable, "-c", code], path.exists)
    (out / "old").write_text("x")
    jobs = [job("old"), job("a", ["old"]), job("b"), job("bad", fail=True), job("after_bad", ["bad"]),
            job("after_a", ["a", "b"])]
    state = protocol.run_jobs(jobs, ["0", "1"], str(tmp_path / "logs"), poll=0.02)
    assert state == {"old": "skipped", "a": "done", "b": "done", "bad": "failed", "after_bad": "blocked",
                     "after_a": "done"}
    assert "blocked after_bad: needs bad (failed)" in capsys.readouterr().out
    assert (out / "old").read_text() == "x" and not (out / "after_bad").exists()
    assert {(out / n).read_text() for n in ("a", "b")} == {"0", "1"}  # two slots, one job each at first
    assert "import os" in (tmp_path / "logs" / "a.log").read_text()  # the command heads its log
    # a deadline stops what runs and what waits
    slow = protocol.Job("slow", "base", [], lambda: [sys.executable, "-c", "import time; time.sleep(30)"], lambda: False)
    state = protocol.run_jobs([slow, job("next", ["slow"])], [None], str(tmp_path / "logs"), time.time() + 0.5, 0.02)
    assert state == {"slow": "stopped", "next": "stopped"}


def test_bad_arguments(tmp_path):
    with pytest.raises(SystemExit, match="set by the protocol"):
        protocol.main([f"--root={tmp_path}", "--max_iters=5"])
    with pytest.raises(SystemExit, match="unknown stage"):
        protocol.main([f"--root={tmp_path}", "--stages=base,train"])
    with pytest.raises(SystemExit, match="no results"):
        protocol.main([f"--root={tmp_path}", "--table_only"])


@pytest.mark.parametrize("argv, message", [
    (["--seeds=-1"], r"^--seeds: seed -1 is out of range: seeds are integers from 0 to 4294967295$"),
    (["--seeds=4294967296"], r"seed 4294967296 is out of range"),
    (["--seeds=1,2", "--repeat=-3"], r"^--repeat: seed -3 is out of range"),
    (["--seeds=1,2", "--repeat=3"], r"^--repeat: seed 3 is not in --seeds"),
    (["--seeds="], r"^--seeds: give at least one seed"),
    (["--seed=3"], r"^--seed is set by the protocol for each run: use --seeds"),  # not read as --seeds=3
    (["--stage=base"], r"^--stage is not a protocol option \(abbreviations are not read\): write --stages$"),  # not read as --stages=base
    (["--deadline=nan"], r"^--deadline=nan: seconds, a finite number > 0$"),
    (["--deadline=-5"], r"--deadline=-5.0: seconds"),
    (["--forms=train,odd"], r"^--forms: unknown surface forms 'odd'"),
    (["--tasks=single,foo"], r"^--tasks=single,foo: unknown task 'foo'"),
    (["--lengths=256,0"], r"^--lengths=256,0: a comma list of positive integers"),
    (["--exposure_n=0"], r"--exposure_n must be >= 1"),
    (["--gpus=abc"], r"^--gpus=abc: a comma list of GPU ids such as 0,1 \(--gpus= for the CPU\)$"),
    (["--gpus=,"], r"^--gpus=,: a comma list of GPU ids"),
    (["--gpus=0"], r"^--gpus=0 but no CUDA GPU is visible: --gpus= \(empty\) runs the jobs on the CPU$"),
])
def test_bad_seeds_and_settings_stop_before_any_job(tmp_path, monkeypatch, argv, message):
    monkeypatch.setattr(protocol.torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    monkeypatch.setattr(protocol, "run_jobs", lambda *a, **k: pytest.fail("jobs ran"))
    monkeypatch.setattr(protocol, "check_train_args", lambda *a: None)
    with pytest.raises(SystemExit, match=message):
        protocol.main([f"--root={tmp_path / 'r'}", *argv])
    assert not (tmp_path / "r").exists()


def test_a_seed_named_twice_runs_once_with_a_note(tmp_path, monkeypatch, capsys):
    ran = {}
    monkeypatch.setattr(protocol, "check_train_args", lambda *a: None)
    monkeypatch.setattr(protocol, "run_jobs", lambda jobs, *a, **k: ran.update({j.name: j.argv() for j in jobs
                                                                                 if j.wanted}) or {n: "done" for n in ran})
    monkeypatch.setattr(protocol, "gather", lambda root: {})
    protocol.main([f"--root={tmp_path}", "--seeds=3,1,3,1,2", "--repeat=2,2", "--stages=base,repeat", "--gpus="])
    out = capsys.readouterr().out
    assert "note: --seeds names seeds 1, 3 more than once: each runs once (--seeds=3,1,2)" in out
    assert "note: --repeat names seed 2 more than once: each runs once (--repeat=2)" in out
    assert list(ran) == ["s3/base", "s1/base", "s2/base", "s2/base_repeat"]  # once each
    assert "--seed=3" in ran["s3/base"] and "--seed=2" in ran["s2/base_repeat"]


def test_train_settings_are_checked_before_any_job(tmp_path, monkeypatch):
    """A typo in a train.py key fails now, in one line, not in every job hours later."""
    monkeypatch.setattr(protocol, "run_jobs", lambda *a, **k: pytest.fail("jobs ran"))
    with pytest.raises(SystemExit, match=r"^train.py refuses these settings: unknown config key 'n_layers': valid keys"):
        protocol.main([f"--root={tmp_path}", "--config=tiny", "--n_layers=3", "--dry_run"])
    with pytest.raises(SystemExit, match=r"^--config=tiny trains on text \(dataset pydoc\): the protocol trains and "
                                         r"evaluates needle checkpoints; use --config=niah_proto"):
        protocol.main([f"--root={tmp_path}", "--config=tiny", "--dry_run"])


def test_a_root_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("")
    for root in (tmp_path / "f", tmp_path / "f" / "sub"):
        with pytest.raises(SystemExit, match=rf"^--root={root}: {tmp_path / 'f'} is a file, not a directory"):
            protocol.main([f"--root={root}", "--dry_run"])


def test_non_files_in_the_root_are_refused_not_opened(tmp_path):
    """A FIFO (opening it blocks until a writer comes) or a directory where a log, a checkpoint or
    a results file belongs is one line."""
    import signal
    old = signal.signal(signal.SIGALRM, lambda *a: pytest.fail("blocked on a FIFO"))
    signal.alarm(20)
    try:
        for name in ("log.jsonl", "ckpt.pt"):
            run = tmp_path / name.split(".")[0] / "s1" / "base"
            run.mkdir(parents=True)
            os.mkfifo(run / name)
            with pytest.raises(SystemExit, match=rf"{name} is not a regular file \(a directory, FIFO or device\): "
                                                 r"move it out of the protocol's root"):
                protocol.gather(str(run.parent.parent)) if name == "log.jsonl" else protocol.ckpt_info(str(run))
        job = protocol.Job("s1/x", "base", [], lambda: [sys.executable, "-c", ""], lambda: False)
        (tmp_path / "logs").mkdir()
        os.mkfifo(tmp_path / "logs" / "s1_x.log")
        with pytest.raises(SystemExit, match=r"s1_x.log is not a regular file"):
            protocol.run_jobs([job], [None], str(tmp_path / "logs"), poll=0.02)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_damaged_logs_and_results_are_skipped_with_a_note(tmp_path, capsys):
    fake_results(tmp_path, 1, {"base": 90.0, "ft_mdlm": 50.0}, [0.5, 0.95])
    with open(tmp_path / "s1" / "base" / "log.jsonl", "a") as f:
        f.write('{"step": 200, "eval_loss": 0.\n[1]\n{"step": "x", "loss": 1.0}\n')
    (tmp_path / "s1" / "niah_ft_heldout.json").write_text('{"forms": "heldout", "rows": [{"out_dir": 1}]}')
    (tmp_path / "s1" / "niah_scratch_train.json").write_text("not json")
    seeds = protocol.gather(str(tmp_path))
    out = capsys.readouterr().out
    assert re.search(r"note: .*s1/base/log.jsonl: skipped 3 unreadable line\(s\): 5, 6, 7\n", out)
    assert re.search(r"note: .*niah_ft_heldout.json is not a niah_eval results file \(.*\): left out of the tables; "
                     r"delete it and rerun", out) and "niah_scratch_train.json is not a niah_eval results file" in out
    assert seeds["1"]["runs"]["base"]["final_step"] == 50 and set(seeds["1"]["niah"]) == {"train"}


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_ctrl_c_and_sigterm_stop_the_protocol_and_its_jobs_in_one_line(tmp_path, sig):
    import signal
    import subprocess
    pid_file = tmp_path / "job.pid"
    job = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "from experiments import protocol\n"
            "protocol.check_train_args = lambda a, e: None\n"
            f"protocol.plan = lambda a, e: [protocol.Job('s1/base', 'base', [], lambda: [sys.executable, '-c', {job!r}],"
            " lambda: False)]\n"
            "protocol.main(sys.argv[1:])")
    p = subprocess.Popen([sys.executable, "-c", code, f"--root={tmp_path}", "--gpus="], cwd=protocol.ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(getattr(signal, sig))
    _, err = p.communicate(timeout=60)
    assert p.returncode == 1 and "Traceback" not in err, err
    assert err.strip() == ("interrupted; stopped s1/base: what finished is kept, and a stopped training run resumes "
                           "from its last checkpoint: run the same command again to go on")
    with pytest.raises(ProcessLookupError):  # the job was stopped with the protocol
        os.kill(int(pid_file.read_text()), 0)


def test_ctrl_c_while_the_tables_are_written_is_one_line(tmp_path, monkeypatch):
    def interrupted(root):
        raise KeyboardInterrupt
    monkeypatch.setattr(protocol, "gather", interrupted)
    with pytest.raises(SystemExit, match=r"^interrupted: nothing was running; the results on disk are kept"):
        protocol.main([f"--root={tmp_path}", "--table_only"])


# ---- gathering and tables ---------------------------------------------------------------

def fake_results(root, seed, scores, accs):
    """A seed's logs and niah.py results: scores {run+adapt: single-256 score}; accs the base's evals."""
    s = root / f"s{seed}"
    for run in protocol.RUNS:
        (s / run).mkdir(parents=True)
        recs = [{"step": 50 * i, "eval_loss": 1.0 / (i + 1), "eval_answer_acc": acc, "eval_answer_acc_single": acc,
                 "eval_answer_acc_cwe": acc / 2} for i, acc in enumerate(accs)]
        recs += [{"step": 25, "loss": 2.0}, {"summary": {"train_loss": 0.5}}]
        (s / run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    rows = [{"out_dir": str(s / key.split("+")[0]), "adapt": key.endswith("+adapt"),
             "cells": {"single": {"256": {"mean": v / 100}}}} for key, v in scores.items()]
    (s / "niah_ft_train.json").write_text(json.dumps({"forms": "train", "rows": rows}))


def test_gather_and_tables(tmp_path):
    mdlm, mem = [50.0, 60.0, 70.0], [52.0, 63.0, 73.0]     # MemDLM ahead by 2, 3, 3: no tie
    accs = {1: [0.2, 0.5, 0.95, 0.99], 2: [0.2, 0.4, 0.6, 0.8], 3: [0.2, 0.95, 0.96, 0.99]}
    base = {1: 100.0, 2: 100.0, 3: 94.0}
    for i, seed in enumerate((1, 2, 3)):
        fake_results(tmp_path, seed, {"base": base[seed], "ft_mdlm": mdlm[i], "ft_mem": mem[i],
                                      "ft_mem+adapt": mdlm[i] + (-1) ** i}, accs[seed])
    seeds = protocol.gather(str(tmp_path))
    assert list(seeds) == ["1", "2", "3"] and [s["onset"] for s in seeds.values()] == [100, None, 50]
    # the bar: every task >= 95% at the shortest length, onset within 60% of the steps (150 here: by step 90)
    assert [(s["learned"]["tasks"], s["learned"]["onset"]) for s in seeds.values()] == \
        [(True, False), (True, False), (False, True)]
    assert seeds["1"]["runs"]["base"]["task_onsets"] == {"cwe": None, "single": 100}
    assert seeds["1"]["runs"]["base"]["train_loss"] == 0.5 and seeds["1"]["runs"]["base"]["final_step"] == 150
    t = protocol.score_tables(seeds)["train"]
    assert t["columns"] == ["single 256"]
    assert t["rows"]["Standard MDLM"]["single 256"]["mean"] == pytest.approx(60)
    diff = t["diffs"]["MemDLM (Train-Only)"]["single 256"]
    assert diff["mean"] == pytest.approx(8 / 3) and not diff["tie"]
    assert t["diffs"]["MemDLM (Train & Inference)"]["single 256"]["tie"]  # +1, -1, +1
    md = protocol.markdown(seeds, {"train": t}, None)
    assert re.search(r"\| MemDLM \(Train & Inference\) \| [+-]\d\.\d \[.*\] tie \|", md)
    assert "| 2 | none (cwe none, single none) |" in md and "| 1 | 100 (cwe none, single 100) |" in md
    assert "| Standard MDLM (n=3) | 60.0 ± 5.8 |" in md
    assert "onset within 60% of its steps. Met by 0 of 3 seeds." in md and "| 3 | single 94.0 | no | yes |" in md
    assert ("Run-to-run spread, seed 2 (the base twice, one command): onset none (cwe none, single none) vs none "
            "(cwe none, single none); eval loss 0.250 vs 0.250; answer accuracy 0.800 vs 0.800.") in md


def test_from_scratch_is_paired_with_the_base(tmp_path):
    # MemDLM from scratch against the MDLM base of the same seed (the same steps), not a fine-tune
    onsets = {1: ((100, 50), (50, 50)), 2: ((None, 100), (100, 50)), 3: ((150, 100), (100, 100))}  # base, scratch
    for seed, runs in onsets.items():
        for run, (pooled, single) in zip(("base", "scratch"), runs):
            d = tmp_path / f"s{seed}" / run
            d.mkdir(parents=True)
            hit = lambda on, step: 0.95 if on is not None and step >= on else 0.5
            recs = [{"step": st, "eval_loss": 0.3 + 0.1 * seed + (0.05 if run == "scratch" else 0),
                     **({"eval_loss_mem": 0.2 + 0.1 * seed} if run == "scratch" else {}),
                     "eval_answer_acc": hit(pooled, st), "eval_answer_acc_single": hit(single, st)} for st in (0, 50, 100, 150)]
            (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        rows = [{"out_dir": str(tmp_path / f"s{seed}" / run), "adapt": False, "cells": {"single": {"256": {"mean": v}}}}
                for run, v in (("base", 0.5), ("ft_mdlm", 0.9), ("scratch", 0.5 + 0.1 * seed))]
        (tmp_path / f"s{seed}" / "niah_ft_train.json").write_text(json.dumps({"forms": "train", "rows": rows}))
    seeds = protocol.gather(str(tmp_path))
    d = protocol.score_tables(seeds)["train"]["diffs"]["MemDLM from scratch (Train-Only)"]["single 256"]
    assert d["mean"] == pytest.approx(20) and d["n"] == 3  # +10, +20, +30 over the base (-20 against ft_mdlm)
    fs = protocol.from_scratch(seeds)
    assert fs["onset"]["n"] == 2 and fs["onset"]["mean"] == pytest.approx(-50)       # seed 2's base never crosses
    assert fs["onset_single"]["n"] == 3 and fs["onset_single"]["mean"] == pytest.approx(-50 / 3)  # 0, -50, 0
    assert fs["eval_loss"]["mean"] == pytest.approx(0.05) and fs["eval_loss_mem"]["mean"] == pytest.approx(-0.1)
    assert fs["eval_loss_mem"]["hi"] < 0 and not fs["eval_loss_mem"]["tie"]
    md = protocol.markdown(seeds, {}, None)
    assert "| 2 | none (single 100) | 100 (single 50) | 0.500 | 0.550 (0.400) | 0.500 | 0.950 |" in md
    assert "onset step -50 [-50, -50] over 2 seeds; onset step of single -17 [-88, +55] tie over 3 seeds" in md
    assert "eval loss, MemDLM with memory -0.1000 [-0.1000, -0.1000];" in md


def test_finetune_losses_are_paired_with_standard_mdlm(tmp_path):
    # per seed: ft_mdlm's eval loss; the memory fine-tunes' base-alone and with-memory losses
    losses = {1: {"ft_mdlm": (0.30,), "ft_mem": (0.31, 0.28), "ft_prompt": (0.30, 0.30)},
              2: {"ft_mdlm": (0.40,), "ft_mem": (0.41, 0.37), "ft_prompt": (0.40, 0.41)},
              3: {"ft_mdlm": (0.50,), "ft_mem": (0.50, 0.49)}}                    # no ft_prompt in seed 3
    for seed, runs in losses.items():
        for run, (alone, *mem) in runs.items():
            d = tmp_path / f"s{seed}" / run
            d.mkdir(parents=True)
            rec = {"step": 1000, "eval_loss": alone, **({"eval_loss_mem": mem[0]} if mem else {})}
            (d / "log.jsonl").write_text(json.dumps(rec) + "\n")
    ft = protocol.finetune_losses(protocol.gather(str(tmp_path)))
    assert set(ft) == {"ft_mem", "ft_prompt"}
    mem = ft["ft_mem"]
    assert mem["eval_loss"]["mean"] == pytest.approx(0.02 / 3) and mem["eval_loss"]["n"] == 3
    # -0.02, -0.03, -0.01: sd 0.01, half width t(2) 4.303 x 0.01 / sqrt(3)
    assert mem["eval_loss_mem"]["mean"] == pytest.approx(-0.02)
    assert mem["eval_loss_mem"]["hi"] == pytest.approx(-0.02 + 4.303 * 0.01 / 3 ** 0.5, abs=1e-4)
    assert mem["eval_loss_mem"]["tie"] and mem["below"] == 3
    assert ft["ft_prompt"]["eval_loss_mem"]["n"] == 2 and ft["ft_prompt"]["below"] == 0   # 0.30 = 0.30, 0.41 > 0.40
    md = protocol.markdown(protocol.gather(str(tmp_path)), {}, None)
    assert "| MemDLM scope response | +0.0067 [-0.0077, +0.0210] tie | -0.0200 [-0.0448, +0.0048] tie | 3 of 3 |" in md


# ---- surface forms ----------------------------------------------------------------------

def held_out_fragments():
    """Text that only held-out forms write: the parts of their templates and verbs that no
    training template holds, and the held-out words and names."""
    h, t = niah.surface("heldout"), niah.surface("train")
    train_text = " ".join(x for tpl in t.needles + t.assignments for x in tpl) + " ".join(t.cwe + t.babi + t.verbs)
    parts = {p for x in [x for tpl in h.needles + h.assignments for x in tpl] + list(h.cwe + h.babi + h.verbs)
             for p in re.split(r"\{\w\}", x) if len(p.strip()) > 2 and p not in train_text}
    assert len(parts) >= 8
    return parts, set(h.words) | set(h.names)


def test_held_out_forms_never_in_training_rows():
    parts, words = held_out_fragments()
    cfg = dict(niah.NIAH_DEFAULTS, niah_tasks="all", niah_forms="train", block_size=320, batch_size=48, seed=5,
               tokenizer="byte")
    data = niah.NiahData(cfg, "cpu")
    seen = set()
    for step in range(4):
        x, _, key_pad = data.batch("train", torch.Generator().manual_seed(step))
        for row, pad in zip(x, key_pad):
            text = decode(ENC, row[~pad].tolist())
            assert not [p for p in parts if p in text] and not words & set(re.findall(r"\w+", text))
            seen |= set(re.findall(r"\w+", text))
    assert len(seen & set(niah.surface("train").words)) > 100  # the wider vocabulary is used
    # and an evaluation with forms="heldout" sees them in every row
    for i, task in enumerate(niah.TASKS * 3):
        ex = niah.make_example(task, 300, 50, i, ENC, "noise", 32, "heldout")
        text = decode(ENC, ex["prompt"])
        assert [p for p in parts if p in text] or words & set(re.findall(r"\w+", text))
        assert all(a in text.rsplit("\n", 1)[0] for a in ex["answers"] if task != "cwe")  # the facts hold the answers


def test_answers_fit_their_bound():
    for forms in niah.FORMS:
        for task in niah.TASKS:
            bound = niah.max_answer_len(task, forms)
            longest = max(len(ENC.encode_ordinary(niah.make_example(task, 400, 50, i, ENC, "noise", 0, forms)["target"]))
                          for i in range(30))
            assert longest <= bound and (task == "cwe" or longest >= bound - 3)
    assert niah.max_answer_len("multivalue", "train") == 29 and niah.max_answer_len("single", "fixed") == 8
    cfg = dict(niah.NIAH_DEFAULTS, niah_tasks="single,multivalue", niah_forms="train", niah_answer_len=16,
               block_size=256, batch_size=2, seed=0, tokenizer="byte")
    with pytest.raises(SystemExit, match="multivalue take up to 30 tokens.*niah_answer_len >= 30"):
        niah.NiahData(cfg, "cpu")
    with pytest.raises(SystemExit, match="unknown forms 'odd'"):
        niah.NiahData({**cfg, "niah_forms": "odd"}, "cpu")


def test_a_length_near_the_minimum_draws_again():
    """Varied templates and keys vary the room the facts need: an example that cannot fit a
    fixed length is drawn again rather than failing an evaluation (multivalue at 230 tokens
    fits about half the draws; the longest need 258)."""
    fits = 0
    for i in range(20):
        ex = niah.make_example("multivalue", 230, 50, i, ENC, "noise", 32, "train")
        assert len(ex["prompt"]) == 230 - 32
        fits += ex == niah.make_example("multivalue", (230, 230), 50, i, ENC, "noise", 32, "train")
    assert fits == 20
    with pytest.raises(ValueError, match="too short"):
        niah.make_example("multivalue", 150, 50, 0, ENC, "noise", 32, "train")


def test_no_word_is_part_of_another():
    """Scoring finds answers as substrings: a word inside another would score a wrong cwe answer."""
    words = niah.surface("all").words
    assert not [(a, b) for a in words for b in words if a != b and a in b]


# ---- exposure-bias ratio ----------------------------------------------------------------

def tiny_rows(B=3, P=12, A=6):
    torch.manual_seed(0)
    model = DiffusionLM(ModelConfig(n_layer=2, n_head=2, n_embd=32)).eval()
    x0 = torch.randint(0, 256, (B, P + A), generator=torch.Generator().manual_seed(1))
    maskable = torch.zeros_like(x0, dtype=torch.bool)
    maskable[:, P:] = True
    return model, x0, maskable


def test_exposure_ratio_on_a_tiny_model():
    model, x0, maskable = tiny_rows()
    static, seq, decoded = exposure.curves(model, x0, maskable, generator=torch.Generator().manual_seed(0))
    assert static.shape == seq.shape == (6,) and torch.isfinite(static).all() and torch.isfinite(seq).all()
    assert static[0] == seq[0]  # nothing decoded yet: the same fully masked response
    assert not torch.equal(static[1:], seq[1:])
    # the decoding is the sampler's: greedy low-confidence, one token per step
    from sample import generate
    want, _ = generate(model, x0[:, :12].tolist(), gen_len=6, steps=6, temperature=0.0)
    assert torch.equal(decoded, want)
    # with fast weights written from the prompt (Train & Inference), the ratio still starts at 1
    mcfg = MemoryConfig(rank=4)
    fast, _ = adapt(model, x0, mcfg, key_pad=maskable, generator=torch.Generator().manual_seed(0))
    s2, q2, _ = exposure.curves(model, x0, maskable, None, fast, torch.Generator().manual_seed(0))
    assert torch.isfinite(s2).all() and s2[0] == q2[0] and not torch.equal(s2, static)


def test_exposure_summary_and_table(tmp_path):
    runs = [dict(t=[1.0, 0.5], rows=[dict(kind="Standard MDLM", token_acc=0.5, static=[2.0, 1.0], seq=[2.0, r],
                                          ratio=[1.0, r]) for r in (1.5,)]) for _ in range(1)]
    runs.append(dict(t=[1.0, 0.5], rows=[dict(kind="Standard MDLM", token_acc=0.7, static=[2.0, 1.0], seq=[2.0, 2.5],
                                              ratio=[1.0, 2.5])]))
    t, kinds = exposure.summary(runs)
    s = kinds["Standard MDLM"]
    assert s["n"] == 2 and s["ratio"] == [1.0, 2.0] and s["ratio_se"][1] == pytest.approx(0.5)
    assert s["token_acc"] == pytest.approx(0.6)
    assert "| Standard MDLM (n=2) | 1.00 ± 0.00 | 2.00 ± 0.50 | 1.50 | 0.600 |" in exposure.table(t, kinds)
    with pytest.raises(SystemExit, match="different answer windows"):
        exposure.summary(runs + [dict(t=[1.0], rows=[])])
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"kinds": {}}))
    with pytest.raises(SystemExit, match="not a measurement"):
        exposure.main(["--summary", str(bad)])
    with pytest.raises(SystemExit, match="^--summary names a file twice: give each measurement once$"):
        exposure.main(["--summary", str(bad), str(tmp_path / "." / "x.json")])


def test_tiny_checkpoints_end_to_end(tmp_path, monkeypatch):
    """niah.py --forms and exposure.py on real (tiny, one-step) checkpoints."""
    import train
    mdlm, mem = str(tmp_path / "mdlm"), str(tmp_path / "mem")
    for d, flag in ((mdlm, "False"), (mem, "True")):
        train.main(["--config", "niah_tiny", f"--out_dir={d}", "--max_iters=1", f"--mem={flag}"])
    niah_eval.main([f"--out_dir={mdlm}", "--tasks=single", "--lengths=256", "--n=2", "--forms=heldout", "--adapt=off",
               "--device=cpu", f"--json={tmp_path / 'n.json'}"])
    assert json.loads((tmp_path / "n.json").read_text())["forms"] == "heldout"
    exposure.main(["--out_dir", mdlm, mem, "--n=3", "--batch_size=2", "--device=cpu", f"--json={tmp_path / 'e.json'}",
                   f"--md={tmp_path / 'e.md'}"])
    res = json.loads((tmp_path / "e.json").read_text())
    assert [r["kind"] for r in res["rows"]] == ["Standard MDLM", "MemDLM (Train-Only)", "MemDLM (Train & Inference)"]
    assert res["answer_len"] == 32 and len(res["t"]) == 32 and res["t"][0] == 1.0
    for r in res["rows"]:
        assert r["ratio"][0] == 1.0 and all(math.isfinite(v) for v in r["ratio"]) and 0 <= r["token_acc"] <= 1
    assert res["rows"][1]["seq"] != res["rows"][2]["seq"]  # the memory changes the decoding's losses
    assert "| MemDLM (Train & Inference) (n=1) | 1.00 ± 0.00 |" in (tmp_path / "e.md").read_text()
    for r in res["rows"]:  # Eq. 3-4: R_EB = L_seq / L_static, step by step
        assert r["ratio"] == pytest.approx([q / s for q, s in zip(r["seq"], r["static"])], rel=1e-12)
    # the ratio's direction, on losses set by hand: decoding from its own tokens (L_seq = 3) worse than
    # from the ground truth (L_static = 2) is a ratio above 1
    A = res["answer_len"]
    monkeypatch.setattr(exposure, "curves", lambda model, x, *a: (torch.full((A,), 2.0), torch.full((A,), 3.0),
                                                                  x[:, :A]))
    exposure.main(["--out_dir", mdlm, "--n=2", "--device=cpu", f"--json={tmp_path / 'h.json'}"])
    assert json.loads((tmp_path / "h.json").read_text())["rows"][0]["ratio"] == [1.5] * A


def test_exposure_checks_its_outputs_before_measuring(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(exposure, "measure", lambda *a, **k: pytest.fail("measured"))
    (tmp_path / "ckpt.pt").write_bytes(b"")  # never loaded: every case stops before
    (tmp_path / "adir").mkdir()
    base = ["--out_dir", str(tmp_path), "--device=cpu"]
    (tmp_path / "log.jsonl").write_text("{}\n")
    (tmp_path / "t.md").write_text("an earlier table")
    for extra, message in ((f"--json={tmp_path / 'adir'}", r"^--json=.*adir is a directory: give a file name in it"),
                           (f"--json={tmp_path / 'ckpt.pt'}", r"ckpt.pt is a training run's file \(checkpoint or log\)"),
                           (f"--md={tmp_path / 'log.jsonl'}", r"log.jsonl is a training run's file"),
                           (f"--md={tmp_path / 't.md'}", r"t.md exists: choose another --md file, or pass --overwrite"),
                           (f"--md={tmp_path / 'no' / 't.md'}", r"^--md=.*the directory .*no does not exist"),
                           ("--png=/proc/x.png", r"^--png=/proc/x.png cannot be written")):
        with pytest.raises(SystemExit, match=message):
            exposure.main(base + [extra])
    with pytest.raises(SystemExit, match=r"ckpt.pt is a training run's file"):  # not even with --overwrite
        exposure.main(base + [f"--json={tmp_path / 'ckpt.pt'}", "--overwrite"])
    with pytest.raises(pytest.fail.Exception, match="measured"):  # --overwrite lets it go on
        exposure.main(base + [f"--md={tmp_path / 't.md'}", f"--json={tmp_path / 'new.json'}", "--overwrite"])
    assert (tmp_path / "t.md").read_text() == "an earlier table" and (tmp_path / "log.jsonl").read_text() == "{}\n"
    with pytest.raises(SystemExit, match=r"^no checkpoint at .*missing/ckpt.pt: train one first"):
        exposure.main(["--out_dir", str(tmp_path / "missing")])
    with pytest.raises(SystemExit):  # allow_abbrev=False: --se is not --seed
        exposure.main(base + ["--se=1"])
    assert "unrecognized arguments: --se=1" in capsys.readouterr().err
    os.mkfifo(tmp_path / "fifo.json")
    with pytest.raises(SystemExit, match=r"fifo.json is not a file: give the files --out_dir wrote"):
        exposure.main(["--summary", str(tmp_path / "fifo.json")])
    (tmp_path / "part.json").write_text(json.dumps({"t": [1.0], "rows": [{"kind": "x"}]}))
    with pytest.raises(SystemExit, match=r"part.json is not a measurement"):
        exposure.main(["--summary", str(tmp_path / "part.json")])


def test_exposure_ctrl_c_is_one_line(tmp_path, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(exposure, "measure", interrupted)
    (tmp_path / "ckpt.pt").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"^interrupted; a file already written is whole .*: run the command again$"):
        exposure.main(["--out_dir", str(tmp_path), "--device=cpu"])
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temp, no partial results
