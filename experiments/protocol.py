"""The needle experiment over seeds in one command: the paper's protocol (a trained MDLM, then
fine-tunes with and without memory) and MemDLM from scratch, each evaluated with and without
inference-time memory, summarised over seeds with paired confidence intervals.

    python -m experiments.protocol --root=out-proto --config=niah_proto --seeds=1,2,3,4,5 --repeat=1 --deadline=540
    python -m experiments.protocol --root=out-proto --table_only

Per seed S, in root/sS/ (every run a `python train.py` or `python -m experiments.niah_eval` subprocess):
  base       MDLM from scratch (train.py --config C --mem=False --seed=S)
  ft_mdlm    base + F steps of MDLM (--init_from=base --max_iters=F, a fresh optimizer)
  ft_mem     base + F steps of MemDLM, scope response (the paper's)
  ft_prompt  base + F steps of MemDLM, scope prompt
  scratch    MemDLM from scratch, as many steps as the base
  base_repeat  with --repeat=S: seed S's base again, the same command (the run-to-run spread)
  niah_ft_<forms>.json, niah_scratch_<forms>.json   niah_eval --adapt=both on the runs above,
             once per surface form set (--forms: those trained on, and held-out ones)
  exposure.json   experiments.exposure on ft_mdlm and ft_mem (the exposure-bias ratio)
Jobs run on the visible GPUs, --per_gpu at a time on each (CUDA_VISIBLE_DEVICES), in order
of need. A job whose results exist is skipped; an interrupted training run resumes from its
last checkpoint. --deadline stops the jobs in time to write the tables: rerun the same command
to go on. Other --key=value arguments go to every train.py run.

Writes root/protocol.json (per seed: the base's onset step, the final losses, the needle
scores per row x task x length; MemDLM from scratch against the base: onsets and losses, paired;
the fine-tunes' eval losses against Standard MDLM, paired),
root/protocol.md (the tables), root/loss_curves.png, and
with experiments.exposure root/exposure.{json,md,png}; each job's output is in root/logs/.
"""

if not __package__:  # run as a file: the imports below need the repository root on the path
    raise SystemExit("run it from the repository root as a module: python -m experiments.protocol")

import argparse
import contextlib
import glob
import json
import math
import os
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch

from model import read_checkpoint, read_log
from niah import FORMS, parse_tasks
from experiments.common import fmt_diff, mean_stderr, paired

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: train.py's directory
STAGES = ("base", "repeat", "finetune", "scratch", "eval", "exposure")
# training runs: (stage, train.py arguments, starts from the base)
# (a fine-tune starts from a base that has seen every length: no length curriculum again)
FT = ["--niah_curriculum=0"]
RUNS = {
    "base": ("base", ["--mem=False"], False),
    "ft_mdlm": ("finetune", ["--mem=False", *FT], True),
    "ft_mem": ("finetune", ["--mem=True", "--mem_scope=response", *FT], True),
    "ft_prompt": ("finetune", ["--mem=True", "--mem_scope=prompt", *FT], True),
    "scratch": ("scratch", ["--mem=True", "--mem_scope=response"], False),
    "base_repeat": ("repeat", ["--mem=False"], False),  # the base again (--repeat): one seed's run-to-run spread
}
EVALS = {"ft": ("base", "ft_mdlm", "ft_mem", "ft_prompt"), "scratch": ("scratch",)}  # one niah_eval call each
OWN_KEYS = ("config", "mem", "mem_scope", "seed", "out_dir", "init_from", "resume", "max_iters")
# the table's rows: (run, adapt) and their names; the MemDLM rows are also compared with Standard MDLM
ROWS = (("base", False, "MDLM base (before fine-tuning)"), ("ft_mdlm", False, "Standard MDLM"),
        ("ft_mdlm", True, "Standard MDLM + adapt"), ("ft_mem", False, "MemDLM (Train-Only)"),
        ("ft_mem", True, "MemDLM (Train & Inference)"), ("ft_prompt", False, "MemDLM scope prompt (Train-Only)"),
        ("ft_prompt", True, "MemDLM scope prompt (Train & Inference)"),
        ("scratch", False, "MemDLM from scratch (Train-Only)"), ("scratch", True, "MemDLM from scratch (Train & Inference)"))
# each MemDLM row's MDLM counterpart: a fine-tune's is Standard MDLM, from scratch's the base (the same steps)
REFERENCE = {"ft_mem": "ft_mdlm", "ft_prompt": "ft_mdlm", "scratch": "base"}
SCOPES = {"ft_mem": "MemDLM scope response", "ft_prompt": "MemDLM scope prompt"}  # the fine-tunes with memory
ONSET_ACC = 0.9  # the base has learned retrieval at the first eval with eval_answer_acc >= this
# the bar a base preset must clear in every seed: each task >= LEARNED % in the trained range (the shortest
# length evaluated, forms `train`), and the onset within ONSET_SHARE of the base's steps
LEARNED, ONSET_SHARE = 95.0, 0.6
# ---------------------------------------------------------------------------------------
# What exists on disk

