"""Nothing lost, nothing run: checkpoints, bad input, interrupted and diverging runs. CPU, tiny runs."""
import contextlib
import errno
import glob
import hashlib
import importlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from experiments import bench, niah_eval, protocol
import sample
import train
from model import load_model, read_checkpoint, read_log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny models gain nothing from more threads, and on a busy machine they slow each step many times over
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run(out_dir, *args):
    train.main(["--config", "tiny", f"--out_dir={out_dir}", "--eval_iters=1", *args])


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def strict_log(path):
    """log.jsonl as standard JSON: a bare NaN or Infinity fails."""
    def refuse(token):
        raise AssertionError(f"non-standard JSON constant {token} in {path}")
    with open(path) as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A good run: checkpoint at step 10, log lines every 5 steps."""
    d = tmp_path_factory.mktemp("base") / "run"
    run(d, "--max_iters=10", "--eval_interval=10", "--log_interval=5")
    return d


@pytest.fixture
def copy(base, tmp_path):
    return shutil.copytree(base, tmp_path / "run")


# ---- 1. loading a checkpoint runs no code ------------------------------------------------

class Marker:
    """Unpickling this calls open(path, "w"): the file appears if the pickle's code runs."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_whose_pickle_calls_a_function_is_refused_and_never_runs(base, tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil"
    evil.mkdir()
    good = torch.load(base / "ckpt.pt", weights_only=True)
    torch.save({**good, "model": Marker(str(marker))}, evil / "ckpt.pt")
    for call in (lambda: load_model(str(evil)),  # sample.py, niah.py, bench.py
                 lambda: sample.main([f"--out_dir={evil}", "--device=cpu"]),
                 lambda: run(evil, "--resume=True", "--max_iters=12"),
                 lambda: run(tmp_path / "new", f"--init_from={evil}", "--max_iters=1"),
                 lambda: protocol.ckpt_info(str(evil))):  # protocol.py reads every run's checkpoint
        with pytest.raises(SystemExit, match=r"was not loaded: .*Unsupported global.*could run code"):
            call()
    assert not marker.exists()
    torch.load(evil / "ckpt.pt", weights_only=False)  # the file is armed: an unsafe load runs it
    assert marker.exists()


def test_what_train_saves_is_tensors_and_plain_values(base):
    ckpt = read_checkpoint(str(base / "ckpt.pt"))  # weights_only=True
    assert ckpt["step"] == 10 and set(ckpt) == {"model", "optimizer", "config", "model_args", "step", "wall_s"}
    assert isinstance(ckpt["wall_s"], float) and ckpt["wall_s"] > 0
    plain = (str, int, float, bool, type(None))
    assert all(isinstance(v, plain) for v in ckpt["config"].values())
    assert all(isinstance(v, plain) for v in ckpt["model_args"].values())


# ---- 2. a non-finite loss stops training ------------------------------------------------

@pytest.mark.parametrize("args", [["--lr=1e6"], ["--mem_lr=1e6"], ["--lr=1e6", "--log_interval=100"]])
def test_a_diverging_resume_stops_in_one_line_and_keeps_the_good_checkpoint(copy, args):
    before = digest(copy / "ckpt.pt")
    with pytest.raises(SystemExit, match=r"^step \d+: \S.* is (nan|inf|-inf): training stopped, the checkpoint of "
                                         r"step 10 is unchanged; lower --lr or --mem_lr, then continue with "
                                         r"--resume=True$"):
        run(copy, "--resume=True", "--max_iters=40", "--eval_interval=10", *args)
    assert digest(copy / "ckpt.pt") == before
    log = strict_log(copy / "log.jsonl")
    assert any(None in r.values() for r in log)  # the non-finite values are written as null


def _poisoned_step(monkeypatch, at, what):
    """train_step as it is, but at step `at` an inner loss turns NaN, or a weight does."""
    real, calls = train.train_step, []

    def step(nets, *a):
        loss, inner = real(nets, *a)
        calls.append(1)
        if len(calls) == at and what == "inner":
            inner = [inner[0], torch.full_like(inner[1], float("nan"))]
        if len(calls) == at and what == "weight":
            with torch.no_grad():
                nets.raw.lm_head.weight[0, 0] = float("inf")
        return loss, inner
    monkeypatch.setattr(train, "train_step", step)


def test_a_non_finite_inner_loss_stops_at_its_log_step(tmp_path, monkeypatch):
    _poisoned_step(monkeypatch, 10, "inner")
    with pytest.raises(SystemExit, match=r"^step 10: inner_loss_2 is nan: .* no checkpoint was written"):
        run(tmp_path, "--max_iters=30", "--eval_interval=20", "--log_interval=5")
    assert not (tmp_path / "ckpt.pt").exists()


def test_a_non_finite_model_is_never_saved(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "evaluate", lambda *a: {"eval_loss": 1.0})  # blind to the bad weight
    _poisoned_step(monkeypatch, 7, "weight")
    with pytest.raises(SystemExit, match=r"^step 10: the largest \|weight\| is (inf|nan)"):
        run(tmp_path, "--max_iters=30", "--eval_interval=10", "--log_interval=100")
    assert not (tmp_path / "ckpt.pt").exists()


def test_max_abs_weight_sees_one_bad_weight():
    m = torch.nn.Linear(3, 3)
    assert math.isfinite(train.max_abs_weight(m))
    for bad in (float("nan"), float("inf")):
        with torch.no_grad():
            m.bias[1] = bad
        assert not math.isfinite(train.max_abs_weight(m))


def test_log_lines_are_standard_json():
    line = train.json_line({"step": 3, "loss": float("nan"), "summary": {"x": float("inf"), "y": 1.5}})
    assert json.loads(line) == {"step": 3, "loss": None, "summary": {"x": None, "y": 1.5}}


def test_adapt_with_a_non_finite_inner_loss_says_so(base, capsys):
    with pytest.raises(SystemExit, match=r"^--adapt: the inner loss of step \d is not finite .* lower --adapt_lr"):
        sample.main([f"--out_dir={base}", "--prompt=Hello", "--gen_len=4", "--adapt", "--adapt_lr=1e30",
                     "--device=cpu"])
    assert "sample 1/1" not in capsys.readouterr().out


# ---- 3. a run never overwrites another ---------------------------------------------------

def test_a_new_run_into_a_trained_out_dir_is_refused_unless_overwrite(copy):
    before = digest(copy / "ckpt.pt")
    with pytest.raises(SystemExit, match=r"ckpt.pt exists.*--resume=True.*another --out_dir.*--overwrite=True"):
        run(copy, "--max_iters=2")
    assert digest(copy / "ckpt.pt") == before
    run(copy, "--max_iters=3", "--eval_interval=100", "--log_interval=1", "--overwrite=True")
    log = strict_log(copy / "log.jsonl")  # replaced: this run's lines only
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3] and read_checkpoint(str(copy / "ckpt.pt"))["step"] == 3


# ---- 4. the final checkpoint comes first; a damaged log line is skipped --------------------

def test_the_final_checkpoint_is_written_before_the_summary(tmp_path, monkeypatch):
    def broken(*a):
        raise RuntimeError("summary failed")
    monkeypatch.setattr(train, "summarize", broken)
    with pytest.raises(RuntimeError, match="summary failed"):
        run(tmp_path, "--max_iters=4", "--eval_interval=100")
    assert read_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 4


def test_a_damaged_log_line_is_skipped_and_reported(copy, capsys):
    with open(copy / "log.jsonl", "a") as f:
        f.write('{"step": 11, "loss": 2.\n\x00\x00garbage\n[1, 2]\n')
    run(copy, "--resume=True", "--max_iters=20", "--eval_interval=10", "--log_interval=5")
    out = capsys.readouterr().out
    assert re.search(r"note: .*log.jsonl: skipped 3 unreadable line\(s\): \d+, \d+, \d+\n", out)
    summary = [r for r in read_log(copy / "log.jsonl") if "summary" in r][-1]["summary"]
    assert math.isfinite(summary["train_loss"]) and read_checkpoint(str(copy / "ckpt.pt"))["step"] == 20


# ---- 5. checkpoint writes -----------------------------------------------------------------

def test_a_checkpoint_is_fsynced_under_a_name_of_this_process_then_renamed(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    for stale in ("ckpt.pt.tmp", "ckpt.pt.tmp1"):  # a crashed run's leftovers
        (tmp_path / stale).write_bytes(b"partial")
    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", os.path.basename(a)))
                        or real_replace(a, b))
    train.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    assert events[:2] == [("fsync", False), ("replace", f"ckpt.pt.tmp{os.getpid()}")]
    if sys.platform == "linux":  # the directory too, so the rename survives a power cut
        assert events[2] == ("fsync", True)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"] and torch.load(path, weights_only=True)["step"] == 1


@pytest.mark.parametrize("failure", ["disk full", "ctrl-c"])
def test_a_failed_write_keeps_the_old_checkpoint_and_removes_the_temp(tmp_path, monkeypatch, failure):
    path = str(tmp_path / "ckpt.pt")
    train.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    real_open = open

    class FillsUp:  # the temp file takes a few bytes, then the disk is full (or the user presses Ctrl-C)
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, b):
            self.f.write(bytes(b[:100]))
            raise KeyboardInterrupt if failure == "ctrl-c" else OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(train, "open", lambda p, *a, **k: FillsUp(real_open(p, *a, **k)) if ".tmp" in str(p)
                        else real_open(p, *a, **k), raising=False)
    if failure == "ctrl-c":
        with pytest.raises(KeyboardInterrupt):
            train.save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    else:
        with pytest.raises(SystemExit, match=r"^cannot write .*ckpt.pt \(No space left on device\): the previous "
                                             r"checkpoint is unchanged, continue with --resume=True"):
            train.save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    assert os.listdir(tmp_path) == ["ckpt.pt"] and torch.load(path, weights_only=True)["step"] == 1


