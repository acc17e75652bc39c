"""Train a masked diffusion LM: plain MDLM (--mem=False) or MemDLM (--mem=True, default).

    python train.py --config small                  # one GPU, a few minutes
    python train.py --config tiny --mem=False       # CPU, seconds
    torchrun --nproc_per_node=2 train.py --config small

Every key of the preset can be overridden as --key=value. Writes out_dir/ckpt.pt
(atomically) and out_dir/log.jsonl; --resume=True continues from the checkpoint.
"""
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
from tqdm import tqdm

from memory import MemoryConfig, memdlm_loss, memory_layers
from model import DiffusionLM, ModelConfig, forward_process, load_model, mdlm_loss, pick_device
from niah import NIAH_DEFAULTS, NiahData

DEFAULTS = dict(
    out_dir="out", dataset="pydoc", tokenizer="byte",
    block_size=256, batch_size=64, max_iters=1500,
    n_layer=8, n_head=6, n_embd=384,
    lr=1e-3, min_lr=1e-4, warmup_iters=100, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0,
    eval_interval=250, eval_iters=20, log_interval=25,
    seed=1337, device="auto", dtype="bfloat16", compile=True, compile_mode="default",
    mem=True, mem_start=0, mem_rank=32, mem_alpha=64.0, mem_layer_frac=0.1, mem_adapter="lora", mem_steps=2,
    mem_lr=0.1, mem_clip=1.0, mem_pre_scale=1.5, mem_trajectory="anchor", mem_scope="response",
    resume=False, init_from="",
    **NIAH_DEFAULTS,  # read when dataset="niah": the needle tasks of niah.py as training rows
)
PRESETS = {
    # ~14M parameters, the pydoc corpus, a few minutes on one GPU; MDLM for 1000 steps, then MemDLM
    # (the paper fine-tunes a pretrained DLM: from scratch the memory absorbs the targets)
    "small": dict(mem_start=1000),
    # ~100M parameters at 1K context: for benchmarks and for users with several GPUs
    "base": dict(out_dir="out-base", block_size=1024, batch_size=32, max_iters=5000, n_layer=14, n_head=12,
                 n_embd=768, lr=6e-4, min_lr=6e-5, warmup_iters=200, eval_interval=500),
    # needle-in-a-haystack training rows (niah.py), prompt unmasked, answer scored; one GPU, minutes.
    # Retrieval is learned abruptly, later at longer contexts and with more <|endoftext|> padding
    # in the answer window (single at 256: step ~1500 with a 32-token window; at 512: ~1900 with
    # 10, none in 4000 with 32; single+multikey at 256: 41% answer accuracy after 4000), hence
    # one task, 256 tokens and a 16-token window
    "niah": dict(out_dir="out-niah", dataset="niah", block_size=256, batch_size=128, max_iters=4000, n_layer=8,
                 n_head=8, n_embd=512, lr=6e-4, min_lr=6e-5, warmup_iters=200, eval_interval=500, eval_iters=10,
                 log_interval=50, niah_tasks="single", niah_answer_len=16),
    "niah_tiny": dict(out_dir="out-niah-tiny", dataset="niah", block_size=256, batch_size=8, max_iters=20,
                      n_layer=2, n_head=2, n_embd=64, warmup_iters=5, eval_interval=10, eval_iters=2,
                      log_interval=10, mem_rank=8, compile=False, niah_tasks="single,babi"),
    "tiny": dict(out_dir="out-tiny", block_size=64, batch_size=8, max_iters=40, n_layer=2, n_head=2,
                 n_embd=64, warmup_iters=5, eval_interval=20, eval_iters=2, log_interval=10,
                 mem_rank=8, compile=False),
}
MODEL_KEYS = ("block_size", "n_layer", "n_head", "n_embd", "tokenizer")


def parse_config(argv):
    """--config NAME (or --config=NAME) picks a preset; --key=value overrides it, typed as the default."""
    name, overrides, args = "small", [], iter(argv)
    for a in args:
        if a == "--config":
            name = next(args, "")
        elif a.startswith("--config="):
            name = a.split("=", 1)[1]
        else:
            overrides.append(a)
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
    return cfg


def cast(key, val, default):
    kind = type(default)
    try:
        if kind is bool:
            if val.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return val.lower() in ("true", "1")
        return kind(val)
    except ValueError:
        raise SystemExit(f"--{key}={val}: expected a {kind.__name__} (default {default!r})") from None


# ---------------------------------------------------------------------------------------
# data: random windows of a memmapped token file; every token maskable