def is_file(path):
    """True when path is a regular file, False when nothing is there; anything else (a directory,
    a FIFO that opening would block on, a device) is one line."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(mode):
        raise SystemExit(f"{path} is not a regular file (a directory, FIFO or device): move it out of the "
                         f"protocol's root, then run the command again")
    return True


def ckpt_info(out_dir):
    """(step, train config) of out_dir/ckpt.pt, or None when there is none (read as tensors and
    plain values only: a checkpoint in the root runs no code)."""
    path = os.path.join(out_dir, "ckpt.pt")
    if not is_file(path):
        return None
    ckpt = read_checkpoint(path)
    return ckpt["step"], ckpt["config"]


def run_records(out_dir):
    """The train and eval records of out_dir/log.jsonl, one per step (a step logged again after
    a resume counts once, the last time), and the last summary record."""
    path = os.path.join(out_dir, "log.jsonl")
    train, evals, summary = {}, {}, None
    for rec in read_log(path) if is_file(path) else []:
        if "summary" in rec:
            summary = rec["summary"] if isinstance(rec["summary"], dict) else summary
        elif isinstance(rec.get("loss"), (int, float)):
            train[rec["step"]] = rec
        elif isinstance(rec.get("eval_loss"), (int, float)):
            evals[rec["step"]] = rec
    return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)], summary


def onset(evals, key="eval_answer_acc"):
    """The first eval step with `key` (the answer accuracy, pooled or of one task) >= ONSET_ACC, or None."""
    return next((r["step"] for r in evals if r.get(key, 0) >= ONSET_ACC), None)


def task_onsets(evals):
    """{task: onset} of each task whose answer accuracy the log holds (eval_answer_acc_<task>)."""
    keys = sorted({k for r in evals for k in r if k.startswith("eval_answer_acc_")})
    return {k[len("eval_answer_acc_"):]: onset(evals, k) for k in keys}


def learned(seed):
    """The base against the bar: its scores at the shortest evaluated length, forms `train`, then
    whether every task reaches LEARNED and whether the onset comes within ONSET_SHARE of its steps."""
    scores, base = seed["niah"].get("train", {}).get("base"), seed["runs"].get("base")
    if not scores or not base:
        return None
    length = min(int(L) for by_len in scores.values() for L in by_len)
    at = {t: by_len[str(length)] for t, by_len in scores.items()}
    return {"length": length, "scores": at, "tasks": all(v >= LEARNED for v in at.values()),
            "onset": base["onset"] is not None and base["onset"] <= ONSET_SHARE * base["final_step"]}


def fmt_acc(run):
    """A run's last answer accuracy for the tables ("-" when its log has none)."""
    return f"{run['eval_answer_acc']:.3f}" if "eval_answer_acc" in run else "-"


def fmt_onset(run):
    """A run's onset for the table (None: no such run): pooled, then per task where logged."""
    run, fmt = run or {}, lambda step: "none" if step is None else str(step)
    tasks = ", ".join(f"{t} {fmt(v)}" for t, v in run.get("task_onsets", {}).items())
    return fmt(run.get("onset")) + (f" ({tasks})" if tasks else "")


# ---------------------------------------------------------------------------------------
# Jobs

@dataclass
class Job:
    name: str
    stage: str
    deps: list
    argv: callable            # the command, built at launch (it depends on what exists then)
    done: callable            # True when the results exist
    note: callable = field(default=lambda: "")  # a word on the launch (resume from step ...)
    wanted: bool = True       # in --stages; a job left out still counts when its results exist


def train_job(a, seed, run, extras):
    stage, flags, from_base = RUNS[run]
    sdir = os.path.join(a.root, f"s{seed}")
    out = os.path.join(sdir, run)
    iters = a.ft_iters if from_base else a.base_iters

    def state():
        info = ckpt_info(out)
        if info is None:
            return None
        return info[0], (iters or info[1]["max_iters"])

    def argv():
        cmd = [sys.executable, "train.py", "--config", a.config, *extras, *flags,
               f"--seed={seed}", f"--out_dir={out}"]
        cmd += [f"--max_iters={iters}"] if iters else []
        if state():  # an interrupted run (a fine-tune too) continues from its own checkpoint
            return cmd + ["--resume=True"]
        # a log with no checkpoint: this job's run, stopped before its first checkpoint; start it again
        again = ["--overwrite=True"] if os.path.lexists(os.path.join(out, "log.jsonl")) else []
        return cmd + again + ([f"--init_from={os.path.join(sdir, 'base')}"] if from_base else [])

    def done():
        s = state()
        return s is not None and s[0] >= s[1]

    def note():
        s = state()
        return f"resumes at step {s[0]}" if s else ""
    return Job(f"s{seed}/{run}", stage, [f"s{seed}/base"] if from_base else [], argv, done, note)


def eval_job(a, seed, group, forms):
    sdir = os.path.join(a.root, f"s{seed}")
    dirs = [os.path.join(sdir, r) for r in EVALS[group]]
    path = os.path.join(sdir, f"niah_{group}_{forms}.json")

    def argv():
        cfg = ckpt_info(dirs[0])[1]
        T = cfg["block_size"]
        lengths = a.lengths or f"{T},{2 * T}"  # the longest training rows, and twice as long
        return [sys.executable, "-m", "experiments.niah_eval", "--out_dir", *dirs, "--adapt=both",
                f"--tasks={a.tasks or cfg['niah_tasks']}", f"--lengths={lengths}", f"--n={a.n}",
                f"--forms={forms}", f"--batch_size={a.eval_batch}", f"--json={path}",
                "--overwrite"]  # rerun only when a checkpoint is newer than the results (newer): they are stale
    return Job(f"s{seed}/niah_{group}_{forms}", "eval", [f"s{seed}/{r}" for r in EVALS[group]], argv,
               lambda: newer(path, dirs))