# ---- 6. Ctrl-C ----------------------------------------------------------------------------

def test_ctrl_c_names_the_steps_and_the_exact_command_that_resumes(tmp_path, monkeypatch):
    args = ["--config", "tiny", f"--out_dir={tmp_path / 'b'}", "--eval_iters=1", "--max_iters=10",
            "--eval_interval=5", "--log_interval=5"]
    real, calls = train.train_step, []

    def interrupted(*a):
        calls.append(1)
        if len(calls) == 8:  # during step 7
            raise KeyboardInterrupt
        return real(*a)
    monkeypatch.setattr(train, "train_step", interrupted)
    try:
        train.main(args)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped train.main as a KeyboardInterrupt")
    except SystemExit as e:
        msg = str(e)
    monkeypatch.setattr(train, "train_step", real)
    assert re.fullmatch(r"interrupted at step 7; the last checkpoint is step 5 \(.*ckpt.pt\): continue with "
                        r"python train.py .* --resume=True", msg)
    command = shlex.split(msg.split("continue with ")[1])
    assert command[:2] == ["python", "train.py"]
    train.main(command[2:])  # the command it gives continues the run exactly
    train.main(["--config", "tiny", f"--out_dir={tmp_path / 'a'}", *args[3:]])
    final = {d: [r for r in strict_log(tmp_path / d / "log.jsonl") if r.get("step") == 10 and "loss" in r][-1]
             for d in ("a", "b")}
    assert math.isclose(final["a"]["loss"], final["b"]["loss"], rel_tol=1e-6)


@pytest.mark.parametrize("sig, workers", [(signal.SIGINT, 0), (signal.SIGTERM, 0), (signal.SIGTERM, 1)],
                         ids=["ctrl_c", "sigterm", "sigterm_to_the_group_with_a_data_worker"])
def test_ctrl_c_or_sigterm_in_a_real_process_gives_one_line_and_no_traceback(tmp_path, sig, workers):
    # SIGINT restored in the child: a shell may start background jobs ignoring it
    code = ("import signal, sys, train; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "train.main(sys.argv[1:])")
    p = subprocess.Popen([sys.executable, "-c", code, "--config", "tiny", f"--out_dir={tmp_path}", "--eval_iters=1",
                          "--max_iters=100000", "--eval_interval=2", "--log_interval=1000", f"--data_workers={workers}"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    log, deadline = tmp_path / "log.jsonl", time.time() + 60
    while time.time() < deadline and p.poll() is None:  # past the evaluation of step 4: the checkpoint of 2 is in
        if log.exists() and '"step": 4' in log.read_text():
            break
        time.sleep(0.05)
    os.killpg(p.pid, sig)  # the whole group, as a terminal, timeout or a scheduler sends it: the workers too
    _, err = p.communicate(timeout=60)
    assert p.returncode == 1 and "Traceback" not in err, err[-500:]
    assert re.fullmatch(r"interrupted at step \d+; the last checkpoint is step \d+ .* --resume=True",
                        err.strip().splitlines()[-1]), err[-500:]


def test_a_data_worker_passes_a_connection_the_stopped_loop_dropped_quietly():
    # the worker's resource_sharer thread reports through sys.excepthook; a loop stopped mid-batch
    # (5 of 332 SIGTERMs to the group with --data_workers=2, LOG.md) left it a reset or broken connection
    code = ("import sys, train; seen = []; sys.excepthook = lambda k, v, tb: seen.append(k.__name__); "
            "train.ignore_stop_signals(0); "
            "[sys.excepthook(k, k(), None) for k in (ConnectionResetError, BrokenPipeError, EOFError, ValueError)]; "
            "print(seen)")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "['ValueError']", p.stderr[-500:]


# ---- 7. every config value is checked before any work --------------------------------------

@pytest.mark.parametrize("arg, message", [
    ("--eval_interval=0", "--eval_interval=0: must be a positive integer"),
    ("--batch_size=0", "--batch_size=0: must be a positive integer"),
    ("--block_size=0", "--block_size=0: must be a positive integer"),
    ("--log_interval=-1", "must be a positive integer"),
    ("--eval_iters=0", "must be a positive integer"),
    ("--n_layer=0", "must be a positive integer"),
    ("--max_iters=-1", "--max_iters=-1: must be >= 0"),
    ("--warmup_iters=-5", "must be >= 0"),
    ("--n_embd=65", "--n_embd=65 is not a multiple of --n_head=2"),
    ("--n_embd=66", "head size n_embd / n_head = 33 is odd: RoPE"),
    ("--lr=nan", "--lr=nan: must be a finite number > 0"),
    ("--lr=inf", "must be a finite number > 0"),
    ("--lr=0", "must be a finite number > 0"),
    ("--min_lr=1", "--min_lr=1.0: must be within 0 and --lr"),
    ("--min_lr=-1e-4", "must be within 0 and --lr"),
    ("--weight_decay=-0.1", "--weight_decay=-0.1: must be a finite number >= 0"),
    ("--beta1=1", "--beta1=1.0: must be within 0 and 1"),
    ("--beta2=0", "must be within 0 and 1"),
    ("--grad_clip=0", "--grad_clip=0.0: must be > 0"),
    ("--grad_clip=nan", "must be > 0"),
    ("--device=foo", "--device=foo: use auto, cpu, cuda or cuda:N"),
    ("--device=cuda:x", "use auto, cpu, cuda or cuda:N"),
    ("--dtype=int8", "--dtype=int8: use bfloat16, float16 or float32"),
    ("--compile_mode=fast", "--compile_mode=fast: use one of default"),
    ("--mem_rank=0", "--mem_rank must be >= 1, got 0"),
    ("--mem_alpha=0", "--mem_alpha must be finite and > 0 \\(0 switches the memory off\\)"),
    ("--mem_steps=0", "--mem_steps must be >= 1"),
    ("--mem_lr=nan", "--mem_lr must be finite"),
    ("--mem_layer_frac=0", "--mem_layer_frac must be in"),
    ("--mem_scope=everything", "--mem_scope must be one of"),
    ("--niah_tasks=single,foo", "--niah_tasks=single,foo: unknown task 'foo'"),
    ("--niah_full_frac=2", "must be within 0 and 1"),
    ("--niah_haystack=hay", "--niah_haystack=hay: use noise, prose or a comma list of them"),
    ("--niah_forms=odd", "--niah_forms=odd: use one of fixed"),
    ("--niah_answer_len=0", "must be a positive integer"),
    ("--seed=-1", "--seed=-1: must be within 0 and 2\\*\\*32-1"),
    ("--seed=4294967296", "--seed=4294967296: must be within 0 and 2"),
    ("--niah_min_len=65", "--niah_min_len=65: must be at most --block_size=64"),
    ("--sample_block_len=0", "--sample_block_len=0: must be a positive integer"),
    ("--sample_temperature=-1", "--sample_temperature=-1.0: must be a finite number >= 0"),
    ("--dataset=nowhere", r"unknown dataset 'nowhere': choose one of niah, .*pydoc.*, or write "
                          r"data/nowhere/prepare.py"),
    ("--tokenizer=foo", r"unknown tokenizer 'foo': choose one of byte, gpt2, .*o200k_base"),
])
def test_every_bad_setting_stops_parse_config_in_one_line(arg, message):
    with pytest.raises(SystemExit, match=message) as e:
        train.parse_config(["--config", "tiny", arg])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("args", [["--resume=True", "--overwrite=True"], ["--resume=True", "--init_from=x"]])
def test_resume_takes_neither_overwrite_nor_init_from(args):
    with pytest.raises(SystemExit, match="--resume=True continues the run in out_dir"):
        train.parse_config(["--config", "tiny", *args])


def test_the_cpu_estimate_counts_memdlm_steps_from_mem_start():
    cfg = train.parse_config(["--config", "cpu"])  # MDLM for mem_start steps, then MemDLM
    n, m = cfg["mem_start"], cfg["max_iters"] - cfg["mem_start"]
    assert n > 0 and m > 0
    minutes = lambda c, start=0: train.cpu_minutes(c, 1e6, 2048, start)
    assert minutes(cfg) == pytest.approx(minutes({**cfg, "mem": False}) * (n + 1.8 * m) / (n + m))
    assert minutes(cfg, start=n) == pytest.approx(minutes(cfg) * 1.8 * m / (n + 1.8 * m))
    assert minutes({**cfg, "mem_start": 0}) == pytest.approx(minutes({**cfg, "mem": False}) * 1.8)


def test_compile_on_the_cpu_is_noted(tmp_path, capsys):
    run(tmp_path, "--max_iters=0", "--compile=True", "--device=cpu")
    assert "note: --compile applies on the GPU only" in capsys.readouterr().out


# ---- 8. the memory's settings are not the model's identity ---------------------------------

def test_init_from_a_base_at_another_length_and_chunking(base, tmp_path):
    # a length curriculum: fine-tune a base at twice its block_size, with chunked attention
    run(tmp_path, f"--init_from={base}", "--max_iters=1", "--block_size=128", "--attn_chunk=32", "--eval_interval=100")
    cfg = read_checkpoint(str(tmp_path / "ckpt.pt"))["config"]
    assert (cfg["block_size"], cfg["attn_chunk"]) == (128, 32) and strict_log(tmp_path / "log.jsonl")[0]["step"] == 0


def test_a_refused_init_from_leaves_no_log_and_the_next_run_goes_in(base, tmp_path):
    with pytest.raises(SystemExit, match=r"--init_from=\S+: its model differs from this config's in n_layer"):
        run(tmp_path, f"--init_from={base}", "--max_iters=1", "--n_layer=3")
    assert not (tmp_path / "log.jsonl").exists() and not (tmp_path / "ckpt.pt").exists()
    run(tmp_path, f"--init_from={base}", "--max_iters=1", "--eval_interval=100")  # no --overwrite needed
    assert [r["step"] for r in strict_log(tmp_path / "log.jsonl") if "eval_loss" in r] == [0, 1]


def test_init_from_a_base_with_another_memory_rank_and_alpha(base, tmp_path):
    run(tmp_path, f"--init_from={base}", "--max_iters=1", "--mem_rank=4", "--mem_alpha=16", "--eval_interval=100")
    src, dst = strict_log(base / "log.jsonl"), strict_log(tmp_path / "log.jsonl")
    # the same weights on the same eval batches: the base model's loss carries over exactly
    assert dst[0]["step"] == 0 and dst[0]["eval_loss"] == [r for r in src if "eval_loss" in r][-1]["eval_loss"]
    assert read_checkpoint(str(tmp_path / "ckpt.pt"))["config"]["mem_rank"] == 4


def test_resume_with_another_memory_setting_or_seed_says_so(copy, capsys):
    run(copy, "--resume=True", "--max_iters=10", "--mem_lr=0.05", "--seed=7", "--eval_interval=10")
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: resuming")]
    assert len(notes) == 1 and "mem_lr 0.1 -> 0.05" in notes[0] and "seed 1337 -> 7" in notes[0]


# ---- 9. one line, no traceback, for bad files and arguments ---------------------------------

def _damage(src, dst, kind):
    dst.mkdir(parents=True)
    ckpt = dst / "ckpt.pt"
    if kind == "truncated":
        ckpt.write_bytes(open(src, "rb").read()[:5000])
    elif kind == "empty":
        ckpt.write_bytes(b"")
    elif kind == "random":
        ckpt.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))
                         .to(torch.uint8).numpy().tobytes())
    else:
        ckpt.mkdir()


