"""Train a masked diffusion LM: plain MDLM (--mem=False) or MemDLM (--mem=True, default).

    python train.py --config small                  # one GPU, a few minutes
    python train.py --config tiny --mem=False       # CPU, seconds
    torchrun --nproc_per_node=2 train.py --config small

Every key of the preset can be overridden as --key=value, and every value is checked before
any work. Writes out_dir/ckpt.pt (atomically, never a non-finite model) and out_dir/log.jsonl;
--resume=True continues from the checkpoint, --overwrite=True lets a new run replace it.
Text data (a memmapped token file of data/<dataset>/) is built in; other sources register in
SOURCES (niah.py's needle rows: its keys, presets, checks and batches).
"""
import glob
import io
import json
import math
import os
import shlex
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

import niah
from data.tokenizer import check_tokenizer, get_encoding, open_split, windows
from memory import MemoryConfig, inner_step, memdlm_loss, memory_layers
from model import (DiffusionLM, ModelConfig, autocast, forward_process, load_model, mdlm_loss, pick_device,
                   KEPT_SUFFIX, check_weights, read_checkpoint, read_log, seeded_generator, sigterm_as_ctrl_c,
                   signal_handlers)

# data sources other than token files, by dataset name: each has its train config keys (defaults),
# presets, check(cfg) (stops with one line) and data(cfg, device) (batches as TextData's)
SOURCES = {"niah": niah.SOURCE}
MODEL_KEYS = ("block_size", "n_layer", "n_head", "n_embd", "attn_chunk")  # ModelConfig's fields train.py sets
DEFAULTS = dict(
    # I/O: out_dir holds one run (ckpt.pt, log.jsonl)
    out_dir="out",
    resume=False,          # continue the run in out_dir from its checkpoint
    overwrite=False,       # let a new run replace the run in out_dir (refused otherwise)
    init_from="",          # a new run starting from the weights of this out_dir's checkpoint
    # data
    dataset="pydoc",       # a directory of data/ with a prepare.py, or a name in SOURCES (niah)
    tokenizer="byte",      # byte (built in, 258 tokens) or a tiktoken encoding such as gpt2
    batch_size=64,         # sequences per step (per GPU under torchrun)
    # model: model.ModelConfig's (block_size: the training context; attn_chunk: 0 full attention)
    **{k: getattr(ModelConfig(), k) for k in MODEL_KEYS},
    # AdamW: linear warmup, then cosine decay to min_lr at max_iters
    max_iters=1500, lr=1e-3, min_lr=1e-4, warmup_iters=100,
    weight_decay=0.1, beta1=0.9, beta2=0.95,
    grad_clip=1.0,         # global gradient norm of the outer step
    # evaluation and logging
    eval_interval=250,     # steps between evaluations, each followed by a checkpoint
    eval_iters=20,         # batches per evaluation
    log_interval=25,       # steps between log lines (each reads the loss: one host sync)
    # system
    seed=1337,
    device="auto",         # auto, cpu, cuda or cuda:N
    dtype="bfloat16",      # autocast dtype on the GPU (bfloat16, float16 or float32); the CPU runs float32
    compile=True, compile_mode="default",  # torch.compile of the model (GPU only)
    data_workers=0,        # processes drawing training batches ahead of the loop (0: in the loop)
    # MemDLM
    mem=True,              # False: plain MDLM, no inner loop
    mem_start=0,           # MemDLM from this step on, MDLM before it (the paper fine-tunes a pretrained DLM)
    exact_hypergrad=False,  # Eq. 10 exact: differentiate through the inner updates (uncompiled, math attention)
    **{f"mem_{f.name}": f.default for f in fields(MemoryConfig)},  # mem_<field>: memory.MemoryConfig's
    # sampling: sample.py's defaults for this checkpoint, the block (decoded left to right) and temperature
    sample_block_len=32, sample_temperature=0.0,
    **{k: v for src in SOURCES.values() for k, v in src.defaults.items()},  # read when dataset names the source
)
PRESETS = {
    # ~14M parameters, the pydoc corpus, a few minutes on one GPU; MDLM for 1000 steps, then MemDLM
    # (the paper fine-tunes a pretrained DLM: from scratch the memory absorbs the targets)
    "small": dict(mem_start=1000, compile_mode="reduce-overhead"),  # CUDA graphs: small steps are launch-bound
    # ~100M parameters at 1K context: for benchmarks and for users with several GPUs
    "base": dict(out_dir="out-base", block_size=1024, batch_size=32, max_iters=5000, n_layer=14, n_head=12,
                 n_embd=768, lr=6e-4, min_lr=6e-5, warmup_iters=200, eval_interval=500),
    # a 2-core laptop in under 10 minutes, one core busy or not: ~0.9M parameters, 64-token windows,
    # MDLM for 1900 steps then 300 MemDLM steps (longer MemDLM can let the memory take over). Its samples
    # decode in blocks of 4 tokens at temperature 1: in a longer block this weak model is most confident
    # of a space wherever the text is still unknown, low-confidence remasking reveals those first, and
    # each space makes its neighbours' spaces surer; greedy, it loops (spaces after a paragraph's end,
    # "the the the")
    "cpu": dict(out_dir="out-cpu", block_size=64, batch_size=32, max_iters=2200, mem_start=1900, n_layer=4, n_head=4,
                n_embd=128, lr=2e-3, min_lr=2e-4, warmup_iters=100, eval_interval=400, eval_iters=10, log_interval=100,
                mem_rank=16, mem_alpha=32.0, compile=False, sample_block_len=4, sample_temperature=1.0),
    "tiny": dict(out_dir="out-tiny", block_size=64, batch_size=8, max_iters=40, n_layer=2, n_head=2,
                 n_embd=64, warmup_iters=5, eval_interval=20, eval_iters=2, log_interval=10,
                 mem_rank=8, compile=False),
    **{name: p for src in SOURCES.values() for name, p in src.presets.items()},  # niah, niah_proto, niah_tiny
}
# keys a resumed run may change without changing what its steps compute; a change of any other is noted
RESUME_FREE = ("out_dir", "resume", "overwrite", "init_from", "device", "compile", "compile_mode",
               "eval_interval", "eval_iters", "log_interval", "sample_block_len", "sample_temperature",
               "data_workers")