def exposure_job(a, seed):
    sdir = os.path.join(a.root, f"s{seed}")
    dirs = [os.path.join(sdir, r) for r in ("ft_mdlm", "ft_mem")]
    path = os.path.join(sdir, "exposure.json")

    def argv():
        return [sys.executable, "-m", "experiments.exposure", "--out_dir", *dirs, f"--n={a.exposure_n}",
                f"--json={path}", "--overwrite"]
    return Job(f"s{seed}/exposure", "exposure", [f"s{seed}/ft_mdlm", f"s{seed}/ft_mem"], argv,
               lambda: newer(path, dirs))


def newer(path, dirs):
    """path exists and is newer than every checkpoint in dirs."""
    return is_file(path) and all(os.path.getmtime(path) >= os.path.getmtime(os.path.join(d, "ckpt.pt"))
                                        for d in dirs if os.path.exists(os.path.join(d, "ckpt.pt")))


def plan(a, extras):
    """Every job of the protocol, in order of preference: the bases first (everything else
    waits for them), the fine-tunes and their evaluations, then MemDLM from scratch."""
    seeds, forms = a.seeds, a.forms.split(",")
    jobs = [train_job(a, s, "base", extras) for s in seeds]
    jobs += [train_job(a, s, "base_repeat", extras) for s in a.repeat]
    jobs += [train_job(a, s, r, extras) for s in seeds for r in ("ft_mdlm", "ft_mem", "ft_prompt")]
    jobs += [eval_job(a, s, "ft", f) for s in seeds for f in forms] + [exposure_job(a, s) for s in seeds]
    jobs += [train_job(a, s, "scratch", extras) for s in seeds]
    jobs += [eval_job(a, s, "scratch", f) for s in seeds for f in forms]
    for j in jobs:
        j.wanted = j.stage in a.stages
    return jobs


def initial_state(jobs):
    """skipped (its results exist), excluded (not in --stages, no results) or pending."""
    return {j.name: "skipped" if j.done() else "pending" if j.wanted else "excluded" for j in jobs}


def run_jobs(jobs, slots, log_dir, deadline=None, poll=0.5):
    """Run each job not yet done once the jobs it needs are done, on a free slot (a GPU id, or
    None for no CUDA_VISIBLE_DEVICES), its output appended to log_dir/<name>.log. At the
    deadline (time.time() value) the running jobs are stopped. Returns {name: state}, state
    one of done, skipped (done before), excluded (not wanted), failed, blocked (a job it needs
    failed or is excluded), stopped (the deadline)."""
    os.makedirs(log_dir, exist_ok=True)
    state = initial_state(jobs)
    pending = [j for j in jobs if state[j.name] == "pending"]
    running = {}  # slot index -> (job, process, start time, log file)
    t_start = time.time()

    def say(msg):
        print(f"[{time.time() - t_start:6.0f} s] {msg}", flush=True)
    for name, s in state.items():
        if s == "skipped":
            say(f"skip {name}: done")
    try:
        while pending or running:
            for i, (job, proc, t0, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[i]
                state[job.name] = "done" if proc.returncode == 0 else "failed"
                say(f"{state[job.name]} {job.name} in {time.time() - t0:.0f} s" +
                    (f" (exit {proc.returncode}, see {log.name}):" if proc.returncode else ""))
                if proc.returncode:  # the error, the log's last lines (progress bars cut at their last update)
                    with open(log.name, errors="replace") as f:
                        tail = [ln.split("\r")[-1] for ln in f.read().splitlines() if ln.strip()][-3:]
                    print("\n".join("    " + ln for ln in tail), flush=True)
            if deadline is not None and time.time() >= deadline:
                for name in stop(running, state, "stopped"):
                    say(f"stopped {name} at the deadline (rerun to continue)")
                for job in pending:
                    state[job.name] = "stopped"
                break
            for job in list(pending):  # a job that can never run
                if any(state[d] in ("failed", "blocked", "excluded") for d in job.deps):
                    pending.remove(job)
                    state[job.name] = "blocked"
                    why = ", ".join(f"{d} ({'not in --stages' if state[d] == 'excluded' else state[d]})"
                                    for d in job.deps if state[d] in ("failed", "blocked", "excluded"))
                    say(f"blocked {job.name}: needs {why}")
            for i, slot in enumerate(slots):
                if i in running:
                    continue
                job = next((j for j in pending if all(state.get(d) in ("done", "skipped") for d in j.deps)), None)
                if job is None:
                    break
                pending.remove(job)
                note, argv = job.note(), job.argv()
                log_path = os.path.join(log_dir, job.name.replace("/", "_") + ".log")
                is_file(log_path)  # not a FIFO (opening it would block) or a directory
                log = open(log_path, "a")
                log.write(" ".join(argv) + "\n")
                log.flush()
                env = {**os.environ, "TQDM_MININTERVAL": "30"}  # a progress line every 30 s in the log, not 10 a second
                if slot is not None:
                    env["CUDA_VISIBLE_DEVICES"] = str(slot)
                running[i] = (job, subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT),
                              time.time(), log)
                say(f"start {job.name}" + ("" if slot is None else f" on GPU {slot}") + (f" ({note})" if note else ""))
            if running:
                time.sleep(poll)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (main turns it into this): the running jobs stop too
        names = stop(running, state, "interrupted")
        raise SystemExit("interrupted" + (f"; stopped {', '.join(names)}" if names else "") +
                         ": what finished is kept, and a stopped training run resumes from its last checkpoint: "
                         "run the same command again to go on") from None
    except BaseException:  # an error of the protocol itself leaves no job running unwatched
        stop(running, state, "stopped")
        raise
    return state