@pytest.mark.parametrize("kind", ["truncated", "empty", "random", "directory"])
def test_a_damaged_checkpoint_gives_one_line_everywhere(base, tmp_path, kind):
    bad = tmp_path / "bad"
    _damage(base / "ckpt.pt", bad, kind)
    for call in (lambda: sample.main([f"--out_dir={bad}", "--device=cpu"]),
                 lambda: niah_eval.main([f"--out_dir={bad}", "--device=cpu"]),
                 lambda: run(bad, "--resume=True", "--max_iters=12")):
        with pytest.raises(SystemExit, match=r"ckpt.pt (cannot be read as a checkpoint|was not loaded)") as e:
            call()
        assert "\n" not in str(e.value)


def test_a_prompt_file_that_is_not_utf8(base, tmp_path):
    (tmp_path / "p.txt").write_bytes(b"caf\xe9 au lait")
    with pytest.raises(SystemExit, match=r"is not UTF-8 text \(byte 0xe9 at offset 3\)"):
        sample.main([f"--out_dir={base}", f"--prompt_file={tmp_path / 'p.txt'}", "--device=cpu"])


def test_niah_results_file_is_checked_before_the_evaluation(base, tmp_path, monkeypatch, capsys):
    def evaluated(*a, **k):
        raise AssertionError("the evaluation ran")
    monkeypatch.setattr(niah_eval, "generate", evaluated)
    argv = [f"--out_dir={base}", "--device=cpu", "--tasks=single", "--lengths=200", "--n=1"]
    for t in ("1.5", "-0.1", "nan"):
        with pytest.raises(SystemExit, match=rf"^--threshold={t}: a confidence within 0 and 1$"):
            niah_eval.main(argv + [f"--threshold={t}"])
    with pytest.raises(SystemExit, match=r"the directory .*missing does not exist"):
        niah_eval.main(argv + [f"--json={tmp_path / 'missing' / 'r.json'}"])
    (tmp_path / "r.json").write_text("earlier results")
    with pytest.raises(SystemExit, match=r"r.json exists: choose another --json file, or pass --overwrite"):
        niah_eval.main(argv + [f"--json={tmp_path / 'r.json'}"])
    with pytest.raises(AssertionError, match="the evaluation ran"):  # --overwrite lets it go on
        niah_eval.main(argv + [f"--json={tmp_path / 'r.json'}", "--overwrite"])
    assert "was trained on text (--dataset=pydoc), not on needle rows" in capsys.readouterr().out  # a text model
    assert (tmp_path / "r.json").read_text() == "earlier results"
    ckpt = os.path.join(base, "ckpt.pt")
    before = open(ckpt, "rb").read()
    for run_file in (ckpt, os.path.join(base, "log.jsonl")):  # a run's own files, even with --overwrite
        with pytest.raises(SystemExit, match=r"is a training run's file \(checkpoint or log\): choose another"):
            niah_eval.main(argv + [f"--json={run_file}", "--overwrite"])
    assert open(ckpt, "rb").read() == before


@pytest.mark.parametrize("arg, message", [
    ("--steps=0", "--steps=0: must be a positive integer"),
    ("--warmup=-1", "--warmup=-1: must be >= 0"),
    ("--prompt_lens=1024,abc", "--prompt_lens=1024,abc: a comma list of positive integers"),
    ("--prompt_lens=0", "a comma list of positive integers"),
    ("--modes=foo", "--modes=foo: a comma list of mdlm and memdlm"),
    ("--modes=mdlm,mdlm", "--modes=mdlm,mdlm: a comma list of mdlm and memdlm, each once"),
    ("--threshold=nan", "--threshold=nan: a confidence within 0 and 1"),
    ("--threshold=1.5", "--threshold=1.5: a confidence within 0 and 1"),
    ("--gen_len=10", "--gen_len=10 must be a multiple of --block=32"),
    ("--steps", "bad argument '--steps': write --key=value"),
])
def test_bench_arguments_are_checked(arg, message):
    with pytest.raises(SystemExit, match=message):
        bench.parse(["--config", "tiny", arg])


# ---- 10. damaged data files: one line that says to prepare them again ------------------------

@pytest.fixture
def dataset(tmp_path, monkeypatch):
    """data/x/ holding a good byte-level corpus (a few thousand tokens), in tmp_path."""
    from data import tokenizer
    monkeypatch.setattr(tokenizer, "HERE", str(tmp_path))
    (tmp_path / "x").mkdir()
    tokenizer.write_bins(["The quick brown fox jumps over the lazy dog. " * 40] * 3, "byte", str(tmp_path / "x"))
    return tmp_path / "x"


@contextlib.contextmanager
def no_hang(seconds=10):
    """Fail, rather than block the suite, when the body blocks (opening a FIFO waits for a writer)."""
    def hung(*a):
        raise AssertionError(f"blocked for {seconds} s")
    old = signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _meta(d, **change):
    meta = {**json.loads((d / "meta.json").read_text()), **change}
    (d / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if v is not ...}))


@pytest.mark.parametrize("damage, message", [
    (lambda d: open(d / "train.bin", "ab").write(b"\0"), r"train.bin is 9727 bytes, not a whole number of uint16 tokens"),
    (lambda d: (d / "train.bin").write_bytes(b""), r"train.bin is empty"),
    (lambda d: open(d / "train.bin", "r+b").truncate(100), r"train.bin holds 50 tokens, meta.json says 4863: the file "
                                                           r"is cut short"),
    (lambda d: (d / "meta.json").write_text("{dtype: uint16"), r"meta.json is not JSON \("),
    (lambda d: (d / "meta.json").write_text(""), r"meta.json is not JSON \("),
    (lambda d: (d / "meta.json").write_text("[1, 2]"), r"meta.json does not name the tokens' dtype and tokenizer"),
    (lambda d: _meta(d, dtype=...), r"meta.json does not name the tokens' dtype"),
    (lambda d: _meta(d, dtype="float32"), r"meta.json gives dtype 'float32': token ids are one of uint8, uint16, uint32"),
    (lambda d: _meta(d, dtype="int64"), r"gives dtype 'int64'"),
    (lambda d: (np.array([65, 300, 66], np.uint16).tofile(d / "train.bin"), _meta(d, train_tokens=3)),
     r"train.bin holds token id 300 at position 1, not a token of 'byte' data \(ids below 258"),
    (lambda d: (np.array([65, 66, 257], np.uint16).tofile(d / "train.bin"), _meta(d, train_tokens=3)),
     r"holds token id 257 at position 2, .*the mask 257 never in data"),
    (lambda d: ((d / "train.bin").unlink(), os.mkfifo(d / "train.bin")), r"train.bin is not a regular file"),
    (lambda d: ((d / "meta.json").unlink(), (d / "meta.json").mkdir()), r"meta.json is not a regular file"),
    (lambda d: (d / "meta.json").unlink(), r"no train split at .*train.bin \(meta.json is missing\)"),
])
def test_a_damaged_data_file_is_one_line_that_says_to_prepare_it_again(dataset, damage, message):
    damage(dataset)
    from data.tokenizer import open_split
    with no_hang(), pytest.raises(SystemExit, match=message) as e:
        open_split("x", "train", "byte")
    assert "\n" not in str(e.value) and str(e.value).endswith(
        ("run python data/x/prepare.py --tokenizer=byte to write it again", "run python data/x/prepare.py --tokenizer=byte"))