LOCK_NAME = "train.lock"  # out_dir is held by one train.py at a time
# how torch reports a tensor it cannot allocate (CUDA, CPU, a size past int64)
ALLOC_FAILED = ("out of memory", "can't allocate memory", "not enough memory", "Storage size calculation overflowed")
SIZE_KEYS = ("n_layer", "n_embd", "batch_size", "block_size")  # what sets the memory of the model and its step
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def parse_config(argv):
    """--config NAME (or --config=NAME) picks a preset; --key=value overrides it, typed as the default."""
    names, overrides, args = [], [], iter(argv)
    for a in args:
        if a == "--config":
            names.append(next(args, ""))
        elif a.startswith("--config="):
            names.append(a.split("=", 1)[1])
        else:
            overrides.append(a)
    if len(names) > 1:
        raise SystemExit(f"--config is given {len(names)} times ({', '.join(names)}): pick one preset, then "
                         f"override its keys with --key=value")
    name = names[0] if names else "small"
    if name not in PRESETS:
        raise SystemExit(f"unknown config '{name}': choose one of {', '.join(PRESETS)}")
    cfg = {**DEFAULTS, **PRESETS[name], "config": name}
    for a in overrides:
        if not a.startswith("--") or "=" not in a:
            raise SystemExit(f"bad argument '{a}': write --key=value (keys: {', '.join(DEFAULTS)})")
        key, val = a[2:].split("=", 1)
        if key not in DEFAULTS:
            raise SystemExit(f"unknown config key '{key}': valid keys are {', '.join(DEFAULTS)}")
        cfg[key] = cast(key, val, DEFAULTS[key])
    check_config(cfg)
    return cfg


def datasets():
    """The names --dataset takes: those of SOURCES and each directory of data/ with a prepare.py."""
    return list(SOURCES) + sorted(d for d in os.listdir(DATA_DIR) if os.path.exists(os.path.join(DATA_DIR, d, "prepare.py")))


def need(ok, msg):
    if not ok:
        raise SystemExit(msg)


def make_out_dir(path):
    """out_dir and its parents, made if missing, or one line saying why they cannot be."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        what = "a file or a broken link" if os.path.lexists(path) else (e.strerror or str(e)).lower()
        raise SystemExit(f"--out_dir={path} cannot hold a run ({what}): choose another directory") from None


def check_config(cfg):
    """Stop with one line at the first setting that cannot train, before any work."""
    need(cfg["out_dir"].strip() != "", "--out_dir is empty: name a directory for the run, such as --out_dir=out")
    for k in ("block_size", "batch_size", "n_layer", "n_head", "n_embd", "eval_interval", "eval_iters",
              "log_interval", "sample_block_len"):
        need(cfg[k] >= 1, f"--{k}={cfg[k]}: must be a positive integer")
        need(cfg[k] < 2**63, f"--{k}={cfg[k]}: too large for any machine to allocate")
    for k in ("max_iters", "warmup_iters", "mem_start", "attn_chunk", "data_workers"):
        need(cfg[k] >= 0, f"--{k}={cfg[k]}: must be >= 0")
    head = cfg["n_embd"] / cfg["n_head"]
    need(head == int(head), f"--n_embd={cfg['n_embd']} is not a multiple of --n_head={cfg['n_head']}: "
                            f"each head gets n_embd / n_head channels")
    need(head % 2 == 0, f"head size n_embd / n_head = {head:.0f} is odd: RoPE rotates pairs of channels, "
                        f"pick n_embd and n_head for an even head size")
    need(math.isfinite(cfg["lr"]) and cfg["lr"] > 0, f"--lr={cfg['lr']}: must be a finite number > 0")
    need(0 <= cfg["min_lr"] <= cfg["lr"], f"--min_lr={cfg['min_lr']}: must be within 0 and --lr={cfg['lr']}")
    need(0 <= cfg["weight_decay"] < math.inf, f"--weight_decay={cfg['weight_decay']}: must be a finite number >= 0")
    need(0 <= cfg["sample_temperature"] < math.inf,
         f"--sample_temperature={cfg['sample_temperature']}: must be a finite number >= 0")
    for k in ("beta1", "beta2"):
        need(0 < cfg[k] < 1, f"--{k}={cfg[k]}: must be within 0 and 1 (exclusive)")
    need(0 <= cfg["seed"] <= 2**32 - 1, f"--seed={cfg['seed']}: must be within 0 and 2**32-1")
    need(cfg["grad_clip"] > 0, f"--grad_clip={cfg['grad_clip']}: must be > 0")
    need(cfg["dtype"] in ("bfloat16", "float16", "float32"),
         f"--dtype={cfg['dtype']}: use bfloat16, float16 or float32")
    modes = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
    need(cfg["compile_mode"] in modes, f"--compile_mode={cfg['compile_mode']}: use one of {', '.join(modes)}")
    need(cfg["dataset"] in datasets(), f"unknown dataset '{cfg['dataset']}': choose one of {', '.join(datasets())}, "
                                       f"or write data/{cfg['dataset']}/prepare.py and run python "
                                       f"data/{cfg['dataset']}/prepare.py")
    need(not cfg["init_from"] or os.path.realpath(cfg["init_from"]) != os.path.realpath(cfg["out_dir"]),
         f"--init_from={cfg['init_from']} is the --out_dir: fine-tune into another --out_dir (or continue the run "
         f"there with --resume=True)")
    need(not (cfg["resume"] and (cfg["overwrite"] or cfg["init_from"])),
         "--resume=True continues the run in out_dir: leave out --overwrite and --init_from")
    check_tokenizer(cfg["tokenizer"])
    pick_device(cfg["device"])  # an unknown name, or a GPU that is not there
    try:
        MemoryConfig.from_config(cfg).validate()
    except ValueError as e:
        raise SystemExit(f"--mem_{e}") from None  # the message starts with the field's name
    need(not cfg["exact_hypergrad"] or cfg["mem"], "--exact_hypergrad=True differentiates through the inner "
                                                    "loop: it needs --mem=True")
    for src in SOURCES.values():  # whatever the dataset: a bad key fails now, not when it is used
        src.check(cfg)


def cast(key, val, default):
    kind = type(default)
    try:
        if kind is bool:
            if val.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return val.lower() in ("true", "1")
        return kind(val)
    except ValueError:
        name = {"int": "an integer", "float": "a number", "bool": "True or False", "str": "a string"}[kind.__name__]
        raise SystemExit(f"--{key}={val}: expected {name} (default {default!r})") from None


# ---------------------------------------------------------------------------------------
# data: random windows of a memmapped token file; every token maskable

class TextData:
    def __init__(self, cfg, device):
        if cfg["dataset"] == "pydoc" and not os.path.exists(os.path.join(DATA_DIR, "pydoc", "train.bin")):
            from data.pydoc.prepare import prepare  # the embedded corpus: tokenised on first use
            prepare(cfg["tokenizer"])
        self.T, self.B, self.device, self.files = cfg["block_size"], cfg["batch_size"], device, {}
        for s in ("train", "val"):  # checked once here, reopened per batch
            tokens = open_split(cfg["dataset"], s, cfg["tokenizer"])
            if len(tokens) <= self.T:
                raise SystemExit(f"{tokens.filename} holds fewer tokens than block_size={self.T}")
            self.files[s], self.dtype = tokens.filename, tokens.dtype

    def batch(self, split, gen, step=None, with_tasks=False):
        """(x0, maskable, key_pad) of batch_size windows, positions drawn from gen (step: no
        curriculum for plain text; with_tasks: also None, the rows have no task)."""
        x = windows(np.memmap(self.files[split], dtype=self.dtype, mode="r"), self.T, self.B, gen)  # reopened: no leak
        if self.device.startswith("cuda"):
            x = x.pin_memory().to(self.device, non_blocking=True)
        out = x, torch.ones_like(x, dtype=torch.bool), None
        return (out, None) if with_tasks else out


def make_data(cfg, device):
    return SOURCES[cfg["dataset"]].data(cfg, device) if cfg["dataset"] in SOURCES else TextData(cfg, device)


class StepBatches(torch.utils.data.Dataset):
    """Item s: the training batch of step s on the CPU, drawn from step s's generator, so a
    DataLoader worker draws exactly what the loop would: prefetching changes neither the
    batches nor resume."""

    def __init__(self, data, seed, rank):
        self.data, self.seed, self.rank = data, seed, rank

    def __getitem__(self, step):
        return self.data.batch("train", step_generator(self.seed, step, self.rank, "cpu")[1], step)


def train_batches(cfg, start, rank, on_gpu):
    """The batches of steps start .. max_iters - 1, drawn by data_workers processes ahead of the
    loop (0: in the loop), pinned on the GPU for an asynchronous copy."""
    workers = cfg["data_workers"]
    return iter(torch.utils.data.DataLoader(StepBatches(make_data(cfg, "cpu"), cfg["seed"], rank), batch_size=None,
                                            sampler=range(start, cfg["max_iters"]), num_workers=workers,
                                            pin_memory=on_gpu, prefetch_factor=4 if workers else None,
                                            worker_init_fn=ignore_stop_signals if workers else None))


def ignore_stop_signals(worker_id):
    """A data worker leaves Ctrl-C and SIGTERM to the loop, which closes the workers itself: a
    signal sent to the whole process group (a terminal's Ctrl-C, timeout, a scheduler) would
    otherwise kill them first, and the DataLoader would print a traceback over the one line.
    A loop stopped while it takes a batch drops the connection that hands the batch's shared
    memory over; the worker's handing thread (multiprocessing's resource_sharer) would print that
    as a traceback too (5 of 332 stops in a run's first seconds), so closed connections pass quietly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    hook = sys.excepthook

    def unless_a_closed_connection(kind, value, tb):
        if not issubclass(kind, (ConnectionError, EOFError)):
            hook(kind, value, tb)
    sys.excepthook = unless_a_closed_connection


# ---------------------------------------------------------------------------------------
# the step

def model_config(cfg, enc):
    return ModelConfig(vocab_size=64 * math.ceil(enc.n_vocab / 64), n_vocab=enc.n_vocab,
                       mask_id=enc._special_tokens["<|mask|>"], eot_id=enc.eot_token, **{k: cfg[k] for k in MODEL_KEYS})


def step_generator(seed, step, rank, device):
    """(device, CPU) generators of one step: its randomness (batch windows, t, masks) depends only
    on (seed, step, rank), so a resumed run sees exactly the batches the uninterrupted run would have seen."""
    return seeded_generator(seed, step, rank, device), seeded_generator(seed, step, rank)


@dataclass
class Nets:
    """The model's handles, one object. raw holds the parameters (optimizer, checkpoints, eval);
    model is raw compiled (GPU, --compile); ddp runs the passes from the token ids: the DDP wrapper
    of model under torchrun (its gradient sync then covers every parameter, also those of the
    layers above the memory, which run on model itself), else model. inner_step is
    memory.inner_step, compiled whole with model. ctx: autocast (bf16 on the GPU)."""
    raw: DiffusionLM
    model: torch.nn.Module = None
    ddp: torch.nn.Module = None
    inner_step: object = inner_step
    ctx: object = field(default_factory=nullcontext)

    def __post_init__(self):
        self.model = self.raw if self.model is None else self.model
        self.ddp = self.model if self.ddp is None else self.ddp


def compiled(raw, cfg, device, ddp=False):
    """Nets of raw: torch.compile of the model's forward, of its top, of its loss and of the inner SGD
    step (its backward, clip and update included) on the GPU only; the DDP wrapper under torchrun."""
    on_gpu = device.startswith("cuda")
    model, step = raw, inner_step
    if cfg["compile"] and on_gpu and not cfg["exact_hypergrad"]:  # torch.compile has no double backward
        mode = None if cfg["compile_mode"] == "default" else cfg["compile_mode"]
        model, step = torch.compile(raw, mode=mode), torch.compile(inner_step, mode=mode)
        # set on the compiled module alone (its setattr sets raw's): evaluate's eager inner loop calls
        # raw's inside torch.func.grad, which makes dynamo skip a compiled function's code for good
        object.__setattr__(model, "top", torch.compile(raw.top, mode=mode))  # memdlm_loss's outer pass
        # the head and the loss (MDLM's, the outer pass's), without CUDA graphs: where masked_ce gathers
        # its length changes every step, and CUDA graphs would record a graph for each
        object.__setattr__(model, "nll", torch.compile(raw.nll))
    wrapper = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if on_gpu else None) if ddp else None
    # the exact hypergradient runs in float32: on the GPU its double backward fails under bf16 autocast
    # ("expected input and grad types to match", torch 2.11, H200)
    ctx = nullcontext() if cfg["exact_hypergrad"] else autocast(device, cfg["dtype"])
    return Nets(raw, model, wrapper, step, ctx)