def stop(running, state, why):
    """SIGTERM to each running job, SIGKILL after 30 s; their logs closed; their names."""
    for job, proc, t0, log in running.values():
        with contextlib.suppress(OSError):
            proc.terminate()
    for job, proc, t0, log in running.values():
        try:
            proc.wait(timeout=30)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):  # a second Ctrl-C does not wait
            proc.kill()
            proc.wait()
        log.close()
        state[job.name] = why
    names = [job.name for job, *_ in running.values()]
    running.clear()
    return names


def visible_gpus():
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


# ---------------------------------------------------------------------------------------
# Results

def gather(root):
    """Everything on disk under root: per seed the runs' onset, final losses, and the needle
    scores {forms: {run or run+adapt: {task: {length: score in %}}}}, and the exposure results."""
    seeds = {}
    dirs = [d for d in glob.glob(os.path.join(root, "s*")) if os.path.isdir(d) and os.path.basename(d)[1:].isdigit()]
    for sdir in sorted(dirs, key=lambda d: int(os.path.basename(d)[1:])):
        name = os.path.basename(sdir)
        runs = {}
        for run in RUNS:
            _, evals, summary = run_records(os.path.join(sdir, run))
            if not evals:
                continue
            last = evals[-1]
            runs[run] = {"onset": onset(evals), "task_onsets": task_onsets(evals), "final_step": last["step"],
                         **{k: last[k] for k in ("eval_loss", "eval_loss_mem", "eval_answer_acc") if k in last},
                         **{k: (summary or {}).get(k) for k in ("train_loss", "wall_s", "device")}}
        niah = {}
        for path in sorted(glob.glob(os.path.join(sdir, "niah_*.json"))):
            if not is_file(path):
                continue
            try:
                with open(path) as f:
                    res = json.load(f)
                scores = {os.path.basename(os.path.normpath(r["out_dir"])) + ("+adapt" if r["adapt"] else ""):
                          {t: {L: 100 * c["mean"] for L, c in by_len.items()} for t, by_len in r["cells"].items()}
                          for r in res["rows"]}
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                print(f"note: {path} is not a niah_eval results file ({type(e).__name__}: {e}): left out of the "
                      f"tables; delete it and rerun the command to evaluate again")
                continue
            niah.setdefault(res.get("forms", "fixed"), {}).update(scores)
        exposure = os.path.join(sdir, "exposure.json")
        seed = {"onset": runs.get("base", {}).get("onset"), "runs": runs, "niah": niah,
                "exposure": exposure if is_file(exposure) else None}
        seeds[name[1:]] = {**seed, "learned": learned(seed)}
    return seeds


def score_tables(seeds):
    """{forms: {"columns": [(task, length)], "rows": {row name: {column: summary over seeds}},
    "diffs": {row name: {column: paired difference with Standard MDLM}}}}, scores in %."""
    out = {}
    for forms in sorted({f for s in seeds.values() for f in s["niah"]}):
        per_seed = {sid: s["niah"][forms] for sid, s in seeds.items() if forms in s["niah"]}
        cols = list(dict.fromkeys((t, L) for rows in per_seed.values() for r in rows.values() for t in r for L in r[t]))
        table = {"columns": [f"{t} {L}" for t, L in cols], "rows": {}, "diffs": {}}
        for run, adapt, label in ROWS:
            key = run + ("+adapt" if adapt else "")
            have = {sid: rows[key] for sid, rows in per_seed.items() if key in rows}
            if not have:
                continue
            table["rows"][label] = {f"{t} {L}": mean_stderr([r[t][L] for r in have.values()]) for t, L in cols}
            ref = REFERENCE.get(run)
            both = [sid for sid in have if ref in per_seed[sid]]
            if both:
                table["diffs"][label] = {f"{t} {L}": paired([have[s][t][L] for s in both],
                                                            [per_seed[s][ref][t][L] for s in both]) for t, L in cols}
        out[forms] = table
    return out


def scratch_pairs(seeds):
    """{seed: (MDLM base, MemDLM from scratch)} of the seeds that have both runs."""
    return {sid: (s["runs"]["base"], s["runs"]["scratch"]) for sid, s in seeds.items()
            if {"base", "scratch"} <= set(s["runs"])}