def test_training_on_damaged_data_stops_before_any_step(dataset, monkeypatch, tmp_path):
    monkeypatch.setattr(train, "DATA_DIR", str(dataset.parent))  # --dataset=x: a directory with a prepare.py
    (dataset / "prepare.py").write_text("")
    monkeypatch.setattr(train, "train_step", lambda *a: pytest.fail("a step ran"))
    (np.array([65, 66, 300] * 100, np.uint16)).tofile(dataset / "val.bin")
    _meta(dataset, val_tokens=300)
    with pytest.raises(SystemExit, match=r"val.bin holds token id 300 at position 2, .*: run python "
                                         r"data/x/prepare.py --tokenizer=byte to write it again$"):
        run(tmp_path / "out", "--dataset=x", "--max_iters=2")
    assert not (tmp_path / "out" / "ckpt.pt").exists()
    from data.tokenizer import open_split
    assert len(open_split("x", "train", "byte")) == 4863  # the good split still opens


def test_write_bins_leaves_no_meta_describing_other_files(dataset, monkeypatch):
    """A failure between the token files and meta.json (a full disk) leaves no meta.json: the next
    open says to prepare again, rather than reading new tokens with the old description."""
    from data import tokenizer
    real = os.replace

    def full(a, b):
        if str(b).endswith("val.bin"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(a, b)
    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(SystemExit, match=r"^cannot write the token files in .*x \(No space left on device\): make it "
                                         r"a writable directory with room"):
        tokenizer.write_bins(["another text " * 50], "byte", str(dataset))
    assert sorted(os.listdir(dataset)) == ["train.bin", "val.bin"]  # no meta.json, no temp left
    with pytest.raises(SystemExit, match=r"\(meta.json is missing\): run python data/x/prepare.py"):
        tokenizer.open_split("x", "val", "byte")
    with pytest.raises(SystemExit, match=r"the text is 3 tokens: too few for a train and a val split"):
        tokenizer.write_bins(["ab"], "byte", str(dataset))


@pytest.mark.parametrize("argv, message", [
    (["--tokenizer"], r"bad argument '--tokenizer': usage: python data/pydoc/prepare.py \[--tokenizer=byte\]"),
    (["--tokenizer="], r"bad argument '--tokenizer='"),
    (["--tok=gpt2"], r"bad argument '--tok=gpt2'"),
    (["--tokenizer=bogus"], r"unknown tokenizer 'bogus'"),
])
def test_prepare_takes_only_its_tokenizer(argv, message):
    from data.tokenizer import prepare_args
    with pytest.raises(SystemExit, match=message):
        prepare_args(argv, "python data/pydoc/prepare.py [--tokenizer=byte]")
    assert prepare_args([], "") == "byte" and prepare_args(["--tokenizer=gpt2"], "") == "gpt2"


def test_shakespeare_text_that_is_not_usable_is_one_line(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "data", "shakespeare"))
    try:
        import prepare as shakespeare
    finally:
        sys.path.pop(0)
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9")
    (tmp_path / "empty.txt").write_text("  \n")
    os.mkfifo(tmp_path / "fifo.txt")
    for name, message in (("bad.txt", r"is not UTF-8 text \(byte 0xe9 at offset 3\)"), ("empty.txt", "is empty"),
                          ("fifo.txt", "is not a regular file")):
        with no_hang(), pytest.raises(SystemExit, match=message):
            shakespeare.read_text(str(tmp_path / name))


# ---- --overwrite keeps the earlier run until the new one has a checkpoint ------------------

def test_overwrite_keeps_the_earlier_run_until_the_new_runs_first_checkpoint(copy, monkeypatch, capsys):
    before, log_before = digest(copy / "ckpt.pt"), (copy / "log.jsonl").read_text()
    _poisoned_step(monkeypatch, 2, "weight")  # a NaN stop before the new run's first checkpoint
    monkeypatch.setattr(train, "evaluate", lambda *a: {"eval_loss": 1.0})
    with pytest.raises(SystemExit, match=r"no checkpoint was written.*--overwrite=True \(the earlier run, kept "
                                         r"aside, is back in its place\)$"):
        run(copy, "--max_iters=10", "--eval_interval=5", "--log_interval=100", "--overwrite=True")
    assert "kept as" in capsys.readouterr().out and sorted(os.listdir(copy)) == ["ckpt.pt", "log.jsonl"]
    assert digest(copy / "ckpt.pt") == before and (copy / "log.jsonl").read_text() == log_before
    monkeypatch.undo()
    run(copy, "--max_iters=10", "--eval_interval=5", "--log_interval=100", "--overwrite=True")
    assert sorted(os.listdir(copy)) == ["ckpt.pt", "log.jsonl"]  # the kept files went at the first checkpoint
    assert digest(copy / "ckpt.pt") != before


def test_a_data_error_after_the_earlier_run_was_kept_aside_puts_it_back(copy, monkeypatch):
    before = digest(copy / "ckpt.pt")
    def missing(*a):
        raise SystemExit("no val split at data/x/val.bin: run python data/x/prepare.py")
    monkeypatch.setattr(train, "make_data", missing)
    with pytest.raises(SystemExit, match="no val split"):
        run(copy, "--max_iters=12", "--overwrite=True")
    assert sorted(os.listdir(copy)) == ["ckpt.pt", "log.jsonl"] and digest(copy / "ckpt.pt") == before


def test_a_run_kept_aside_and_left_by_a_killed_run_is_never_overwritten(copy):
    """A SIGKILL before the first checkpoint cannot put the earlier run back: its kept files
    stop every later run in one line until they are renamed back or deleted."""
    before = digest(copy / "ckpt.pt")
    for p in ("ckpt.pt", "log.jsonl"):
        os.replace(copy / p, copy / (p + ".before-overwrite"))
    (copy / "log.jsonl").write_text('{"step": 0, "eval_loss": 5.0}\n')  # the killed run's log
    for args in ([], ["--overwrite=True"]):
        with pytest.raises(SystemExit, match=r"ckpt.pt.before-overwrite, \S*log.jsonl.before-overwrite: an earlier "
                                             r"run that --overwrite=True kept aside, not put back .*: when none "
                                             r"runs, rename them back \(drop .before-overwrite\) to keep that run"):
            run(copy, "--max_iters=12", *args)
    with pytest.raises(SystemExit, match=r"does not exist: \S*ckpt.pt.before-overwrite is a run --overwrite=True "
                                         r"kept aside; rename it to ckpt.pt to continue it$"):
        run(copy, "--max_iters=12", "--resume=True")
    with pytest.raises(SystemExit, match=r"^no checkpoint at \S+, but \S+ckpt.pt.before-overwrite holds a run that "
                                         r"--overwrite=True kept aside .*: rename it to ckpt.pt to use it$"):
        sample.main([f"--out_dir={copy}", "--prompt=Hi", "--device=cpu"])
    assert digest(copy / "ckpt.pt.before-overwrite") == before
    for p in ("ckpt.pt", "log.jsonl"):
        os.replace(copy / (p + ".before-overwrite"), copy / p)
    run(copy, "--max_iters=12", "--resume=True")  # renamed back, the run continues


def test_a_log_without_a_checkpoint_is_refused_unless_overwrite(copy):
    os.remove(copy / "ckpt.pt")
    log = (copy / "log.jsonl").read_text()
    with pytest.raises(SystemExit, match=r"^\S*log.jsonl exists \(an earlier run's log, no checkpoint\): pass "
                                         r"--overwrite=True to replace it, or another --out_dir$"):
        run(copy, "--max_iters=2")
    assert (copy / "log.jsonl").read_text() == log
    (copy / "log.jsonl").write_text("")  # a run stopped before its first log line: nothing to keep
    run(copy, "--max_iters=2")
    assert (copy / "ckpt.pt").exists() and '"step": 2' in (copy / "log.jsonl").read_text()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_a_stop_in_the_setup_is_one_line_and_the_run_can_start_again(tmp_path, monkeypatch, sig):
    def build(*a):
        os.kill(os.getpid(), sig)  # delivered to this (the main) thread: raised here
        time.sleep(5)
    real_build = train.build
    monkeypatch.setattr(train, "build", build)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit, match=r"^interrupted before the first step: nothing was trained and nothing "
                                         r"written is lost; run the command again$"):
        run(tmp_path / "r", "--max_iters=2")
    assert signal.getsignal(signal.SIGTERM) is before  # the handler before the run is back
    monkeypatch.setattr(train, "build", real_build)
    run(tmp_path / "r", "--max_iters=2")  # no lock left, the empty log is no obstacle
    assert (tmp_path / "r" / "ckpt.pt").exists()


@pytest.mark.parametrize("module, inner", [("sample", "_main"), ("experiments.niah_eval", "evaluate"),
                                           ("experiments.exposure", "_main"), ("experiments.bench", "_main"),
                                           ("lessons.hypergrad", "_main")])