def batch_loss(nets, batch, cfg, mcfg, generator):
    """Outer loss of one batch (MDLM, or MemDLM with its inner loop) and the inner losses."""
    x0, maskable, key_pad = batch
    if cfg["mem"]:
        return memdlm_loss(nets.model, x0, maskable, mcfg, key_pad=key_pad, generator=generator, bottom=nets.ddp,
                           inner_step=nets.inner_step, create_graph=cfg["exact_hypergrad"])
    x_t, mask, t = forward_process(x0, maskable, nets.raw.cfg.mask_id, generator=generator)
    return mdlm_loss(nets.model, nets.ddp(x_t, key_pad=key_pad), x0, mask, t, maskable), []


def train_step(nets, opt, batch, cfg, mcfg, generator):
    """One optimizer step of theta; returns the (device) loss and inner losses, no host sync.
    compile_mode=reduce-overhead replays CUDA graphs: each step is a new graph generation, and
    the losses returned are copies, as a replay overwrites the outputs of the one before.
    The exact hypergradient runs attention on the math kernel: the fused ones have no double backward."""
    if cfg["compile_mode"] == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()
    exact = sdpa_kernel(SDPBackend.MATH) if cfg["exact_hypergrad"] else nullcontext()
    with nets.ctx, exact:
        loss, inner_losses = batch_loss(nets, batch, cfg, mcfg, generator)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(nets.raw.parameters(), cfg["grad_clip"])
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach().clone(), inner_losses