def from_scratch(seeds):
    """MemDLM from scratch against the MDLM base, the same steps (the paper's faster convergence and
    lower loss): per quantity, the paired difference scratch - base over the seeds where both runs
    have it (an onset: where both cross ONSET_ACC). None when no seed has both runs."""
    pairs = list(scratch_pairs(seeds).values())
    if not pairs:
        return None
    diff = lambda *get: paired_runs(pairs, *get)
    tasks = sorted(set.intersection(*(set(r["task_onsets"]) for p in pairs for r in p)))
    return {"onset": diff(lambda r: r["onset"]),
            **{f"onset_{t}": diff(lambda r, t=t: r["task_onsets"][t]) for t in tasks},
            "eval_loss": diff(lambda r: r["eval_loss"]),
            "eval_loss_mem": diff(lambda r: r["eval_loss"], lambda r: r.get("eval_loss_mem")),  # MDLM has no memory
            "eval_answer_acc": diff(lambda r: r.get("eval_answer_acc"))}


def paired_runs(pairs, get_ref, get_run=None):
    """The paired difference run - reference over (reference, run) records, of the pairs where
    both have the quantity (get_run reads the run's, when it differs from the reference's)."""
    got = [(get_ref(a), (get_run or get_ref)(b)) for a, b in pairs]
    got = [(x, y) for x, y in got if x is not None and y is not None]
    return paired([y for _, y in got], [x for x, _ in got]) if got else {"n": 0}


def finetune_losses(seeds):
    """The fine-tunes with memory against Standard MDLM on the final eval loss (the paper's lower
    loss): the base model alone and with memory, paired over seeds; below: in how many seeds the
    loss with memory is below MDLM's."""
    out = {}
    for run in SCOPES:
        pairs = [(s["runs"]["ft_mdlm"], s["runs"][run]) for s in seeds.values() if {"ft_mdlm", run} <= set(s["runs"])]
        if pairs:
            out[run] = {"eval_loss": paired_runs(pairs, lambda r: r["eval_loss"]),
                        "eval_loss_mem": paired_runs(pairs, lambda r: r["eval_loss"], lambda r: r.get("eval_loss_mem")),
                        "below": sum(m.get("eval_loss_mem", b["eval_loss"]) < b["eval_loss"] for b, m in pairs)}
    return out