def test_a_sigterm_ends_every_script_in_one_line_and_its_handler_comes_back(monkeypatch, module, inner):
    mod = importlib.import_module(module)
    def terminated(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)  # raised here, in the main thread, as KeyboardInterrupt
        time.sleep(5)
        raise AssertionError("the SIGTERM did not stop it")
    monkeypatch.setattr(mod, inner, terminated)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit, match=r"^interrupted") as e:
        mod.main([])
    assert "\n" not in str(e.value) and signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("kind, message", [
    ("empty", r"^--out_dir is empty: name a directory"), ("file", r"^--out_dir=\S*afile cannot hold a run \(a file"),
    ("under a file", r"^--out_dir=\S*afile/sub cannot hold a run \(not a directory\)"),
    ("dangling link", r"^--out_dir=\S*dangling cannot hold a run \(a file or a broken link\)")])
def test_an_out_dir_that_cannot_hold_a_run_is_one_line(tmp_path, kind, message):
    (tmp_path / "afile").write_text("kept")
    os.symlink(tmp_path / "nowhere" / "x", tmp_path / "dangling")
    out = {"empty": "", "file": tmp_path / "afile", "under a file": tmp_path / "afile" / "sub",
           "dangling link": tmp_path / "dangling"}[kind]
    with pytest.raises(SystemExit, match=message):
        train.main(["--config", "tiny", f"--out_dir={out}", "--max_iters=1"])
    assert (tmp_path / "afile").read_text() == "kept"


# ---- sample.py: no silent fallback, no sampling from a broken model -------------------------

@pytest.mark.parametrize("arg, message", [
    ("--gen_len=0", r"^--gen_len=0: must be a positive integer"),
    ("--steps=0", r"^--steps=0: must be a positive integer"),
    ("--adapt_steps=0", r"--adapt_steps >= 1"),
    ("--temperature=inf", r"a finite --temperature >= 0"),
    ("--temperature=nan", r"a finite --temperature >= 0"),
    ("--threshold=1.5", r"^--threshold=1.5: must be within 0 and 1"),
    ("--threshold=-0.1", r"^--threshold=-0.1: must be within 0 and 1"),
    ("--adapt_steps=3", r"^--adapt_steps sets the inference-time memory's budget: add --adapt, or leave it out$"),
])
def test_sample_refuses_settings_it_would_replace_or_misuse(base, arg, message):
    with pytest.raises(SystemExit, match=message) as e:
        sample.main([f"--out_dir={base}", "--prompt=Hi", "--device=cpu", arg])
    assert "\n" not in str(e.value)


def test_generate_refuses_a_non_finite_temperature(base):
    model, _ = load_model(str(base))
    for t in (math.inf, math.nan):
        with pytest.raises(ValueError, match="temperature a finite number >= 0"):
            sample.generate(model, [[1, 2]], gen_len=4, steps=4, temperature=t)


@pytest.mark.parametrize("damage", ["nan", "int"])
def test_sample_refuses_a_checkpoint_with_non_finite_or_integer_weights(base, tmp_path, damage):
    ckpt = torch.load(base / "ckpt.pt", weights_only=True)
    w = ckpt["model"]["lm_head.weight"]
    ckpt["model"]["lm_head.weight"] = w.long() if damage == "int" else w.index_fill(0, torch.tensor([0]), math.nan)
    torch.save(ckpt, tmp_path / "ckpt.pt")
    with pytest.raises(SystemExit, match=r"weight lm_head.weight is not (finite|floating point).*: cannot sample: "
                                         r"train again$"):
        sample.main([f"--out_dir={tmp_path}", "--prompt=Hi", "--gen_len=4", "--device=cpu"])


def test_an_unknown_rope_scaling_in_a_checkpoint_is_one_line(base, tmp_path):
    ckpt = torch.load(base / "ckpt.pt", weights_only=True)
    d = _edited(base, tmp_path, model_args={**ckpt["model_args"], "rope_scaling": "yarn"})
    with pytest.raises(SystemExit, match=r"holds rope_scaling='yarn', not one of none, ntk, pi: the checkpoint was "
                                         r"edited or damaged"):
        sample.main([f"--out_dir={d}", "--prompt=Hi", "--gen_len=4", "--device=cpu"])


# ---- what a checkpoint holds is checked, and a non-file is never opened ----------------------

@pytest.mark.parametrize("kind", ["fifo", "dir"])
def test_a_checkpoint_that_is_not_a_regular_file_is_refused_without_opening_it(tmp_path, kind):
    path = tmp_path / "ckpt.pt"
    os.mkfifo(path) if kind == "fifo" else path.mkdir()
    with no_hang(10), pytest.raises(SystemExit, match=r"ckpt.pt cannot be read as a checkpoint: it is a (FIFO|directory), "
                                                          r"not a regular file; give"):
        read_checkpoint(str(path))


def _edited(base, tmp_path, **change):
    ckpt = torch.load(base / "ckpt.pt", weights_only=True)
    for k, v in change.items():
        if v is None:
            del ckpt[k]
        else:
            ckpt[k] = v
    d = tmp_path / "run"
    d.mkdir()
    torch.save(ckpt, d / "ckpt.pt")
    shutil.copy(base / "log.jsonl", d / "log.jsonl")
    return d


@pytest.mark.parametrize("change, message", [
    (dict(step=-1), r"holds step=-1, not a non-negative integer"),
    (dict(step=2.5), r"holds step=2.5, not a non-negative integer"),
    (dict(step="10"), r"holds step='10', not a non-negative integer"),
    (dict(wall_s=-1.0), r"holds wall_s=-1.0, not a time in seconds"),
    (dict(wall_s="1"), r"holds wall_s='1', not a time in seconds"),
    (dict(optimizer=None), r"holds no optimizer state, so it cannot be resumed: start a new run .*--init_from="),
    (dict(optimizer={"state": {}, "param_groups": [{"params": [0]}]}),
     r"its optimizer state does not fit this model \(ValueError: .*\): it is damaged or of another model"),
])
def test_a_checkpoint_with_wrong_contents_stops_resume_in_one_line(base, tmp_path, change, message):
    d = _edited(base, tmp_path, **change)
    with pytest.raises(SystemExit, match=message) as e:
        run(d, "--resume=True", "--max_iters=12")
    assert "\n" not in str(e.value)


def test_weights_that_do_not_fit_stop_resume_in_one_line(base, tmp_path):
    ckpt = torch.load(base / "ckpt.pt", weights_only=True)
    d = _edited(base, tmp_path, model={**ckpt["model"], "lm_head.weight": torch.zeros(3, 3)})
    with pytest.raises(SystemExit, match=r"its weights do not fit this model \(RuntimeError: .*\): resume") as e:
        run(d, "--resume=True", "--max_iters=12")
    assert "\n" not in str(e.value)


# ---- one train.py per out_dir ------------------------------------------------------------

def test_an_out_dir_in_use_is_refused_and_a_stale_lock_is_taken_over(copy, capsys):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (copy / "train.lock").write_text(f"{sleeper.pid}\n")
        log = (copy / "log.jsonl").read_text()
        with pytest.raises(SystemExit, match=rf"^\S+ is in use by train.py process {sleeper.pid} \(.*train.lock\): "
                                             r"wait for it to end, or train in another --out_dir \(if no train.py "
                                             r"runs there, the pid is another program.s now: delete \S+train.lock\)$"):
            run(copy, "--resume=True", "--max_iters=12")
        assert (copy / "log.jsonl").read_text() == log
    finally:
        sleeper.kill()
        sleeper.wait()
    run(copy, "--resume=True", "--max_iters=12", "--eval_interval=100")  # its process is gone: stale
    assert re.search(rf"note: .*train.lock was left by process {sleeper.pid}, which is gone: taking it over",
                     capsys.readouterr().out)
    assert not (copy / "train.lock").exists()  # released at the end


def test_the_lock_is_held_during_the_run_and_released_on_a_stop(tmp_path, monkeypatch):
    seen = []
    real = train.train_step

    def step(*a):
        seen.append((tmp_path / "train.lock").read_text().strip())
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "train_step", step)
    with pytest.raises(SystemExit, match="interrupted at step 0"):
        run(tmp_path, "--max_iters=4")
    assert seen == [str(os.getpid())] and not (tmp_path / "train.lock").exists()
    monkeypatch.setattr(train, "train_step", real)


# ---- torchrun ranks run one config -------------------------------------------------------

def test_torchrun_ranks_started_with_different_settings_stop_in_one_line_naming_the_key(tmp_path):
    with socket.socket() as s:  # a free port for the ranks' rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "WORLD_SIZE": "2"}
    ranks = [subprocess.Popen([sys.executable, "train.py", "--config", "tiny", f"--out_dir={tmp_path / 'run'}",
                               f"--mem={mem}"], cwd=ROOT, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r, mem in enumerate(("True", "False"))]
    try:
        errs = [p.communicate(timeout=60)[1] for p in ranks]
    finally:
        for p in ranks:
            p.kill()
    for p, err in zip(ranks, errs):  # every rank stops, with the same line
        assert p.returncode == 1 and "Traceback" not in err, err[-500:]
        assert err.strip().splitlines()[-1] == ("the torchrun ranks were started with different settings: mem (rank 0: "
                                                "True, rank 1: False); start every rank with the same arguments")
    assert not (tmp_path / "run").exists()  # before any work


@pytest.mark.parametrize("env, wrong", [({"RANK": "0"}, "LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT are"),
                                        ({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "two", "MASTER_ADDR": "localhost",
                                          "MASTER_PORT": "29500"}, "WORLD_SIZE is")], ids=["rank_alone", "not_a_number"])
def test_a_torchrun_environment_that_is_partial_or_malformed_is_one_line(tmp_path, monkeypatch, env, wrong):
    for k in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit, match=rf"^RANK=0 is set but {wrong} missing or not a number: start several "
                                         r"processes with torchrun --nproc_per_node=N train.py ..., or unset RANK"):
        run(tmp_path / "r", "--max_iters=2")
    assert not (tmp_path / "r").exists()  # before any work