def lr_at(it, cfg):
    """Linear warmup, then cosine decay to min_lr."""
    if it < cfg["warmup_iters"]:
        return cfg["lr"] * (it + 1) / cfg["warmup_iters"]
    frac = (it - cfg["warmup_iters"]) / max(1, cfg["max_iters"] - cfg["warmup_iters"])
    return cfg["min_lr"] + 0.5 * (1 + math.cos(math.pi * min(1.0, frac))) * (cfg["lr"] - cfg["min_lr"])


@contextmanager
def signals_held(act=True):
    """Ctrl-C and SIGTERM inside the block act when it ends (as KeyboardInterrupt), not in it;
    act=False drops them (a stop already under way: a second Ctrl-C would break its clean-up)."""
    got = []
    with signal_handlers(lambda sig, frame: got.append(sig)):
        yield
    if got and act:
        raise KeyboardInterrupt


def save_checkpoint(path, obj):
    """torch.save to a temporary file of this process, flushed to the disk, then renamed over
    path: a crash, Ctrl-C or a full disk never leaves a broken checkpoint, only the previous one.
    obj must hold tensors and plain values only (read_checkpoint loads nothing else)."""
    # one run writes to an out_dir (a second is refused), so any other temp is a crash's leftover
    for stale in glob.glob(glob.escape(path) + ".tmp*"):
        os.remove(stale)
    tmp = f"{path}.tmp{os.getpid()}"
    # serialised in memory first: torch.save reports a failed write as a RuntimeError that hides
    # its cause, a plain write raises the OSError that names it (ENOSPC: the disk is full)
    buf = io.BytesIO()
    torch.save(obj, buf)
    try:
        with open(tmp, "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # ENOSPC, EDQUOT, EIO...
        kept = ("the previous checkpoint is unchanged, continue with --resume=True once there is room"
                if os.path.exists(path) else "no checkpoint was written")
        raise SystemExit(f"cannot write {path} ({e.strerror or e}): {kept}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    with suppress(OSError, AttributeError):  # the rename itself made durable (POSIX only)
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def make_optimizer(raw_model, cfg, on_gpu):
    """AdamW, weight decay on matrices only; fused on GPU."""
    decay = [p for p in raw_model.parameters() if p.dim() >= 2]
    no_decay = [p for p in raw_model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]), fused=on_gpu)


def answer_accuracy(model, x0, maskable, key_pad):
    """Per row, (correct, total) [B] each: argmax predictions of the answers with every scored
    token of the rows that have a prompt masked at once, as at the sampler's first step;
    <|endoftext|> padding left out. A retrieval signal that needs no decoding; 0 of 0 for plain text."""
    rows = (~maskable if key_pad is None else ~maskable & ~key_pad).any(1, keepdim=True)
    target = maskable & rows & (x0 != model.cfg.eot_id)
    hit = torch.zeros_like(target)
    if target.any():
        logits = model.logits(model(torch.where(maskable & rows, model.cfg.mask_id, x0), key_pad=key_pad)[target])
        hit[target] = logits.argmax(-1) == x0[target]
    return hit.sum(1), target.sum(1)


@torch.no_grad()
def evaluate(nets, data, cfg, mcfg, device):
    """Eval losses on fixed batches and masks (the same in every run with the same seed):
    'eval_loss' is the base model alone (the train-only view); 'eval_loss_mem' first runs
    the inner loop on each eval batch, as in training (the paper's view), at the same x_t;
    'eval_answer_acc' (data with prompts) is answer_accuracy of the base model alone, and with
    several needle tasks 'eval_answer_acc_<task>' that of each (tasks learn at different steps).
    It runs on nets.raw, not compiled."""
    raw, plain = nets.raw, Nets(nets.raw, ctx=nets.ctx)
    raw.eval()
    modes = (False, True) if cfg["mem"] else (False,)
    losses, hits = {mem: [] for mem in modes}, {}  # hits: task (or None) -> [correct, total]
    # a bar once it takes a second: a long eval_iters never looks hung (Ctrl-C in it ends as in a step)
    for i in tqdm(range(cfg["eval_iters"]), desc="eval", leave=False, delay=1.0, dynamic_ncols=True):
        batch, tasks = data.batch("val", step_generator(cfg["seed"] + 1, i, 0, device)[1], with_tasks=True)
        with nets.ctx:
            for mem in modes:  # a fresh generator each: both see the same t and masks
                g_dev = step_generator(cfg["seed"] + 1, i, 0, device)[0]
                losses[mem].append(batch_loss(plain, batch, {**cfg, "mem": mem}, mcfg, g_dev)[0].item())
            correct, total = (v.tolist() for v in answer_accuracy(raw, *batch))
        for b, task in enumerate(tasks or [None] * len(correct)):
            for key in {None, task}:
                hits.setdefault(key, [0, 0])
                hits[key][0] += correct[b]
                hits[key][1] += total[b]
    out = {"eval_loss_mem" if mem else "eval_loss": sum(v) / len(v) for mem, v in losses.items()}
    for task, (c, n) in hits.items():
        if n and (task is None or len(data.tasks) > 1):
            out["eval_answer_acc" + (f"_{task}" if task else "")] = c / n
    raw.train()
    return out


def json_line(rec):
    """One log.jsonl line: standard JSON, which has no NaN or infinity: such a value is written as null."""
    def safe(v):
        return None if isinstance(v, float) and not math.isfinite(v) else v
    return json.dumps({k: {kk: safe(vv) for kk, vv in v.items()} if isinstance(v, dict) else safe(v)
                       for k, v in rec.items()}, allow_nan=False) + "\n"