class TextData:
    def __init__(self, cfg, device):
        d = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", cfg["dataset"])
        if not os.path.exists(os.path.join(d, "train.bin")):
            if cfg["dataset"] != "pydoc":
                raise SystemExit(f"no data in {d}: run python data/{cfg['dataset']}/prepare.py first")
            from data.pydoc.prepare import prepare
            prepare(cfg["tokenizer"])
        with open(os.path.join(d, "meta.json")) as f:
            meta = json.load(f)
        if meta["tokenizer"] != cfg["tokenizer"]:
            raise SystemExit(f"data/{cfg['dataset']} was tokenised with '{meta['tokenizer']}', not "
                             f"'{cfg['tokenizer']}': rerun its prepare.py --tokenizer={cfg['tokenizer']}")
        self.files = {s: os.path.join(d, f"{s}.bin") for s in ("train", "val")}
        self.dtype, self.T, self.B, self.device = meta["dtype"], cfg["block_size"], cfg["batch_size"], device
        for s, path in self.files.items():
            if os.path.getsize(path) // np.dtype(self.dtype).itemsize <= self.T:
                raise SystemExit(f"{path} holds fewer tokens than block_size={self.T}")

    def batch(self, split, gen):
        """(x0, maskable, key_pad) of batch_size windows, positions drawn from gen."""
        data = np.memmap(self.files[split], dtype=self.dtype, mode="r")  # reopened: no leak (nanoGPT)
        ix = torch.randint(len(data) - self.T, (self.B,), generator=gen).tolist()
        x = torch.from_numpy(np.stack([data[i:i + self.T].astype(np.int64) for i in ix]))
        if self.device.startswith("cuda"):
            x = x.pin_memory().to(self.device, non_blocking=True)
        return x, torch.ones_like(x, dtype=torch.bool), None


def make_data(cfg, device):
    return NiahData(cfg, device) if cfg["dataset"] == "niah" else TextData(cfg, device)


# ---------------------------------------------------------------------------------------

def model_config(cfg, enc):
    mask_id = enc._special_tokens["<|mask|>"]
    return ModelConfig(vocab_size=64 * math.ceil(enc.n_vocab / 64), n_vocab=enc.n_vocab, mask_id=mask_id,
                       eot_id=enc.eot_token, block_size=cfg["block_size"], n_layer=cfg["n_layer"],
                       n_head=cfg["n_head"], n_embd=cfg["n_embd"])


def lr_at(it, cfg):
    """Linear warmup, then cosine decay to min_lr."""
    if it < cfg["warmup_iters"]:
        return cfg["lr"] * (it + 1) / cfg["warmup_iters"]
    frac = (it - cfg["warmup_iters"]) / max(1, cfg["max_iters"] - cfg["warmup_iters"])
    return cfg["min_lr"] + 0.5 * (1 + math.cos(math.pi * min(1.0, frac))) * (cfg["lr"] - cfg["min_lr"])