def test_a_master_addr_that_does_not_resolve_is_one_line(tmp_path, monkeypatch):
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="no.such.host.invalid",
                     MASTER_PORT="29500").items():
        monkeypatch.setenv(k, v)

    def unresolved(host, port, *a, **k):  # as a resolver answers, without asking one
        raise socket.gaierror(-2, "Name or service not known")
    monkeypatch.setattr(socket, "getaddrinfo", unresolved)
    with pytest.raises(SystemExit, match=r"^MASTER_ADDR=no.such.host.invalid does not resolve \(.*\): use the "
                                         r"address of rank 0's machine"):
        run(tmp_path / "r", "--max_iters=2")
    assert not (tmp_path / "r").exists()


def test_the_rendezvous_wait_says_what_it_waits_for_and_dies_on_ctrl_c(monkeypatch, capsys):
    # a process of WORLD_SIZE=2 started alone waits in c10d, which retries through Ctrl-C: there
    # Ctrl-C and SIGTERM kill it outright (nothing is written yet), and after a while a note says why it waits
    for k, v in dict(WORLD_SIZE="2", MASTER_ADDR="localhost", MASTER_PORT="29500").items():
        monkeypatch.setenv(k, v)
    seen = {}

    def waiting(backend):
        time.sleep(0.5)
        seen.update({s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)})
    monkeypatch.setattr(torch.distributed, "init_process_group", waiting)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    train.join_process_group(patience=0.1)
    assert set(seen.values()) == {signal.SIG_DFL}
    assert {s: signal.getsignal(s) for s in before} == before  # put back after the wait
    assert "waiting 0.1 s so far for the 2 processes of WORLD_SIZE=2 at localhost:29500: torchrun" in capsys.readouterr().out


# ---- sizes that cannot be allocated ------------------------------------------------------

@pytest.mark.parametrize("arg", ["--n_embd=1099511627776",  # a 1.4 PB embedding: refused at once, nothing taken
                                 "--n_embd=4611686018427387904",  # its byte count overflows int64
                                 "--batch_size=1000000000000"],  # the first batch (step 0's evaluation)
                         ids=["model", "model_overflow", "batch"])
def test_sizes_that_cannot_be_allocated_stop_in_one_line_naming_them(tmp_path, arg):
    with pytest.raises(SystemExit, match=r"^cannot allocate memory for --n_layer=2, --n_embd=\d+, --batch_size=\d+, "
                                         r"--block_size=64 \(.*\): try smaller values: no checkpoint was written, "
                                         r"run again with --overwrite=True$") as e:
        run(tmp_path, "--max_iters=2", arg)
    assert "\n" not in str(e.value) and arg in str(e.value)
    assert not (tmp_path / "train.lock").exists()


def test_a_batch_that_cannot_be_allocated_on_resume_keeps_the_checkpoint(copy):
    before = digest(copy / "ckpt.pt")
    with pytest.raises(SystemExit, match=r"^cannot allocate memory for .*--batch_size=1000000000000.*: try a smaller "
                                         r"--batch_size: the checkpoint of step 10 is unchanged, continue with "
                                         r"--resume=True$"):
        run(copy, "--resume=True", "--max_iters=12", "--batch_size=1000000000000")
    assert digest(copy / "ckpt.pt") == before


# ---- long work shows progress; Ctrl-C in it is one line ----------------------------------

def recording_bars(monkeypatch, module):
    """Every tqdm bar module makes, recorded (a bar shows once its work takes PROGRESS_DELAY)."""
    bars = []

    class Recorded(module.tqdm):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            bars.append(self)
    monkeypatch.setattr(module, "tqdm", Recorded)
    return bars


def test_evaluation_has_a_progress_bar_and_ctrl_c_in_it_is_one_line(tmp_path, monkeypatch):
    bars = recording_bars(monkeypatch, train)
    run(tmp_path / "a", "--max_iters=2", "--eval_interval=100", "--eval_iters=3")
    assert [(b.total, b.n, b.delay > 0) for b in bars if b.desc == "eval"] == [(3, 3, True)] * 2  # steps 0 and 2
    real, calls = train.batch_loss, []

    def interrupted(*a):
        calls.append(1)
        if len(calls) == 2:  # step 0's evaluation, its second batch
            raise KeyboardInterrupt
        return real(*a)
    monkeypatch.setattr(train, "batch_loss", interrupted)
    with pytest.raises(SystemExit, match=r"^interrupted at step 0, before the first checkpoint: nothing to resume, "
                                         r"run the command again with --overwrite=True$"):
        run(tmp_path / "b", "--max_iters=2", "--eval_iters=3")


def test_adapt_has_a_progress_bar_and_ctrl_c_in_it_is_one_line(base, monkeypatch, capsys):
    bars = recording_bars(monkeypatch, sample)
    argv = [f"--out_dir={base}", "--prompt=Hello", "--gen_len=4", "--adapt", "--adapt_steps=5", "--num_samples=2",
            "--device=cpu"]
    sample.main(argv)
    assert {b.desc: (b.total, b.n) for b in bars} == {"adapt": (10, 10), "unmasking": (4, 4)}  # 5 steps a sample
    capsys.readouterr()

    def interrupted(*a):
        raise KeyboardInterrupt
    monkeypatch.setattr(sample, "inner_step", interrupted)
    with pytest.raises(SystemExit, match=r"^interrupted: sampling stopped \(sample.py writes no file\); run the "
                                         r"command again$"):
        sample.main(argv)
    assert "sample 1/2" not in capsys.readouterr().out


# ---- sample.py with no checkpoint where it looks first ------------------------------------

def test_sample_without_a_checkpoint_in_out_points_to_the_cpu_recipe(base, tmp_path, monkeypatch, capsys):
    import train
    assert sample.CPU_OUT_DIR == train.PRESETS["cpu"]["out_dir"]  # the line names the recipe's real out_dir
    monkeypatch.chdir(tmp_path)  # out/ and out-cpu/ are relative to where sample.py runs
    with pytest.raises(SystemExit, match=r"^no checkpoint in out/: train one first; without a GPU, python train.py "
                                         r"--config cpu \(under 10 minutes on 2 cores\), then python sample.py "
                                         r"--out_dir=out-cpu --adapt$"):
        sample.main(["--adapt"])
    real = sample.pick_device
    monkeypatch.setattr(sample, "pick_device", lambda name: "cuda")  # the same on a machine with a GPU
    with pytest.raises(SystemExit, match=r"^no checkpoint in out/: train one first, python train.py --config small "):
        sample.main(["--adapt"])
    monkeypatch.setattr(sample, "pick_device", real)
    shutil.copytree(base, tmp_path / "out-cpu")  # the CPU recipe was trained: the line names its command
    with pytest.raises(SystemExit, match=r"^no checkpoint in out/ \(python train.py --config small writes it\); "
                                         r"out-cpu/ holds the CPU recipe's: python sample.py --out_dir=out-cpu "
                                         r"--prompt=Hi --gen_len=4$") as e:
        sample.main(["--prompt=Hi", "--gen_len=4"])
    sample.main(shlex.split(str(e.value).split(": python sample.py ")[1]))  # and that command samples
    assert "sample 1/1" in capsys.readouterr().out


# ---- a resumed run: each evaluation logged once, the wall time of the whole run ------------

def test_a_resumed_run_logs_each_evaluation_once_and_sums_the_wall_time(base, tmp_path):
    d = _edited(base, tmp_path, wall_s=1000.0)  # the earlier run's training time, as its checkpoint holds it
    t0 = time.time()
    run(d, "--resume=True", "--max_iters=20", "--eval_interval=10", "--log_interval=5")
    elapsed = time.time() - t0
    log = strict_log(d / "log.jsonl")
    assert [r["step"] for r in log if "eval_loss" in r] == [0, 10, 20]  # step 10's evaluation is the earlier run's
    wall = log[-1]["summary"]["wall_s"]
    assert 1000 < wall <= read_checkpoint(str(d / "ckpt.pt"))["wall_s"] < 1000 + elapsed  # the checkpoint's too


def test_a_resumed_step_missing_from_the_log_is_evaluated(tmp_path):
    run(tmp_path, "--max_iters=0")  # a checkpoint of step 0, no evaluation
    run(tmp_path, "--resume=True", "--max_iters=2", "--eval_interval=100")
    assert [r["step"] for r in strict_log(tmp_path / "log.jsonl") if "eval_loss" in r] == [0, 2]