def summarize(records, ev, wall, device):
    """One record for the results table, of this run's log records: the last log steps' mean train
    loss, the final eval losses, the median tokens/s (the first log step, with compilation, left
    out), the wall time of every run behind the model (wall), peak memory."""
    recs = [r for r in records if isinstance(r.get("loss"), float) and isinstance(r.get("tokens_per_s"), float)]
    tail = recs[-4:]
    tps = sorted(r["tokens_per_s"] for r in recs[1:]) or [float("nan")]
    return {"train_loss": sum(r["loss"] for r in tail) / len(tail) if tail else None, **ev,
            "tokens_per_s": tps[len(tps) // 2], "wall_s": wall,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None,
            "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"}


def max_abs_weight(raw_model):
    """The largest |weight|: not finite as soon as one weight is NaN or infinite (max propagates NaN)."""
    return torch.stack([p.detach().abs().max().float() for p in raw_model.parameters()]).max().item()


def cpu_minutes(cfg, n_params, tokens_per_step, start):
    """A rough CPU time of the steps from start, before tqdm's estimate takes over: 6 N FLOPs a
    token, a MemDLM step (from mem_start on) 1.8 MDLM steps, 5.2e10 FLOP/s on one thread and
    threads ** 0.68 times that on more (the cpu preset, evals included: 545 s on one thread of a
    2-core machine, 341 s on two)."""
    mdlm = max(0, min(cfg["max_iters"], cfg["mem_start"] if cfg["mem"] else cfg["max_iters"]) - start)
    mem = cfg["max_iters"] - start - mdlm
    return 6 * n_params * tokens_per_step * (mdlm + 1.8 * mem) / (5.2e10 * torch.get_num_threads() ** 0.68) / 60


def resume_command(argv, world):
    """The command that continues this run from its checkpoint."""
    args = [a for a in argv if not a.startswith(("--resume=", "--overwrite=", "--init_from="))]
    launcher = f"torchrun --nproc_per_node={world}" if world > 1 else "python"
    return f"{launcher} train.py {shlex.join(args)} --resume=True"


# ---------------------------------------------------------------------------------------
# the run: devices, resume, checkpoints, the log, stops

@dataclass
class Run:
    """One training process: where it runs, its out_dir, its log, the step of its checkpoint."""
    cfg: dict
    rank: int = 0
    world: int = 1
    device: str = "cpu"
    ddp: bool = False
    log: object = None     # log.jsonl, open on rank 0 only
    saved: int = None      # the step of the checkpoint in out_dir (None: none of this run)
    lock: str = None       # out_dir's train.lock while this process holds it (rank 0)
    kept: list = field(default_factory=list)  # --overwrite=True: the earlier run's files, until the first checkpoint
    records: list = field(default_factory=list)  # what this process wrote to the log
    wall_before: float = 0.0  # the training time of the runs before a resume (the checkpoint's wall_s)
    t_start: float = None     # when this process's training began

    @property
    def master(self):
        return self.rank == 0

    @property
    def ckpt_path(self):
        return os.path.join(self.cfg["out_dir"], "ckpt.pt")

    def wall(self):
        """Seconds of training behind the model now, over every resume."""
        return self.wall_before + time.time() - self.t_start

    def write(self, rec):
        self.records.append(rec)
        self.log.write(json_line(rec))
        self.log.flush()

    def stop_unless_finite(self, step, values):
        """Stop at a loss (or weight) that is NaN or infinite: nothing more is trained or saved."""
        for name, v in values.items():
            if not math.isfinite(v):
                kept, then = (f"the checkpoint of step {self.saved} is unchanged", "continue with --resume=True") \
                    if self.saved is not None else ("no checkpoint was written", "run again with --overwrite=True")
                raise SystemExit(f"step {step}: {name} is {v}: training stopped, {kept}; lower --lr or --mem_lr, "
                                 f"then {then}{self.kept_note()}")

    def too_big(self, e):
        """The one line of a tensor that could not be allocated (the model, a batch, a step's activations)."""
        sizes = ", ".join(f"--{k}={self.cfg[k]}" for k in SIZE_KEYS)
        then = (f"try a smaller --batch_size: the checkpoint of step {self.saved} is unchanged, continue with "
                f"--resume=True" if self.saved is not None else
                "try smaller values: no checkpoint was written, run again with --overwrite=True")
        return f"cannot allocate memory for {sizes} ({' '.join(str(e).split())[:200]}): {then}{self.kept_note()}"

    def kept_note(self):
        return " (the earlier run, kept aside, is back in its place)" if self.kept else ""

    def put_back(self):
        """A stop before this run's first checkpoint: the earlier run's files, kept aside by
        --overwrite=True, return to their place (this run's log, with nothing to resume, goes). A
        new run that wrote nothing (refused in its setup) leaves no empty log behind."""
        if self.log is not None:
            self.log.close()
            if self.saved is None and not self.records and not self.cfg["resume"]:
                with suppress(FileNotFoundError):
                    os.remove(self.log.name)
        for aside in self.kept:
            os.replace(aside, aside[:-len(KEPT_SUFFIX)])
        self.kept = []

    def checkpoint(self, step, raw, opt, last_loss):
        """Save, atomically, unless the last train loss or a weight is not finite (one host sync).
        A Ctrl-C or SIGTERM during the save waits for it: the interval's steps are then kept."""
        self.stop_unless_finite(step, {"the largest |weight|": max_abs_weight(raw),
                                       **({"the train loss": last_loss.item()} if last_loss is not None else {})})
        with signals_held():
            save_checkpoint(self.ckpt_path, {"model": raw.state_dict(), "optimizer": opt.state_dict(),
                                             "config": self.cfg, "model_args": asdict(raw.cfg), "step": step,
                                             "wall_s": self.wall()})
            self.saved = step
            for p in self.kept:  # the new run has its checkpoint: the earlier run's files go
                with suppress(FileNotFoundError):
                    os.remove(p)
            self.kept = []

    def evaluate(self, step, nets, data):
        """Evaluate, log and print; stop at a non-finite eval loss."""
        ev = evaluate(nets, data, self.cfg, MemoryConfig.from_config(self.cfg), self.device)
        self.write({"step": step, **ev})
        tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in ev.items()))
        self.stop_unless_finite(step, ev)
        return ev

    def interrupted(self, step, argv):
        """The one line of Ctrl-C. No checkpoint then (as nanoGPT): the interrupt may land inside
        opt.step() and leave half-updated weights; the last periodic checkpoint is consistent, and
        resuming from it replays exactly the steps after it."""
        if self.saved is None:
            return (f"interrupted at step {step}, before the first checkpoint: nothing to resume, run the command "
                    f"again with --overwrite=True{self.kept_note()}")
        return (f"interrupted at step {step}; the last checkpoint is step {self.saved} ({self.ckpt_path}): continue "
                f"with {resume_command(argv, self.world)}")