def save_checkpoint(path, obj):
    """torch.save to a temporary file, then rename: a crash never leaves a broken checkpoint."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def step_generator(seed, step, rank, device):
    """The randomness of one step (batch windows, t, masks) depends only on (seed, step, rank),
    so a resumed run sees exactly the batches the uninterrupted run would have seen."""
    g = torch.Generator(device).manual_seed(seed * 1_000_003 + step * 1009 + rank)
    return g, torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + rank)


def batch_loss(model, inner, batch, cfg, mcfg, gen):
    """Outer loss of one batch (MDLM, or MemDLM with its inner loop) and the inner losses.
    model runs the stack from the token ids (the DDP wrapper under torchrun); inner is the
    module itself, used by the inner loop and the layers above the memory."""
    x0, maskable, key_pad = batch
    if cfg["mem"]:
        return memdlm_loss(inner, x0, maskable, mcfg, key_pad, gen, bottom=model)
    x_t, mask, t = forward_process(x0, maskable, inner.cfg.mask_id, generator=gen)
    return mdlm_loss(inner, model(x_t, key_pad=key_pad), x0, mask, t, maskable), []


def compiled(raw, cfg, on_gpu):
    """torch.compile of the model's forward (the inner loop's autograd.grad stays outside)."""
    return torch.compile(raw, mode=None if cfg["compile_mode"] == "default" else cfg["compile_mode"]) \
        if cfg["compile"] and on_gpu else raw


def autocast(cfg, on_gpu):
    """Mixed precision on the GPU (cfg dtype, bf16 by default); full precision on the CPU."""
    return torch.autocast("cuda", dtype=getattr(torch, cfg["dtype"])) if on_gpu else nullcontext()


def make_optimizer(raw, cfg, on_gpu):
    """AdamW, weight decay on matrices only; fused on GPU."""
    decay = [p for p in raw.parameters() if p.dim() >= 2]
    no_decay = [p for p in raw.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]), fused=on_gpu)


def train_step(model, inner, raw, opt, batch, cfg, mcfg, gen, ctx):
    """One optimizer step of theta; returns the (device) loss and inner losses, no host sync."""
    with ctx:
        loss, inner_losses = batch_loss(model, inner, batch, cfg, mcfg, gen)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg["grad_clip"])
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss, inner_losses


def answer_accuracy(raw, x0, maskable, key_pad):
    """(correct, total) argmax predictions of the answers with every scored token of the rows
    that have a prompt masked at once, as at the sampler's first step; <|endoftext|> padding
    left out. A retrieval signal that needs no decoding; (0, 0) for plain text."""
    rows = (~maskable if key_pad is None else ~maskable & ~key_pad).any(1, keepdim=True)
    target = maskable & rows & (x0 != raw.cfg.eot_id)
    if not target.any():
        return 0, 0
    pred = raw.logits(raw(torch.where(maskable & rows, raw.cfg.mask_id, x0), key_pad=key_pad)[target]).argmax(-1)
    return (pred == x0[target]).sum().item(), target.sum().item()


@torch.no_grad()
def evaluate(raw, data, cfg, mcfg, device, ctx):
    """Eval losses on fixed batches and masks (the same in every run with the same seed):
    'eval_loss' is the base model alone (the train-only view); 'eval_loss_mem' first runs
    the inner loop on each eval batch, as in training (the paper's view), at the same x_t;
    'eval_answer_acc' (data with prompts) is answer_accuracy of the base model alone."""
    raw.eval()
    modes = (False, True) if cfg["mem"] else (False,)
    losses, hits = {mem: [] for mem in modes}, [0, 0]
    for i in range(cfg["eval_iters"]):
        g_cpu = step_generator(cfg["seed"] + 1, i, 0, device)[1]
        batch = data.batch("val", g_cpu)
        with ctx:
            for mem in modes:  # a fresh generator each: both see the same t and masks
                g_dev = step_generator(cfg["seed"] + 1, i, 0, device)[0]
                losses[mem].append(batch_loss(raw, raw, batch, {**cfg, "mem": mem}, mcfg, g_dev)[0].item())
            hits = [a + b for a, b in zip(hits, answer_accuracy(raw, *batch))]
    out = {"eval_loss_mem" if mem else "eval_loss": sum(v) / len(v) for mem, v in losses.items()}
    if hits[1]:
        out["eval_answer_acc"] = hits[0] / hits[1]
    raw.train()
    return out


def summarize(log_path, start, ev, wall, device):
    """One record for the results table: the last log steps' mean train loss, the final eval
    losses, the median tokens/s (the first log step, with compilation, left out), peak memory."""
    with open(log_path) as f:
        # this run's steps; a step logged twice (a crash, then resume) counts once, the last time
        recs = list({r["step"]: r for r in map(json.loads, f) if "loss" in r and r["step"] > start}.values())
    tail = recs[-4:]
    tps = sorted(r["tokens_per_s"] for r in recs[1:]) or [float("nan")]
    return {"train_loss": sum(r["loss"] for r in tail) / max(1, len(tail)), **ev,
            "tokens_per_s": tps[len(tps) // 2], "wall_s": wall,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None,
            "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"}


def main(argv):
    cfg = parse_config(argv)
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        torch.distributed.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if torch.cuda.is_available() else "cpu"
        if device != "cpu":
            torch.cuda.set_device(device)
    else:
        rank, world, device = 0, 1, pick_device(cfg["device"])
    master = rank == 0
    on_gpu = device.startswith("cuda")
    torch.manual_seed(cfg["seed"])
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    from data.tokenizer import get_encoding
    enc = get_encoding(cfg["tokenizer"])
    mcfg = MemoryConfig.from_config(cfg)
    mcfg.validate()
    data = make_data(cfg, device)
    # rank 0 evaluates on the global batch: equal eval data for equal global batches on any number of GPUs
    eval_data = make_data({**cfg, "batch_size": cfg["batch_size"] * world}, device) if world > 1 and master else data
    os.makedirs(cfg["out_dir"], exist_ok=True)
    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")

    start, ckpt = 0, None
    if cfg["resume"]:
        if not os.path.exists(ckpt_path):
            raise SystemExit(f"--resume=True but {ckpt_path} does not exist: train without --resume first")
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        for k in MODEL_KEYS + ("mem",):
            if ckpt["config"][k] != cfg[k]:
                raise SystemExit(f"{ckpt_path} was trained with {k}={ckpt['config'][k]!r}, not {cfg[k]!r}: "
                                 f"use the same setting or another --out_dir")
        start = ckpt["step"]
    mconf = model_config(cfg, enc)
    raw = DiffusionLM(mconf).to(device)
    if ckpt is not None:
        raw.load_state_dict(ckpt["model"])
    elif cfg["init_from"]:
        src, _ = load_model(cfg["init_from"], device)
        if asdict(src.cfg) != asdict(mconf):
            raise SystemExit(f"--init_from={cfg['init_from']}: its model ({src.cfg}) differs from this "
                             f"config's ({mconf}): set the same n_layer/n_head/n_embd/tokenizer")
        raw.load_state_dict(src.state_dict())

    opt = make_optimizer(raw, cfg, on_gpu)
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])

    inner = compiled(raw, cfg, on_gpu)
    # DDP wraps the module that runs the stack from the token ids (all of it for MDLM, the
    # layers below the memory for MemDLM); the inner loop and the top run on the module itself
    model = torch.nn.parallel.DistributedDataParallel(inner, device_ids=[device] if on_gpu else None) if ddp else inner
    ctx = autocast(cfg, on_gpu)

    tokens_per_step = cfg["batch_size"] * cfg["block_size"] * world
    if master:
        print(f"{cfg['config']}: {raw.num_params() / 1e6:.2f}M parameters, {'MemDLM' if cfg['mem'] else 'MDLM'}, "
              f"fast weights on layers {memory_layers(mconf.n_layer, mcfg.layer_frac) if cfg['mem'] else '-'}, "
              f"device {device} x{world}, {tokens_per_step} tokens/step")
        if not on_gpu and cfg["max_iters"] > start:
            # a rough CPU rate; tqdm's estimate takes over after the first steps
            flops = 6 * raw.num_params() * tokens_per_step * (cfg["max_iters"] - start) * (1.5 if cfg["mem"] else 1)
            print(f"note: no GPU, training on the CPU; roughly {flops / (2e10 * torch.get_num_threads()) / 60:.1f} "
                  f"minutes for {cfg['max_iters'] - start} steps")
    log = open(os.path.join(cfg["out_dir"], "log.jsonl"), "a") if master else None

    def write(rec):
        log.write(json.dumps(rec) + "\n")
        log.flush()

    def checkpoint(step):
        save_checkpoint(ckpt_path, {"model": raw.state_dict(), "optimizer": opt.state_dict(), "config": cfg,
                                    "model_args": asdict(mconf), "step": step})

    bar = tqdm(range(start, cfg["max_iters"]), initial=start, total=cfg["max_iters"], disable=not master,
               dynamic_ncols=True)
    t_start = t_log = time.time()
    for step in bar:
        if step % cfg["eval_interval"] == 0 and master:
            ev = evaluate(raw, eval_data, cfg, mcfg, device, ctx)
            write({"step": step, **ev})
            bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in ev.items()))
            if step > start:
                checkpoint(step)
            t_log = time.time()  # keep eval time out of tokens/s
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        if cfg["mem"] and step == cfg["mem_start"] and step > 0 and master:
            write({"step": step, "switch": "MemDLM from here on"})
            bar.write(f"step {step}: MDLM -> MemDLM")
        step_cfg = cfg if step >= cfg["mem_start"] else {**cfg, "mem": False}
        g_dev, g_cpu = step_generator(cfg["seed"], step, rank, device)
        loss, inner_losses = train_step(model, inner, raw, opt, data.batch("train", g_cpu), step_cfg, mcfg, g_dev, ctx)
        if (step + 1) % cfg["log_interval"] == 0 and master:
            lossf = loss.item()  # the only host sync of the loop
            dt = (time.time() - t_log) / cfg["log_interval"]
            t_log = time.time()
            rec = {"step": step + 1, "loss": lossf, "lr": lr_at(step, cfg), "tokens_per_s": tokens_per_step / dt}
            for k, l in enumerate(inner_losses):
                rec[f"inner_loss_{k + 1}"] = l.mean().item()
            write(rec)
            bar.set_postfix(loss=f"{lossf:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
    if master:
        if cfg["max_iters"] > start:
            wall = time.time() - t_start
            ev = evaluate(raw, eval_data, cfg, mcfg, device, ctx)
            write({"step": cfg["max_iters"], **ev})
            print(f"step {cfg['max_iters']}: " + ", ".join(f"{k} {v:.4f}" for k, v in ev.items()))
            write({"summary": summarize(log.name, start, ev, wall, device)})
        checkpoint(max(start, cfg["max_iters"]))
        log.close()
    if ddp:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