def test_a_resume_marks_the_logged_steps_it_trains_again(tmp_path, monkeypatch):
    real, calls = train.train_step, []

    def interrupted(*a):
        calls.append(1)
        if len(calls) == 9:  # during step 8: steps 6-8 are logged, the checkpoint is step 5's
            raise KeyboardInterrupt
        return real(*a)
    monkeypatch.setattr(train, "train_step", interrupted)
    args = ["--max_iters=10", "--eval_interval=5", "--log_interval=1"]
    with pytest.raises(SystemExit, match="interrupted at step 8; the last checkpoint is step 5"):
        run(tmp_path, *args)
    monkeypatch.setattr(train, "train_step", real)
    run(tmp_path, *args, "--resume=True")
    log = strict_log(tmp_path / "log.jsonl")
    mark = next(i for i, r in enumerate(log) if "resumed" in r)
    assert log[mark]["step"] == 5 and "after 5" in log[mark]["resumed"]
    assert [r["step"] for r in log[:mark] if "loss" in r][-3:] == [6, 7, 8]  # the interrupted run's lines
    assert [r["step"] for r in log[mark:] if "loss" in r] == list(range(6, 11))  # trained again
    train_recs, evals, _ = protocol.run_records(str(tmp_path))  # each step once, the last time
    assert [r["step"] for r in train_recs] == list(range(1, 11)) and [r["step"] for r in evals] == [0, 5, 10]
    run(tmp_path, "--max_iters=12", "--eval_interval=5", "--log_interval=1", "--resume=True")
    assert sum("resumed" in r for r in strict_log(tmp_path / "log.jsonl")) == 1  # nothing past step 10 to mark


@pytest.mark.parametrize("path", ["experiments/bench.py", "experiments/protocol.py", "experiments/reach.py",
                                  "experiments/exposure.py", "experiments/niah_eval.py", "lessons/hypergrad.py"])
def test_a_module_run_as_a_file_says_how_to_run_it(path):
    p = subprocess.run([sys.executable, path, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    module = path[:-3].replace("/", ".")
    assert p.returncode == 1 and p.stderr == f"run it from the repository root as a module: python -m {module}\n"


GRADERS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "lessons", "*", "grade_*.py")))


@pytest.mark.parametrize("grader", GRADERS)
def test_a_grader_run_as_a_file_says_to_grade_it_with_pytest(grader):
    p = subprocess.run([sys.executable, grader], cwd=ROOT, capture_output=True, text=True, timeout=60)
    lesson = os.path.dirname(grader)
    assert p.returncode == 1 and p.stderr == f"grade it from the repository root with pytest: python -m pytest {lesson}\n"


def test_every_lesson_has_a_grader():
    assert len(GRADERS) == 7


def test_settings_that_do_nothing_are_named_at_the_start(tmp_path, capsys):
    run(tmp_path / "a", "--max_iters=2", "--mem_start=5", "--warmup_iters=9", "--niah_tasks=single", "--niah_min_len=8")
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: --")]
    assert notes == ["note: --mem_start=5 is not below --max_iters=2: every step trains plain MDLM (MemDLM starts "
                     "at step mem_start)",
                     "note: --warmup_iters=9 is above --max_iters=2: the learning rate never reaches --lr=0.001",
                     "note: --niah_tasks, --niah_min_len unused: --dataset=pydoc does not read them"]
    run(tmp_path / "b", "--max_iters=2", "--mem_start=1", "--warmup_iters=2")  # each does something: no note
    assert "note: --" not in capsys.readouterr().out


def stat(busy0, idle0, busy1, idle1):
    """Two cores' /proc/stat: user (busy) and idle jiffies."""
    return (f"cpu  {busy0 + busy1} 0 0 {idle0 + idle1} 0 0 0 0 0 0\n"
            f"cpu0 {busy0} 0 0 {idle0} 0 0 0 0 0 0\ncpu1 {busy1} 0 0 {idle1} 0 0 0 0 0 0\n")


def test_free_cores_counts_the_idle_share_of_the_cores_now():
    for (before, after), free in (((stat(0, 0, 0, 0), stat(100, 0, 0, 100)), 1),   # one core busy
                                  ((stat(0, 0, 0, 0), stat(100, 0, 100, 0)), 1),   # both busy: still one
                                  ((stat(0, 0, 0, 0), stat(10, 90, 0, 100)), 2)):  # 5% busy
        reads = iter((before, after))
        assert train.free_cores(2, read_stat=lambda: next(reads)) == free
    reads = iter((stat(0, 0, 0, 0), stat(0, 100, 0, 100)))
    assert train.free_cores(1, read_stat=lambda: next(reads)) == 1  # never more than torch's threads


def test_cores_busy_with_other_work_are_left_to_it_unless_omp_num_threads_says(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "free_cores", lambda threads: 1)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        run(tmp_path / "a", "--max_iters=1")
        assert torch.get_num_threads() == 1
        assert ("note: other work keeps the cores busy: training on 1 of 2 threads; OMP_NUM_THREADS=N chooses "
                "instead") in capsys.readouterr().out
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        run(tmp_path / "b", "--max_iters=1")
        assert torch.get_num_threads() == 2 and "other work keeps" not in capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("module", ["sample", "experiments.niah_eval", "experiments.exposure", "lessons.hypergrad"])
def test_a_seed_out_of_range_or_an_abbreviated_flag_is_an_argparse_line(module, capsys):
    mod = importlib.import_module(module)
    with pytest.raises(SystemExit) as e:
        mod.main(["--out_dir=x", f"--seed={2 ** 70}"])
    assert e.value.code == 2 and f"argument --seed: {2 ** 70}: an integer within 0 and 2**32-1" in capsys.readouterr().err
    if module == "sample":  # argparse would read --temp as --temperature
        with pytest.raises(SystemExit):
            mod.main(["--temp=1"])
        assert "unrecognized arguments: --temp=1" in capsys.readouterr().err


def test_a_log_or_lock_that_is_not_a_regular_file_is_one_line(copy):
    os.replace(copy / "log.jsonl", copy / "log.saved")
    (copy / "log.jsonl").mkdir()
    with pytest.raises(SystemExit, match=r"log.jsonl is not a regular file: move it out of --out_dir"):
        run(copy, "--max_iters=12", "--resume=True")
    (copy / "log.jsonl").rmdir()
    os.mkfifo(copy / "log.jsonl")  # opening it would block
    with pytest.raises(SystemExit, match=r"log.jsonl is not a regular file"):
        run(copy, "--max_iters=12", "--resume=True")
    os.remove(copy / "log.jsonl")
    os.replace(copy / "log.saved", copy / "log.jsonl")
    (copy / "train.lock").mkdir()
    with pytest.raises(SystemExit, match=r"train.lock is not a lock file train.py wrote \(not a regular file\)"):
        run(copy, "--max_iters=12", "--resume=True")
    assert (copy / "train.lock").is_dir() and sorted(os.listdir(copy)) == ["ckpt.pt", "log.jsonl", "train.lock"]


def test_resuming_a_checkpoint_with_integer_weights_or_into_itself_is_refused(copy, tmp_path):
    with pytest.raises(SystemExit, match=r"^--init_from=\S+ is the --out_dir: fine-tune into another --out_dir"):
        run(copy, f"--init_from={copy}", "--overwrite=True")
    assert (copy / "ckpt.pt").exists() and not (copy / "ckpt.pt.before-overwrite").exists()
    ckpt = torch.load(copy / "ckpt.pt", weights_only=True)
    ckpt["model"]["lm_head.weight"] = ckpt["model"]["lm_head.weight"].long()
    torch.save(ckpt, copy / "ckpt.pt")
    with pytest.raises(SystemExit, match=r"weight lm_head.weight is not floating point .*: cannot resume: train again$"):
        run(copy, "--max_iters=12", "--resume=True")
    with pytest.raises(SystemExit, match=r"cannot fine-tune from it: train again$"):
        run(tmp_path / "ft", f"--init_from={copy}")


def test_a_rank_outside_the_world_is_one_line(tmp_path, monkeypatch):
    for k, v in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit, match=r"^RANK=1 with WORLD_SIZE=1: ranks run from 0 to WORLD_SIZE-1"):
        run(tmp_path / "r", "--max_iters=2")  # init_process_group would wait for rank 0 forever


def test_max_iters_0_says_the_checkpoint_holds_untrained_weights(tmp_path, capsys):
    run(tmp_path, "--max_iters=0")
    assert f"note: --max_iters=0 trains no step: {tmp_path / 'ckpt.pt'} will hold the initial weights" in \
        capsys.readouterr().out
    assert read_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 0


def test_notes_for_a_dtype_the_cpu_ignores_and_a_resume_with_nothing_left(copy, capsys):
    run(copy, "--max_iters=10", "--resume=True", "--dtype=float16")
    out = capsys.readouterr().out
    assert "note: --dtype=float16 sets the GPU's autocast; the CPU trains in float32" in out
    assert "note: the checkpoint is at step 10 and --max_iters=10: nothing is left to train (raise --max_iters" in out


# ---- the inference and evaluation scripts: inputs a careless user gives -----------------------

@pytest.fixture(scope="module")
def needle(tmp_path_factory):
    d = tmp_path_factory.mktemp("needle") / "run"
    train.main(["--config", "niah_tiny", f"--out_dir={d}", "--max_iters=1", "--eval_iters=1"])
    return d


@pytest.fixture(scope="module")
def chunked(tmp_path_factory):
    d = tmp_path_factory.mktemp("chunked") / "run"
    run(d, "--max_iters=1", "--attn_chunk=16")
    return d