def start_run(cfg):
    """The process's devices (the process group under torchrun), out_dir checked and the log
    opened: a resumed run appends to it, a new one starts it afresh and --overwrite=True moves
    the earlier run's checkpoint and log aside (keep_aside), so out_dir never mixes two runs.
    A log without a checkpoint (a run stopped before its first) is replaced only with --overwrite=True,
    unless it is empty (a run stopped before its first log line)."""
    path = os.path.join(cfg["out_dir"], "ckpt.pt")
    log_path = os.path.join(cfg["out_dir"], "log.jsonl")
    left = [p + KEPT_SUFFIX for p in (path, log_path) if os.path.exists(p + KEPT_SUFFIX)]
    if left and not cfg["resume"]:  # a run killed outright before its first checkpoint could not put them back
        them = "them" if len(left) > 1 else "it"
        raise SystemExit(f"{', '.join(left)}: an earlier run that --overwrite=True kept aside, not put back (a run "
                         f"killed before its first checkpoint, or one still running): when none runs, rename {them} "
                         f"back (drop {KEPT_SUFFIX}) to keep that run, or delete {them}; then run the command again")
    if os.path.exists(path) and not cfg["resume"] and not cfg["overwrite"]:
        raise SystemExit(f"{path} exists, the checkpoint of an earlier run: continue that run with "
                         f"--resume=True, train in another --out_dir, or replace it with --overwrite=True")
    if cfg["resume"] and not os.path.exists(path):
        raise SystemExit(f"--resume=True but {path} does not exist: " + (
            f"{path}{KEPT_SUFFIX} is a run --overwrite=True kept aside; rename it to ckpt.pt to continue it" if left
            else "train without --resume first"))
    if os.path.lexists(log_path) and not os.path.isfile(log_path):  # a directory, a FIFO (it would block), a dead link
        raise SystemExit(f"{log_path} is not a regular file: move it out of --out_dir, then run the command again")
    earlier_log = os.path.exists(log_path) and os.path.getsize(log_path) > 0
    if earlier_log and not os.path.exists(path) and not cfg["resume"] and not cfg["overwrite"]:
        raise SystemExit(f"{log_path} exists (an earlier run's log, no checkpoint): pass --overwrite=True "
                         f"to replace it, or another --out_dir")
    run = Run(cfg, device=pick_device(cfg["device"]))
    if launched_by_torchrun():
        join_process_group()
        run.rank, run.world, run.ddp = torch.distributed.get_rank(), torch.distributed.get_world_size(), True
        run.device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if torch.cuda.is_available() else "cpu"
        if run.device != "cpu":
            torch.cuda.set_device(run.device)
        configs = [None] * run.world  # ranks started with other settings would train a mixed run
        torch.distributed.all_gather_object(configs, cfg)
        differ = rank_mismatch(configs)
        if differ or cfg["exact_hypergrad"]:
            torch.distributed.destroy_process_group()
            raise SystemExit(differ or "--exact_hypergrad=True runs in one process (DDP has no double backward): "
                                       "run python train.py without torchrun")
        if cfg["compile_mode"] == "reduce-overhead":  # CUDA graphs are kept to one process
            run.cfg = cfg = {**cfg, "compile_mode": "default"}
            if run.master:
                print("note: --compile_mode=reduce-overhead (CUDA graphs) runs in one process; torchrun uses default")
    torch.manual_seed(cfg["seed"])
    if run.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() > 1 and \
            (free := free_cores(torch.get_num_threads())) < torch.get_num_threads():  # a quarter second, once
        print(f"note: other work keeps the cores busy: training on {free} of {torch.get_num_threads()} threads; "
              f"OMP_NUM_THREADS=N chooses instead")
        torch.set_num_threads(free)
    make_out_dir(cfg["out_dir"])
    if run.master:
        take_lock(run)
        try:
            if cfg["overwrite"]:
                run.kept = keep_aside(path, log_path)
            run.log = open(os.path.join(cfg["out_dir"], "log.jsonl"), "a" if cfg["resume"] else "w")
        except BaseException:
            run.put_back()
            release_lock(run)
            raise
    return run


def free_cores(threads, read_stat=lambda: open("/proc/stat").read()):
    """Of torch's `threads`, how many cores other work leaves free now (at least one): the idle
    share of the CPU time in /proc/stat over a quarter second (Linux), elsewhere the 1-minute load
    average. A thread whose core is busy stalls the others at every step's barrier: the cpu preset
    with two busy cores ran 7 times slower on two threads than on one (README, the CPU recipe)."""
    def ticks():  # (idle + iowait, all) jiffies of all cores, and the number of cores
        lines = read_stat().splitlines()
        t = [int(v) for v in lines[0].split()[1:]]
        return t[3] + t[4], sum(t), sum(line.startswith("cpu") for line in lines) - 1
    try:
        idle0, all0, n = ticks()
        time.sleep(0.25)
        idle1, all1, _ = ticks()
        busy = n * (1 - (idle1 - idle0) / max(1, all1 - all0))
    except (OSError, ValueError, IndexError):  # no /proc/stat: the load average, where there is one
        n, busy = os.cpu_count() or threads, os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(threads, round(n - busy)))


def launched_by_torchrun():
    """Whether torchrun started this process (it sets RANK and the rest); a partial or malformed
    environment stops here in one line instead of inside init_process_group."""
    if "RANK" not in os.environ:
        return False
    env = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    wrong = [k for k in env if k not in os.environ or (k != "MASTER_ADDR" and not os.environ[k].isdigit())]
    if not wrong and not 1 <= int(os.environ["MASTER_PORT"]) <= 65535:
        raise SystemExit(f"MASTER_PORT={os.environ['MASTER_PORT']}: a port within 1 and 65535 (torchrun picks "
                         f"one; --master_port sets it)")
    if not wrong and not int(os.environ["RANK"]) < int(os.environ["WORLD_SIZE"]) >= 1:
        raise SystemExit(f"RANK={os.environ['RANK']} with WORLD_SIZE={os.environ['WORLD_SIZE']}: ranks run from 0 "
                         f"to WORLD_SIZE-1; start several processes with torchrun --nproc_per_node=N train.py ...")
    if wrong:
        raise SystemExit(f"RANK={os.environ['RANK']} is set but {', '.join(wrong)} "
                         f"{'is' if len(wrong) == 1 else 'are'} missing or not a number: start several processes "
                         f"with torchrun --nproc_per_node=N train.py ..., or unset RANK for one")
    return True


def join_process_group(patience=20.0):
    """init_process_group, which waits for all WORLD_SIZE processes at MASTER_ADDR:MASTER_PORT,
    retrying through Ctrl-C (c10d). An address that does not resolve stops first in one line;
    during the wait, when nothing is written yet, Ctrl-C and SIGTERM end the process at once,
    and a wait past `patience` seconds says what it waits for."""
    addr, port, world = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), os.environ["WORLD_SIZE"]
    try:
        socket.getaddrinfo(addr, port)
    except (socket.gaierror, UnicodeError) as e:
        raise SystemExit(f"MASTER_ADDR={addr} does not resolve ({e}): use the address of rank 0's machine "
                         f"(torchrun sets it), or unset RANK to train in one process") from None
    line = (f"note: waiting {patience:g} s so far for the {world} processes of WORLD_SIZE={world} at "
            f"{addr}:{port}: torchrun --nproc_per_node=N starts them all; Ctrl-C stops this one")
    note = threading.Timer(patience, print, [line], dict(flush=True))
    note.daemon = True
    note.start()
    try:
        with signal_handlers(signal.SIG_DFL):
            torch.distributed.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    except torch.distributed.DistNetworkError as e:  # the port is taken, or rank 0 cannot be reached
        why = (f"another process holds MASTER_PORT={port}; pass torchrun another --master_port"
               if "EADDRINUSE" in str(e) else "check MASTER_ADDR and MASTER_PORT (torchrun sets them)")
        raise SystemExit(f"the ranks cannot meet at {addr}:{port} ({' '.join(str(e).split())[:160]}): {why}") from None
    finally:
        note.cancel()


def rank_mismatch(configs):
    """The one line naming each setting in which the ranks' configs (parse_config's, one per rank)
    differ, with every rank's value; None if they agree."""
    keys = [k for k in configs[0] if any(c[k] != configs[0][k] for c in configs[1:])]
    if not keys:
        return None
    values = "; ".join(f"{k} (" + ", ".join(f"rank {r}: {c[k]!r}" for r, c in enumerate(configs)) + ")"
                       for k in keys)
    return f"the torchrun ranks were started with different settings: {values}; start every rank with the same arguments"