def markdown(seeds, tables, exposure_md):
    lines = ["## Per seed", "", (f"Onset: the base's first eval with answer accuracy >= {ONSET_ACC} (pooled, and "
                                 "per task). Losses at the last eval (train loss: the mean of the last log steps; "
                                 "MemDLM's eval loss is its base model alone, with memory in parentheses)."), ""]
    runs = [r for r in RUNS if any(r in s["runs"] for s in seeds.values())]
    lines += ["| seed | onset | " + " | ".join(f"{r} train / eval (mem) / acc" for r in runs) + " |",
              "|---|---|" + "---|" * len(runs)]
    for sid, s in seeds.items():
        cells = []
        for r in runs:
            v = s["runs"].get(r)
            if v is None:
                cells.append("-")
                continue
            mem = f" ({v['eval_loss_mem']:.3f})" if "eval_loss_mem" in v else ""
            train = "-" if v["train_loss"] is None else f"{v['train_loss']:.3f}"
            cells.append(f"{train} / {v['eval_loss']:.3f}{mem} / {fmt_acc(v)} @{v['final_step']}")
        lines.append(f"| {sid} | {fmt_onset(s['runs'].get('base'))} | " + " | ".join(cells) + " |")
    bar = {sid: s["learned"] for sid, s in seeds.items() if s.get("learned")}
    if bar:
        yes = lambda ok: "yes" if ok else "no"
        length = next(iter(bar.values()))["length"]
        lines += ["", (f"The base against the bar: every task >= {LEARNED:.0f}% at {length} tokens (forms `train`), "
                       f"the onset within {ONSET_SHARE:.0%} of its steps. Met by "
                       f"{sum(b['tasks'] and b['onset'] for b in bar.values())} of {len(bar)} seeds."), "",
                  f"| seed | base at {length} (%) | every task >= {LEARNED:.0f} | onset within {ONSET_SHARE:.0%} |",
                  "|---|---|---|---|"]
        lines += [f"| {sid} | " + ", ".join(f"{t} {v:.1f}" for t, v in b["scores"].items()) +
                  f" | {yes(b['tasks'])} | {yes(b['onset'])} |" for sid, b in bar.items()]
    for sid, s in seeds.items():  # --repeat: the same base trained twice
        if {"base", "base_repeat"} <= set(s["runs"]):
            r = [s["runs"][k] for k in ("base", "base_repeat")]
            lines += ["", f"Run-to-run spread, seed {sid} (the base twice, one command): onset "
                          f"{fmt_onset(r[0])} vs {fmt_onset(r[1])}; eval loss {r[0]['eval_loss']:.3f} vs "
                          f"{r[1]['eval_loss']:.3f}; answer accuracy {fmt_acc(r[0])} vs {fmt_acc(r[1])}."]
    if scratch := from_scratch(seeds):
        lines += ["", "## From scratch: MemDLM against the MDLM base, the same steps", "",
                  "| seed | onset MDLM | onset MemDLM | eval loss MDLM | MemDLM alone (with memory) | "
                  "answer acc MDLM | MemDLM |", "|---|---|---|---|---|---|---|"]
        for sid, (b, m) in scratch_pairs(seeds).items():
            lines.append(f"| {sid} | {fmt_onset(b)} | {fmt_onset(m)} | {b['eval_loss']:.3f} | {m['eval_loss']:.3f} "
                         f"({m.get('eval_loss_mem', float('nan')):.3f}) | {fmt_acc(b)} | {fmt_acc(m)} |")
        names = {"eval_loss": ("eval loss, base model alone", ".4f"), "eval_answer_acc": ("answer accuracy", ".3f"),
                 "eval_loss_mem": ("eval loss, MemDLM with memory", ".4f")}
        parts = []
        for k, d in scratch.items():
            if k.startswith("onset"):  # onset (pooled) or onset_<task>
                what = "onset step" + (f" of {k[len('onset_'):]}" if k != "onset" else "")
                parts.append(f"{what} {fmt_diff(d, '.0f')} over {d['n']} seeds")
            else:
                parts.append(f"{names[k][0]} {fmt_diff(d, names[k][1])}")
        lines += ["", "MemDLM - MDLM, mean [95% t interval over seeds; onsets over the seeds where both cross]: " +
                  "; ".join(parts) + "."]
    if ft := finetune_losses(seeds):
        lines += ["", "## Eval loss after fine-tuning: MemDLM - Standard MDLM", "",
                  "Mean [95% t interval over seeds]; tie: the interval contains 0.", "",
                  "| fine-tune | base model alone | with memory | seeds with memory below MDLM |", "|---|---|---|---|"]
        lines += [f"| {SCOPES[run]} | {fmt_diff(d['eval_loss'], '.4f')} | {fmt_diff(d['eval_loss_mem'], '.4f')} | "
                  f"{d['below']} of {d['eval_loss']['n']} |" for run, d in ft.items()]
    for forms, t in tables.items():
        cols = t["columns"]
        head = ["| row | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        lines += ["", f"## Needle scores, forms `{forms}` (%, mean ± standard error over seeds)", ""] + head
        for label, cells in t["rows"].items():
            lines.append(f"| {label} (n={cells[cols[0]]['n']}) | " +
                         " | ".join(f"{c['mean']:.1f} ± {c['stderr']:.1f}" for c in cells.values()) + " |")
        if t["diffs"]:
            lines += ["", (f"Paired difference with MDLM, forms `{forms}` (points, mean [95% t interval over "
                           "seeds]; tie: the interval contains 0): a fine-tune minus Standard MDLM, MemDLM from "
                           "scratch minus the MDLM base (the same steps)"), ""] + head
            lines += [f"| {label} | " + " | ".join(fmt_diff(d) for d in cells.values()) + " |"
                      for label, cells in t["diffs"].items()]
    if exposure_md:
        lines += ["", "## Exposure-bias ratio", "", exposure_md]
    return "\n".join(lines) + "\n"


def plot_losses(root, seeds, path):
    """Paper Fig. 4: train loss and eval loss (base alone; MemDLM also with memory) against
    steps, MDLM vs MemDLM, fine-tuned and from scratch: the mean over seeds, seeds faint."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pairs = (("fine-tune", "ft_mdlm", "ft_mem"), ("from scratch", "base", "scratch"))
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for col, (title, mdlm, mem) in enumerate(pairs):
        for row, kind in enumerate(("train", "eval")):
            ax = axes[row, col]
            lines = [(mdlm, "loss" if kind == "train" else "eval_loss", "MDLM", "C0", "-"),
                     (mem, "loss" if kind == "train" else "eval_loss", "MemDLM" + ("" if kind == "train" else " (base alone)"), "C3", "-")]
            if kind == "eval":
                lines.append((mem, "eval_loss_mem", "MemDLM (with memory)", "C3", "--"))
            for run, key, label, color, style in lines:
                curves = []
                for sid in seeds:
                    train, evals, _ = run_records(os.path.join(root, f"s{sid}", run))
                    recs = train if kind == "train" else evals
                    curve = {r["step"]: r[key] for r in recs if key in r}
                    if curve:
                        curves.append(curve)
                        ax.plot(list(curve), list(curve.values()), color=color, ls=style, alpha=0.2, lw=0.8)
                steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
                if steps:
                    ax.plot(steps, [sum(c[s] for c in curves) / len(curves) for s in steps], color=color, ls=style,
                            lw=2, label=f"{label} (mean of {len(curves)})")
            ax.set(title=f"{title}: {kind} loss", xlabel="step", ylabel=f"{kind} loss", yscale="log")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(root, seeds):
    """root's results into protocol.json and protocol.md (printed), the loss curves and,
    through experiments.exposure, the exposure-bias summary."""
    exposure_files = [s["exposure"] for s in seeds.values() if s["exposure"]]
    exposure_md = None
    if exposure_files:
        md = os.path.join(root, "exposure.md")
        done = subprocess.run([sys.executable, "-m", "experiments.exposure", "--summary", *exposure_files,
                               f"--json={os.path.join(root, 'exposure.json')}", f"--md={md}",
                               f"--png={os.path.join(root, 'exposure.png')}"], cwd=ROOT, check=False)
        if done.returncode == 0:
            with open(md) as f:
                exposure_md = f.read()
        else:
            print("note: the exposure summary failed (see above); the tables leave it out")
    tables = score_tables(seeds)
    base = ckpt_info(os.path.join(root, f"s{next(iter(seeds))}", "base"))  # the settings, for the record
    with open(os.path.join(root, "protocol.json"), "w") as f:
        json.dump({"root": root, "base_config": base and base[1], "seeds": seeds, "tables": tables,
                   "from_scratch": from_scratch(seeds), "finetune_losses": finetune_losses(seeds)}, f, indent=1)
    text = markdown(seeds, tables, exposure_md)
    with open(os.path.join(root, "protocol.md"), "w") as f:
        f.write(text)
    print(text)
    try:
        plot_losses(root, seeds, os.path.join(root, "loss_curves.png"))
        print(f"wrote {os.path.join(root, 'loss_curves.png')}")
    except ImportError:
        print("note: the loss-curve figure needs matplotlib (pip install matplotlib); none written")
    print(f"wrote {os.path.join(root, 'protocol.json')} and protocol.md")


SEED_MAX = 2**32 - 1  # train.py's generators take seed * 1_000_003 + ...: within torch's 64-bit seeds


def check_seeds(a):
    """Seeds in range, each once (a seed named twice would run its jobs twice, at once with
    --per_gpu > 1, into one log); --repeat seeds among --seeds."""
    for key in ("seeds", "repeat"):
        seeds = getattr(a, key)
        if bad := [s for s in seeds if not 0 <= s <= SEED_MAX]:
            raise SystemExit(f"--{key}: seed {bad[0]} is out of range: seeds are integers from 0 to {SEED_MAX}")
        if len(set(seeds)) < len(seeds):
            twice = sorted({s for s in seeds if seeds.count(s) > 1})
            setattr(a, key, list(dict.fromkeys(seeds)))
            print(f"note: --{key} names seed{'s' * (len(twice) > 1)} {', '.join(map(str, twice))} more than once: "
                  f"each runs once (--{key}={','.join(map(str, getattr(a, key)))})")
    if not a.seeds:
        raise SystemExit("--seeds: give at least one seed, e.g. --seeds=1,2,3")
    if bad := [s for s in a.repeat if s not in a.seeds]:
        raise SystemExit(f"--repeat: seed {bad[0]} is not in --seeds: the repeat is compared with that seed's base")


def seed_list(s):
    """'1,2,3' -> [1, 2, 3] (argparse type); '' -> []."""
    try:
        return [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{s}' is not a comma list of integers, e.g. 1,2,3") from None


def check_root(root):
    """root is a directory this process can write, or can be made one."""
    probe = root
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise SystemExit(f"--root={root}: {probe} is a file, not a directory: choose another --root")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SystemExit(f"--root={root}: {probe} is not writable: choose another --root")


def check_train_args(a, extras):
    """--config and the other --key=value settings as train.py reads them, checked now (in a
    child process: a script never imports a script) rather than by the first job."""
    code = "import sys, train; print(train.parse_config(sys.argv[1:])['dataset'])"
    done = subprocess.run([sys.executable, "-c", code, "--config", a.config, *extras], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode:
        lines = (done.stderr or done.stdout).strip().splitlines() or [f"exit {done.returncode}"]
        raise SystemExit(f"train.py refuses these settings: {lines[-1]}")
    dataset = done.stdout.strip().splitlines()[-1]
    if dataset != "niah":
        raise SystemExit(f"--config={a.config} trains on text (dataset {dataset}): the protocol trains and evaluates "
                         f"needle checkpoints; use --config=niah_proto, niah or niah_tiny (or --dataset=niah)")


def check_eval_args(a):
    """The niah_eval settings, checked now rather than when the evaluations start, hours later."""
    if bad := [f for f in a.forms.split(",") if f not in FORMS]:
        raise SystemExit(f"--forms: unknown surface forms '{bad[0]}': a comma list of {', '.join(FORMS)}")
    if a.tasks:
        try:
            parse_tasks(a.tasks)
        except ValueError as e:
            raise SystemExit(f"--tasks={a.tasks}: {e}") from None
    if a.lengths and not all(v.isdigit() and int(v) >= 1 for v in a.lengths.split(",")):
        raise SystemExit(f"--lengths={a.lengths}: a comma list of positive integers (tokens), e.g. 256,512")


def main(argv=None):
    """The command line; Ctrl-C and SIGTERM stop it (and the jobs it runs) in one line."""
    def terminated(signum, frame):
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGTERM, terminated)
    try:
        return _main(argv)
    except KeyboardInterrupt:  # outside the job loop: reading the results or writing the tables
        raise SystemExit("interrupted: nothing was running; the results on disk are kept: run the same command "
                         "again (or with --table_only) to write the tables") from None
    finally:
        signal.signal(signal.SIGTERM, old)


def _main(argv):
    p = argparse.ArgumentParser(description="The needle protocol over seeds: train, fine-tune, evaluate, tabulate.",
                                epilog="Other --key=value arguments are passed to every train.py run.",
                                allow_abbrev=False)  # --seed=3 is not --seeds=3
    p.add_argument("--root", required=True, help="directory of all runs and results")
    p.add_argument("--seeds", type=seed_list, default=[1, 2, 3, 4, 5])
    p.add_argument("--repeat", type=seed_list, default=[], help="seeds whose base runs twice, the same command: "
                                                              "the spread of one seed from run to run")
    p.add_argument("--config", default="niah_proto", help="train.py preset")
    p.add_argument("--base_iters", type=int, default=None, help="steps of the base and of scratch (default: the preset's)")
    p.add_argument("--ft_iters", type=int, default=1000, help="steps of each fine-tune")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)}")
    p.add_argument("--gpus", default=None, help="comma list of GPU ids (default: the visible ones; --gpus= empty: the CPU)")
    p.add_argument("--per_gpu", type=int, default=1, help="jobs at a time on each GPU")
    p.add_argument("--tasks", default=None, help="niah_eval --tasks (default: the tasks trained)")
    p.add_argument("--lengths", default=None, help="niah_eval --lengths (default: block_size and twice it)")
    p.add_argument("--forms", default="train,heldout", help="surface forms to evaluate, one niah_eval call each")
    p.add_argument("--n", type=int, default=100, help="niah.py examples per task and length")
    p.add_argument("--eval_batch", type=int, default=250, help="niah_eval --batch_size")
    p.add_argument("--exposure_n", type=int, default=256, help="experiments.exposure rows")
    p.add_argument("--deadline", type=float, default=None, help="seconds: stop the jobs then and write the tables")
    p.add_argument("--table_only", action="store_true", help="only gather the results on disk into the tables")
    p.add_argument("--dry_run", action="store_true", help="print each job's state and command, run nothing")
    a, extras = p.parse_known_args(argv)
    a.root = os.path.abspath(a.root)
    a.stages = a.stages.split(",")
    for e in extras:
        key = e[2:].split("=", 1)[0]
        if not e.startswith("--") or "=" not in e:
            raise SystemExit(f"unknown argument '{e}': train.py settings are written --key=value")
        near = [o for act in p._actions for o in act.option_strings if o.startswith(f"--{key}")]
        if near and key not in OWN_KEYS:
            raise SystemExit(f"--{key} is not a protocol option (abbreviations are not read): write {near[0]}")
        if key in OWN_KEYS:
            raise SystemExit(f"--{key} is set by the protocol for each run: use --seeds, --config, --base_iters or "
                             f"--ft_iters instead")
    if bad := [s for s in a.stages if s not in STAGES]:
        raise SystemExit(f"unknown stage '{bad[0]}': choose from {', '.join(STAGES)}")
    if a.per_gpu < 1 or a.n < 1 or a.ft_iters < 1 or (a.base_iters is not None and a.base_iters < 1):
        raise SystemExit("--per_gpu, --n, --ft_iters and --base_iters must be >= 1")
    if a.eval_batch < 1 or a.exposure_n < 1:
        raise SystemExit("--eval_batch and --exposure_n must be >= 1")
    if a.deadline is not None and not 0 < a.deadline < math.inf:
        raise SystemExit(f"--deadline={a.deadline}: seconds, a finite number > 0")
    if a.gpus is not None and a.gpus.strip() and not all(g.strip().isdigit() for g in a.gpus.split(",")):
        raise SystemExit(f"--gpus={a.gpus}: a comma list of GPU ids such as 0,1 (--gpus= for the CPU)")
    if a.gpus and a.gpus.strip() and not torch.cuda.is_available():
        raise SystemExit(f"--gpus={a.gpus} but no CUDA GPU is visible: --gpus= (empty) runs the jobs on the CPU")
    check_seeds(a)
    check_root(a.root)
    check_eval_args(a)
    if a.table_only:
        seeds = gather(a.root)
        if not seeds:
            raise SystemExit(f"no results under {a.root}: run the protocol first (without --table_only)")
        return write_results(a.root, seeds)
    check_train_args(a, extras)
    jobs = plan(a, extras)
    if a.dry_run:
        state = initial_state(jobs)
        for j in jobs:
            waits = [d for d in j.deps if state[d] != "skipped"]
            what = f"waits for {', '.join(waits)}" if waits else (j.note() + ": " if j.note() else "") + " ".join(j.argv())
            print(f"{j.name}: {state[j.name]}" + ("" if state[j.name] == "skipped" else f", {what}"))
        return
    try:
        os.makedirs(os.path.join(a.root, "logs"), exist_ok=True)
    except OSError as e:
        raise SystemExit(f"--root={a.root}: cannot make its logs directory ({e.strerror or e}): "
                         f"choose another --root") from None
    gpus = visible_gpus() if a.gpus is None else [g.strip() for g in a.gpus.split(",") if a.gpus.strip()]
    slots = [g for _ in range(a.per_gpu) for g in gpus] or [None] * a.per_gpu
    print(f"{sum(j.wanted for j in jobs)} jobs on {len(slots)} slots ({', '.join(gpus) or 'the CPU'}, {a.per_gpu} each)")
    deadline = None if a.deadline is None else time.time() + a.deadline
    state = run_jobs(jobs, slots, os.path.join(a.root, "logs"), deadline)
    seeds = gather(a.root)
    if seeds:
        write_results(a.root, seeds)
    left = {k: v for k, v in state.items() if v not in ("done", "skipped", "excluded")}
    if left:
        print("not finished: " + ", ".join(f"{k} ({v})" for k, v in left.items()))
        sys.exit(1 if "failed" in left.values() else 2)


if __name__ == "__main__":
    main()