def test_sample_refuses_a_random_threshold_bytes_that_are_not_utf8_and_a_checkpoint_as_out_dir(base, chunked):
    argv = [f"--out_dir={base}", "--prompt=Hi", "--device=cpu"]
    with pytest.raises(SystemExit, match=r"^--threshold reveals the tokens the model is sure of: it needs "
                                         r"--remasking=low_confidence, not random$"):
        sample.main(argv + ["--threshold=0.5", "--remasking=random"])
    with pytest.raises(SystemExit, match=r"^--prompt holds bytes that are not UTF-8 text"):  # as the shell passes \xff
        sample.main([f"--out_dir={base}", "--prompt=abc" + b"\xff".decode("utf-8", "surrogateescape"), "--device=cpu"])
    with pytest.raises(SystemExit, match=rf"^{re.escape(str(base / 'ckpt.pt'))} is a file: give the run's directory "
                                         rf"\({re.escape(str(base))}\), not its checkpoint$"):
        sample.main([f"--out_dir={base / 'ckpt.pt'}", "--prompt=Hi", "--device=cpu"])
    with pytest.raises(SystemExit, match=r"^--prefix_cache attends to a whole prefix: .*attn_chunk=16$"):
        sample.main([f"--out_dir={chunked}", "--prompt=Hi", "--device=cpu", "--prefix_cache"])


def test_the_default_needle_prompt_leaves_room_for_the_answer(needle, capsys):
    for seed in range(3):
        sample.main([f"--out_dir={needle}", "--device=cpu", f"--seed={seed}"])
        out, err = capsys.readouterr()
        assert "a needle example" in out and "exceeds the training context" not in err


@pytest.mark.parametrize("script", ["niah_eval", "exposure", "bench"])
def test_every_script_that_loads_a_model_refuses_non_finite_weights(needle, base, tmp_path, script):
    from experiments import exposure
    src = needle if script != "bench" else base
    ckpt = torch.load(src / "ckpt.pt", weights_only=True)
    ckpt["model"]["lm_head.weight"][0, 0] = math.nan
    torch.save(ckpt, tmp_path / "ckpt.pt")
    argv = {"niah_eval": [f"--out_dir={tmp_path}", "--device=cpu", "--tasks=single", "--lengths=100", "--n=1"],
            "exposure": [f"--out_dir={tmp_path}", "--device=cpu", "--n=1"],
            "bench": [f"--sample_from={tmp_path}", "--device=cpu"]}[script]
    main = {"niah_eval": niah_eval.main, "exposure": exposure.main, "bench": bench.main}[script]
    with pytest.raises(SystemExit, match=r"weight lm_head.weight is not finite .*: cannot (evaluate|benchmark): train again$"):
        main(argv)


def test_niah_eval_refuses_a_kept_checkpoint_a_run_twice_an_unused_budget_and_an_earlier_heatmap(
        needle, tmp_path, monkeypatch, capsys):
    def evaluated(*a, **k):
        raise AssertionError("the evaluation ran")
    monkeypatch.setattr(niah_eval, "generate", evaluated)
    argv = [f"--out_dir={needle}", "--device=cpu", "--tasks=single", "--lengths=200", "--n=1"]
    kept = tmp_path / "ckpt.pt.before-overwrite"
    kept.write_bytes(b"an earlier run")
    with pytest.raises(SystemExit, match=r"is a training run's file \(checkpoint or log\)"):
        niah_eval.main(argv + [f"--json={kept}", "--overwrite"])
    assert kept.read_bytes() == b"an earlier run"
    with pytest.raises(SystemExit, match=rf"^--out_dir: {re.escape(str(needle))}/ is named twice: give each checkpoint once$"):
        niah_eval.main(argv + [f"{needle}/"])
    with pytest.raises(SystemExit, match=r"^--adapt_steps sets the memory of --adapt=on or both .*leave it out with --adapt=off$"):
        niah_eval.main(argv + ["--adapt=off", "--adapt_steps=5"])
    (needle / "niah_base.png").write_bytes(b"an earlier heatmap")
    try:
        with pytest.raises(SystemExit, match=r"^--plot: .*niah_base.png exists \(an earlier heatmap\): pass --overwrite"):
            niah_eval.main(argv + ["--adapt=off", "--plot", f"--json={tmp_path / 'r.json'}"])
    finally:
        os.remove(needle / "niah_base.png")
    with pytest.raises(AssertionError, match="the evaluation ran"):
        niah_eval.main(argv + ["--rope=none,ntk", f"--json={tmp_path / 'r.json'}"])
    assert "up to it the --rope rows equal the none rows" in capsys.readouterr().out


def test_exposure_refuses_one_file_for_two_outputs_and_a_figure_it_cannot_draw(needle, tmp_path):
    from experiments import exposure
    argv = [f"--out_dir={needle}", "--device=cpu", "--n=1", f"--json={tmp_path / 'e.json'}"]
    with pytest.raises(SystemExit, match=r"^--json and --md name the same file .*: give each its own$"):
        exposure.main(argv + [f"--md={tmp_path / 'e.json'}"])
    with pytest.raises(SystemExit, match=r"^--png=.*e.xyz: name a .png, .pdf or .svg file$"):
        exposure.main(argv + [f"--png={tmp_path / 'e.xyz'}"])
    assert not os.listdir(tmp_path)


def test_the_sampling_bench_skips_the_cache_for_chunks_and_names_what_it_leaves_out(chunked, capsys):
    bench.main([f"--sample_from={chunked}", "--prompt_lens=40", "--gen_len=32", "--block=8", "--sample_batch=1",
                "--device=cpu", "--sdpa=math", "--steps=3"])
    out = capsys.readouterr().out
    assert out.startswith("note: --sample_from times the sampler alone; --sdpa, --steps set the training benchmark "
                          "and are left out\n")
    assert "note: the model trained at block_size=64; prompts of up to 40 tokens and 32 generated run past it" in out
    assert "| 40 | prefix cache | | | not for attn_chunk=16 (the cache attends to a whole prefix) |" in out


def test_reach_refuses_two_runs_of_one_name_and_names_the_seeds_it_has(tmp_path):
    from experiments import reach
    (tmp_path / "s1").mkdir()
    row = dict(out_dir="a/ft_mem", adapt=False, view="plain", rope="none", samples=[])
    args = dict(tasks=[], lengths=[], n=0, depths=[0], seed=0, haystack="noise")
    (tmp_path / "s1" / "reach.json").write_text(json.dumps(dict(args=args, answer_len=8, forms="fixed",
                                                                rows=[row, {**row, "out_dir": "b/ft_mem"}])))
    with pytest.raises(SystemExit, match=r"reach.json: two checkpoints are named ft_mem: .*distinct names$"):
        reach.main([f"--root={tmp_path}"])
    with pytest.raises(SystemExit, match=rf"^--seeds=7: no reach.json in those seeds' directories; {re.escape(str(tmp_path))} has s1$"):
        reach.main([f"--root={tmp_path}", "--seeds=7"])


def test_a_master_port_out_of_range_or_taken_is_one_line(tmp_path, monkeypatch):
    env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MASTER_PORT", "99999")
    with pytest.raises(SystemExit, match=r"^MASTER_PORT=99999: a port within 1 and 65535"):
        run(tmp_path / "r", "--max_iters=2")
    with socket.socket() as held:  # another process listens on the port rank 0 would take
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        monkeypatch.setenv("MASTER_PORT", str(port))
        with no_hang(30), pytest.raises(SystemExit, match=rf"^the ranks cannot meet at 127.0.0.1:{port} \(.*EADDRINUSE.*\): "
                                                          rf"another process holds MASTER_PORT={port}; pass torchrun "
                                                          r"another --master_port$"):
            run(tmp_path / "r", "--max_iters=2")
    assert not (tmp_path / "r").exists()


def test_two_presets_and_a_size_past_any_machine_are_one_line():
    with pytest.raises(SystemExit, match=r"^--config is given 2 times \(tiny, niah_tiny\): pick one preset"):
        train.parse_config(["--config", "tiny", "--config=niah_tiny"])
    with pytest.raises(SystemExit, match=r"^--batch_size=\d+: too large for any machine to allocate$"):
        train.parse_config(["--config", "tiny", f"--batch_size={10**23}"])


def test_a_chunk_over_the_window_and_mem_start_without_memory_are_noted(tmp_path, capsys):
    run(tmp_path / "a", "--max_iters=1", "--attn_chunk=100", "--mem=False", "--mem_start=5")
    out = capsys.readouterr().out
    assert "note: --mem_start=5 unused: --mem=False trains plain MDLM at every step" in out
    assert ("note: --attn_chunk=100 is not below --block_size=64: training attends to the whole window; the chunks "
            "apply only to longer inputs at inference") in out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_a_stop_while_a_checkpoint_is_written_keeps_it(tmp_path, monkeypatch, sig):
    real, saves = train.save_checkpoint, []

    def signalled(path, obj):  # the signal arrives in the middle of the save
        saves.append(obj["step"])
        if obj["step"] == 5:
            os.kill(os.getpid(), sig)
        real(path, obj)
    monkeypatch.setattr(train, "save_checkpoint", signalled)
    with pytest.raises(SystemExit, match=r"^interrupted at step 5; the last checkpoint is step 5 \(.*ckpt.pt\): continue"):
        run(tmp_path / "r", "--max_iters=10", "--eval_interval=5", "--log_interval=5")
    assert saves == [0, 5] or saves == [5]
    assert read_checkpoint(str(tmp_path / "r" / "ckpt.pt"))["step"] == 5