def take_lock(run):
    """out_dir/train.lock (created exclusively, holding the pid) for the run's life: a second
    train.py into the same out_dir is refused in one line; the lock of a process that is gone
    (killed, crashed) is taken over with a note."""
    path = os.path.join(run.cfg["out_dir"], LOCK_NAME)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not os.path.isfile(path):
                raise SystemExit(f"{path} is not a lock file train.py wrote (not a regular file): move it out of "
                                 f"--out_dir, then run the command again") from None
            try:
                with open(path) as f:
                    pid = int(f.read().strip() or -1)
            except (OSError, ValueError):
                pid = -1
            if pid > 0 and pid_alive(pid):
                raise SystemExit(f"{run.cfg['out_dir']} is in use by train.py process {pid} ({path}): wait for it "
                                 f"to end, or train in another --out_dir (if no train.py runs there, the pid is "
                                 f"another program's now: delete {path})") from None
            print(f"note: {path} was left by process {pid if pid > 0 else '?'}, which is gone: taking it over")
            with suppress(FileNotFoundError):
                os.remove(path)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        run.lock = path
        return
    raise SystemExit(f"cannot take {path}: another process keeps creating it; train in another --out_dir")


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def release_lock(run):
    if run.lock is not None:
        with suppress(FileNotFoundError):
            os.remove(run.lock)
        run.lock = None


def keep_aside(*paths):
    """--overwrite=True: the earlier run's files, renamed to <name>.before-overwrite (a note names
    them) until the new run's first checkpoint is saved; a stop before it puts them back (Run.put_back)."""
    kept = []
    for p in paths:
        if os.path.exists(p):
            os.replace(p, p + KEPT_SUFFIX)
            kept.append(p + KEPT_SUFFIX)
    if kept:
        print(f"note: --overwrite=True: the earlier run is kept as {', '.join(kept)} until this run's first "
              f"checkpoint is saved")
    return kept


def resumed_checkpoint(run):
    """The checkpoint a --resume=True run continues (None for a new run): refused if it was trained
    with another model or mode; other changed settings are noted."""
    if not run.cfg["resume"]:
        return None
    ckpt, cfg = read_checkpoint(run.ckpt_path, run.device), run.cfg
    check_weights(run.ckpt_path, ckpt, "resume")
    if not isinstance(ckpt.get("optimizer"), dict):
        raise SystemExit(f"{run.ckpt_path} holds no optimizer state, so it cannot be resumed: start a new run from "
                         f"its weights with --init_from={cfg['out_dir']} and another --out_dir")
    old = ckpt["config"]
    for k in MODEL_KEYS + ("tokenizer", "mem"):
        if old.get(k, DEFAULTS[k]) != cfg[k]:  # a key older checkpoints lack has its default
            raise SystemExit(f"{run.ckpt_path} was trained with {k}={old.get(k, DEFAULTS[k])!r}, not {cfg[k]!r}: "
                             f"use the same setting or another --out_dir")
    changed = [f"{k} {old[k]!r} -> {cfg[k]!r}" for k in DEFAULTS if k not in RESUME_FREE and old.get(k, cfg[k]) != cfg[k]]
    if changed and run.master:
        print(f"note: resuming with settings other than the checkpoint's ({', '.join(changed)}): "
              f"the run goes on with them, not as the uninterrupted run would have")
    run.saved, run.wall_before = ckpt["step"], ckpt.get("wall_s", 0.0)  # older checkpoints hold no wall_s
    return ckpt


def build(run, ckpt):
    """The model and its optimizer: from the checkpoint resumed, from --init_from's weights, or new."""
    cfg = run.cfg
    raw = DiffusionLM(model_config(cfg, get_encoding(cfg["tokenizer"]))).to(run.device)
    if ckpt is not None:
        try:
            raw.load_state_dict(ckpt["model"])
        except (RuntimeError, TypeError, KeyError, ValueError) as e:
            raise SystemExit(f"{run.ckpt_path}: its weights do not fit this model ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:200]}): resume with its settings or use another "
                             f"--out_dir") from None
    elif cfg["init_from"]:
        src, _ = load_model(cfg["init_from"], run.device, usable_for="fine-tune from it")
        # a fine-tune may change what holds no weights: the length, the attention's chunks, RoPE at inference
        free = ("block_size", "attn_chunk", "rope_scaling")
        ours, theirs = ({k: v for k, v in asdict(c).items() if k not in free} for c in (raw.cfg, src.cfg))
        if ours != theirs:
            differ = ", ".join(f"{k} {theirs[k]} (here {ours[k]})" for k in ours if ours[k] != theirs[k])
            raise SystemExit(f"--init_from={cfg['init_from']}: its model differs from this config's in {differ}: "
                             f"set the same n_layer/n_head/n_embd/tokenizer")
        raw.load_state_dict(src.state_dict())
    opt = make_optimizer(raw, cfg, run.device.startswith("cuda"))
    if ckpt is not None:
        try:
            opt.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, TypeError, KeyError, ValueError, IndexError) as e:
            raise SystemExit(f"{run.ckpt_path}: its optimizer state does not fit this model ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:200]}): it is damaged or of another model; start anew "
                             f"with --init_from={cfg['out_dir']} and another --out_dir") from None
    return raw, opt


def announce(run, raw, start, tokens_per_step):
    cfg, on_gpu = run.cfg, run.device.startswith("cuda")
    if not run.master:
        return
    layers = memory_layers(raw.cfg.n_layer, cfg["mem_layer_frac"]) if cfg["mem"] else "-"
    print(f"{cfg['config']}: {raw.num_params() / 1e6:.2f}M parameters, {'MemDLM' if cfg['mem'] else 'MDLM'}, "
          f"fast weights on layers {layers}, device {run.device} x{run.world}, {tokens_per_step} tokens/step")
    if cfg["compile"] and not on_gpu:
        print("note: --compile applies on the GPU only; the CPU runs the model as it is")
    if cfg["dtype"] != "bfloat16" and not on_gpu:
        print(f"note: --dtype={cfg['dtype']} sets the GPU's autocast; the CPU trains in float32")
    if start >= cfg["max_iters"] > 0:
        print(f"note: the checkpoint is at step {start} and --max_iters={cfg['max_iters']}: nothing is left to "
              f"train (raise --max_iters to go on)")
    elif cfg["max_iters"] == 0:
        print(f"note: --max_iters=0 trains no step: {run.ckpt_path} will hold the "
              f"{'initial' if start == 0 and not cfg['init_from'] else 'loaded'} weights")
    if on_gpu and cfg["exact_hypergrad"]:
        print("note: --exact_hypergrad=True runs uncompiled and in float32 (torch.compile has no double backward, "
              "and bf16 autocast breaks it)")
    if cfg["mem"] and cfg["mem_start"] >= cfg["max_iters"] > start:
        print(f"note: --mem_start={cfg['mem_start']} is not below --max_iters={cfg['max_iters']}: every step trains "
              f"plain MDLM (MemDLM starts at step mem_start)")
    if not cfg["mem"] and cfg["mem_start"] != {**DEFAULTS, **PRESETS[cfg["config"]]}["mem_start"]:
        print(f"note: --mem_start={cfg['mem_start']} unused: --mem=False trains plain MDLM at every step")
    if 0 < cfg["block_size"] <= cfg["attn_chunk"]:
        print(f"note: --attn_chunk={cfg['attn_chunk']} is not below --block_size={cfg['block_size']}: training "
              f"attends to the whole window; the chunks apply only to longer inputs at inference")
    if cfg["warmup_iters"] > cfg["max_iters"] > start:
        print(f"note: --warmup_iters={cfg['warmup_iters']} is above --max_iters={cfg['max_iters']}: the learning "
              f"rate never reaches --lr={cfg['lr']}")
    unread = [k for name, src in SOURCES.items() if cfg["dataset"] != name
              for k, v in src.defaults.items() if cfg[k] != v]
    if unread:
        print(f"note: {', '.join('--' + k for k in unread)} unused: --dataset={cfg['dataset']} does not read "
              f"{'it' if len(unread) == 1 else 'them'}")
    if not on_gpu and cfg["max_iters"] > start:
        print(f"note: no GPU, training on the CPU; roughly {cpu_minutes(cfg, raw.num_params(), tokens_per_step, start):.1f} "
              f"minutes for {cfg['max_iters'] - start} steps")


def finish(run, nets):
    """Close the log; leave the process group (DDP's wrapper first: freed after it, it can hang under gloo)."""
    if run.log is not None:
        run.log.close()
    if run.ddp:
        nets.ddp = None
        torch.distributed.destroy_process_group()


def log_train(run, bar, step, loss, inner_losses, tokens_per_s):
    """A log line of the train and inner losses (a host sync); stop at a non-finite one."""
    lossf = loss.item()
    inner = {f"inner_loss_{k + 1}": v.mean().item() for k, v in enumerate(inner_losses)}
    rec = {"step": step, "loss": lossf, "lr": lr_at(step - 1, run.cfg), "tokens_per_s": tokens_per_s}
    run.write({**rec, **inner})
    run.stop_unless_finite(step, {"the train loss": lossf, **inner})
    bar.set_postfix(loss=f"{lossf:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")


def main(argv):
    cfg = parse_config(argv)
    run = None
    try:
        with sigterm_as_ctrl_c():  # a SIGTERM in the setup ends in one line too
            run = start_run(cfg)
            train_run(run, argv)
    except KeyboardInterrupt:  # in the setup: the loop turns its own into the line with the steps
        raise SystemExit("interrupted before the first step: nothing was trained and nothing written is lost"
                         f"{run.kept_note() if run else ''}; run the command again") from None
    except RuntimeError as e:  # torch.OutOfMemoryError is one
        if run is None or not any(s in str(e) for s in ALLOC_FAILED):
            raise
        raise SystemExit(run.too_big(e)) from None
    finally:
        with signals_held(act=False):
            if run is not None:
                run.put_back()  # nothing unless a stop came before the first checkpoint of an --overwrite=True run
                release_lock(run)


def train_run(run, argv):
    """The run start_run began: resume or build, train, evaluate, checkpoint."""
    cfg, device, master = run.cfg, run.device, run.master
    ckpt = resumed_checkpoint(run)
    start = 0 if ckpt is None else ckpt["step"]
    raw, opt = build(run, ckpt)
    nets = compiled(raw, cfg, device, ddp=run.ddp)
    mcfg = MemoryConfig.from_config(cfg)
    # rank 0 evaluates on the global batch: equal eval data for equal global batches on any number of GPUs
    eval_data = make_data({**cfg, "batch_size": cfg["batch_size"] * run.world}, device) if master else None
    batches = train_batches(cfg, start, run.rank, device.startswith("cuda"))
    tokens_per_step = cfg["batch_size"] * cfg["block_size"] * run.world
    announce(run, raw, start, tokens_per_step)
    bar = tqdm(range(start, cfg["max_iters"]), initial=start, total=cfg["max_iters"], disable=not master,
               dynamic_ncols=True)
    run.t_start = t_log = time.time()
    earlier = read_log(run.log.name) if ckpt is not None and master else []
    # the log holds the evaluation of the resumed checkpoint's step (made before it was saved): not again
    evaluated = any(r.get("step") == start and "eval_loss" in r for r in earlier)
    if any(r.get("step", 0) > start for r in earlier):  # an interrupted run logged steps past its checkpoint
        run.write({"step": start, "resumed": f"the lines above of steps after {start} are of an interrupted run; "
                                             f"this run trains those steps again"})
    step, loss = start, None
    try:
        for step in bar:
            if step % cfg["eval_interval"] == 0 and master and not (step == start and evaluated):
                run.evaluate(step, nets, eval_data)
                if step > start:
                    run.checkpoint(step, raw, opt, loss)
                t_log = time.time()  # keep eval time out of tokens/s
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            if cfg["mem"] and step == cfg["mem_start"] and step > 0 and master:
                run.write({"step": step, "switch": "MemDLM from here on"})
                bar.write(f"step {step}: MDLM -> MemDLM")
            step_cfg = cfg if step >= cfg["mem_start"] else {**cfg, "mem": False}
            batch = tuple(a if a is None else a.to(device, non_blocking=True) for a in next(batches))
            loss, inner_losses = train_step(nets, opt, batch, step_cfg, mcfg,
                                            step_generator(cfg["seed"], step, run.rank, device)[0])
            # the loss is read (a host sync) at log steps only; a NaN between them is caught there or
            # by the check before the next evaluation and checkpoint
            if (step + 1) % cfg["log_interval"] == 0 and master:
                dt, t_log = (time.time() - t_log) / cfg["log_interval"], time.time()
                log_train(run, bar, step + 1, loss, inner_losses, tokens_per_step / dt)
        step = max(start, cfg["max_iters"])
        if master:
            if cfg["max_iters"] > start:
                wall, ev = run.wall(), run.evaluate(step, nets, eval_data)
            run.checkpoint(step, raw, opt, loss)  # before the summary: nothing after the last step can cost it
            if cfg["max_iters"] > start:
                run.write({"summary": summarize(run.records, ev, wall, device)})
    except KeyboardInterrupt:
        raise SystemExit(run.interrupted(step, argv)) from None
    finally:
        with signals_held(act=False):
            bar.close()
            batches = None  # the data workers shut down now, not at the interpreter's exit
            finish(run, nets)


if __name__ == "__main__":
    main(sys.argv[1:])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # all is saved: a Ctrl-C in the interpreter's exit changes nothing
