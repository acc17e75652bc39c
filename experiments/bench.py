"""Benchmark training steps of MDLM and MemDLM in one process (and, with --sample, the sampler).

    python -m experiments.bench --config small                       # any train.py key can be overridden
    python -m experiments.bench --config small --block_size=8192 --batch_size=2
    python -m experiments.bench --config small --profile=True        # top kernels of each mode's step
    python -m experiments.bench --config base --block_size=4096 --batch_size=8 --sdpa=default,cudnn,flash
    python -m experiments.bench --config base --tokenizer=o200k_base --gather=off  # masked_ce's logits everywhere

Prints tokens/s, model FLOPs utilisation, peak memory, the attention kernel that ran and the
step-time ratio MemDLM/MDLM (on the CPU: no MFU and no peak memory, "-" in the table).
--sdpa times each named SDPA backend in turn (default: torch's own choice), each in a process
of its own, compiled afresh under torch.nn.attention.sdpa_kernel with Inductor's caches off:
the compiled step takes its kernel when it is traced, and a cached graph (whose key leaves the
backend out) would bring back the first one's (PyTorch issue 185449); the kernel column shows
the one that ran. (In one process, flash as the third backend's compile stalled on an H100.)
--gather: masked_ce's logits at the masked positions only (on), at every position (off), or as
model.GATHER_ABOVE decides by size (auto).
Steps are timed with CUDA events after a warm-up (compilation included there); the median
of --steps steps is reported. MFU counts the model's useful work per token,
6 N + 12 n_layer n_embd T (N: the matmuls' weights, the token embedding left out as a lookup
and the head counted where it runs: the masked half of the positions when masked_ce gathers;
the second term: bidirectional attention over the T keys a query sees, forward and backward;
with --attn_chunk T is the chunk), for both modes, against the card's dense bf16 peak (989 TFLOP/s
for H100/H200 SXM). The FLOP floor is MemDLM's step FLOPs over MDLM's, as torch counts them.
"""

if not __package__:  # run as a file: the imports below need the repository root on the path
    raise SystemExit("run it from the repository root as a module: python -m experiments.bench")

import multiprocessing
import signal
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext

import torch
import torch._inductor.config
from torch.nn.attention import SDPBackend, sdpa_kernel

import model
import train
from model import ends_in_one_line

BENCH = dict(steps=30, warmup=8, profile=False, modes="mdlm,memdlm",
             sample_from="", prompt_lens="1024,4096", gen_len=128, block=32, sample_batch=8, threshold=0.9,
             sdpa="default", gather="auto")
SAMPLING_KEYS = ("sample_from", "prompt_lens", "gen_len", "block", "sample_batch", "threshold", "device")  # --sample_from's
GATHER = {"auto": model.GATHER_ABOVE, "on": 0, "off": float("inf")}  # model.GATHER_ABOVE for each --gather
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}
# the aten op of each SDPA backend, as the profiler names it (its _backward too)
SDPA_OPS = {"cudnn": "_scaled_dot_product_cudnn_attention", "flash": "_scaled_dot_product_flash_attention",
            "efficient": "_scaled_dot_product_efficient_attention", "math": "_scaled_dot_product_attention_math"}


def parse(argv):
    if {"-h", "--help"} & set(argv):
        print(__doc__.strip() + "\n\nbench settings (--key=value): " +
              ", ".join(f"{k} (default {v})" for k, v in BENCH.items()) + "; any train.py key as well")
        raise SystemExit(0)
    bench, rest = dict(BENCH), []
    for a in argv:
        key = a[2:].split("=", 1)[0] if a.startswith("--") and "=" in a else ""
        if key in BENCH:
            bench[key] = train.cast(key, a.split("=", 1)[1], BENCH[key])
        else:
            rest.append(a)
    check(bench)
    return bench, train.parse_config(rest)


def check(bench):
    """Stop with one line at the first bench setting that cannot run."""
    for k in ("steps", "sample_batch", "gen_len", "block"):
        if bench[k] < 1:
            raise SystemExit(f"--{k}={bench[k]}: must be a positive integer")
    if bench["warmup"] < 0:
        raise SystemExit(f"--warmup={bench['warmup']}: must be >= 0")
    modes = bench["modes"].split(",")
    if not modes or not set(modes) <= {"mdlm", "memdlm"} or len(set(modes)) < len(modes):
        raise SystemExit(f"--modes={bench['modes']}: a comma list of mdlm and memdlm, each once")
    if not 0 <= bench["threshold"] <= 1:
        raise SystemExit(f"--threshold={bench['threshold']}: a confidence within 0 and 1")
    lens = bench["prompt_lens"].split(",")
    if not all(v.strip().isdigit() and int(v) >= 1 for v in lens):
        raise SystemExit(f"--prompt_lens={bench['prompt_lens']}: a comma list of positive integers, e.g. 1024,4096")
    if not set(bench["sdpa"].split(",")) <= {"default", *SDPA_OPS}:
        raise SystemExit(f"--sdpa={bench['sdpa']}: a comma list of default, {', '.join(SDPA_OPS)}")
    if bench["gather"] not in GATHER:
        raise SystemExit(f"--gather={bench['gather']}: use auto, on or off")
    if bench["gen_len"] % bench["block"]:
        raise SystemExit(f"--gen_len={bench['gen_len']} must be a multiple of --block={bench['block']}")


def peak_flops(device):
    if not device.startswith("cuda"):
        return None, "no peak (CPU)"
    name = torch.cuda.get_device_name()
    for k, v in PEAK_BF16.items():
        if k in name:
            return v, f"{name}: {v / 1e12:.0f} TFLOP/s dense bf16"
    return None, f"{name}: peak unknown"


def flop_floor(model_cfg, mem_cfg, T, head_share=(1.0, 1.0)):
    """MemDLM's step FLOPs over MDLM's (paper default: anchor trajectory, scope response): the
    matmuls each step runs, as torch's FLOP counter counts them (tests/test_bench.py). A backward
    computes only the gradients the step needs: weights' and activations' for theta (twice the
    forward), activations' alone to reach phi (once the forward, attention's twice: all its
    matmuls are activation gradients). The stack is cut below the first memory layer into a
    bottom (L_b layers) and a top (the n memory layers and the head h). MDLM: 3 (L f + h).
    MemDLM: the shared bottom forward and backward for x_t; a no-grad bottom forward for each of
    the K - 1 states above the anchor; K inner stages, each a top forward and a backward to phi
    that stops at the first memory layer's fast weights (no backward through its attention, nor
    to its FFN's input); the outer top forward and backward, phi_K a constant.
    head_share: the share of positions where the head runs at x_t and at x_pre (the states
    between in proportion): 1 for logits everywhere, the masked share where masked_ce gathers
    (expected_head_share)."""
    from memory import memory_layers
    d, H, V, L, K = model_cfg.n_embd, model_cfg.ffn_hidden, model_cfg.vocab_size, model_cfg.n_layer, mem_cfg.steps
    proj, att = 2 * (4 * d * d + 3 * d * H), 4 * keys_seen(model_cfg, T) * d  # qkv, out, gate/up/down; QK^T and AV
    f, h = proj + att, 2 * d * V
    n = len(memory_layers(L, mem_cfg.layer_frac))

    def adapter(d_in, d_out):  # one projection's fast weights: forward, and backward to phi alone
        if mem_cfg.adapter == "lora":  # u = x A^T, y = u B^T: dB and du from dy, dA from du
            r = mem_cfg.rank
            return 2 * r * (d_in + d_out), 2 * r * (2 * d_out + d_in)
        return 2 * d_in * d_out, 2 * d_in * d_out
    (gate_f, gate_phi), (down_f, _) = adapter(d, H), adapter(H, d)
    fast = 2 * gate_f + down_f                           # gate, up and down, forward; to phi and x: twice that
    split = 2 * d * H + 2 * down_f + 2 * gate_phi        # the first memory layer: down's input, then gate/up's phi
    at_t, at_pre = head_share
    shares = [at_t + (at_pre - at_t) * (K - 1 - k) / max(K - 1, 1) for k in range(K)]  # x_pre ... x_t
    F_bot, F_top = (L - n) * f, n * (f + fast)
    inner = sum(F_top + 2 * a * h + (n - 1) * (proj + 2 * att + 2 * fast) + split for a in shares)
    outer = 3 * (n * f + at_t * h) + 2 * n * fast       # phi_K a constant: its matmuls' backward to x alone
    mdlm = 3 * (L * f + at_t * h)
    return (3 * F_bot + (K - 1) * F_bot + inner + outer) / mdlm


def expected_head_share(mem_cfg):
    """The expected masked share of the positions at x_t and at x_pre: E[t] = 1/2, and
    E[min(1, s t)] = 1 - 1/(2 s) (s: pre_scale), t ~ U(0, 1)."""
    return 0.5, 1 - 0.5 / mem_cfg.pre_scale


def bench_training(cfg, mem, bench, device):
    """Median step time (s), peak memory (GiB) and the model of one mode, same seed and batches."""
    from data.tokenizer import get_encoding
    cfg = {**cfg, "mem": mem}
    on_gpu = device.startswith("cuda")
    torch.manual_seed(cfg["seed"])
    raw_model = train.DiffusionLM(train.model_config(cfg, get_encoding(cfg["tokenizer"]))).to(device)
    opt = train.make_optimizer(raw_model, cfg, on_gpu)
    nets = train.compiled(raw_model, cfg, device)
    mcfg = train.MemoryConfig.from_config(cfg)
    data = train.make_data(cfg, device)
    batches = [data.batch("train", train.step_generator(cfg["seed"], i, 0, device)[1]) for i in range(4)]
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(bench["warmup"] + bench["steps"]):
        g_dev, _ = train.step_generator(cfg["seed"], i, 0, device)
        t0 = time.perf_counter()
        if on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        train.train_step(nets, opt, batches[i % 4], cfg, mcfg, g_dev)
        if on_gpu:
            end.record()
            end.synchronize()
            dt = start.elapsed_time(end) / 1e3
        else:
            dt = time.perf_counter() - t0
        if i >= bench["warmup"]:
            times.append(dt)
    peak = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else float("nan")
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu and bench["profile"] else [])
    with profile(activities=acts) as prof:  # after the timing: which attention kernel the compiled step calls
        for i in range(5 if bench["profile"] else 1):
            train.train_step(nets, opt, batches[i % 4], cfg, mcfg, train.step_generator(cfg["seed"], i, 0, device)[0])
        if on_gpu:
            torch.cuda.synchronize()
    events = prof.key_averages()
    if bench["profile"]:
        print(events.table(sort_by="cuda_time_total" if on_gpu else "cpu_time_total", row_limit=25))
    names = {e.key for e in events}
    kernel = "+".join(k for k, op in SDPA_OPS.items() if any(op in n for n in names)) or "unfused"
    if on_gpu and cfg["compile"] and cfg["compile_mode"] == "reduce-overhead":
        kernel = "hidden in a CUDA graph (--compile_mode=default shows it)"  # the profiler sees a graph replay, no ops
    return statistics.median(times), peak, raw_model, kernel


def timed(fn, on_gpu):
    """Seconds of one call of fn, after one warm-up call."""
    fn()
    if on_gpu:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if on_gpu:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def bench_sampling(bench, device):
    """Tokens/s of sample.generate for the checkpoint in --sample_from, at each prompt length:
    plain, with --adapt (and the adaptation's share of the time), with the threshold and with
    the prefix cache (and the share of tokens equal to plain's)."""
    import numpy as np

    from model import autocast, load_model
    from sample import generate, write_memory
    net, cfg = load_model(bench["sample_from"], device, usable_for="benchmark")
    on_gpu = device.startswith("cuda")
    mcfg = train.MemoryConfig.from_config(cfg)
    data = train.make_data(cfg, "cpu")
    if not hasattr(data, "files"):
        raise SystemExit(f"--sample_from needs a checkpoint trained on text; {bench['sample_from']} was trained on "
                         f"dataset={cfg['dataset']}: time its sampling with python -m experiments.niah_eval, which prints answers/s")
    val = np.memmap(data.files["val"], dtype=data.dtype, mode="r")
    B, G, blk = bench["sample_batch"], bench["gen_len"], bench["block"]
    print(f"sampling: {bench['sample_from']}, batch {B}, gen_len {G}, blocks of {blk}, steps = gen_len")
    lens = list(map(int, bench["prompt_lens"].split(",")))
    if too_long := [L for L in lens if L >= len(val)]:
        raise SystemExit(f"--prompt_lens: {too_long[0]} tokens is not shorter than the held-out split "
                         f"({len(val)} tokens): choose shorter prompts")
    if max(lens) + G > net.cfg.block_size:
        print(f"note: the model trained at block_size={net.cfg.block_size}; prompts of up to {max(lens)} tokens and "
              f"{G} generated run past it (RoPE extrapolates: the speed holds, the text may not; --prompt_lens sets the lengths)")
    print("| prompt | setting | s/batch | tok/s | note |\n|---|---|---|---|---|")
    for L in lens:
        prompts = [val[i * 997 % (len(val) - L):][:L].astype(int).tolist() for i in range(B)]
        run = lambda **kw: generate(net, prompts, gen_len=G, steps=G, block_len=blk,
                                    generator=torch.Generator(device).manual_seed(0), mcfg=mcfg, **kw)
        base, (ref, _) = timed(run, on_gpu)
        print(f"| {L} | plain | {base:.3f} | {B * G / base:,.0f} | |")
        dt, _ = timed(lambda: run(adapt=True), on_gpu)
        with autocast(device):  # as inside generate
            mem, _ = timed(lambda: write_memory(net, prompts, mcfg, generator=torch.Generator(device).manual_seed(0)),
                           on_gpu)
        print(f"| {L} | --adapt | {dt:.3f} | {B * G / dt:,.0f} | adaptation {100 * mem / dt:.0f}% of the time |")
        for name, kw in ((f"threshold {bench['threshold']}", dict(threshold=bench["threshold"])),
                         ("prefix cache", dict(prefix_cache=True))):
            if kw.get("prefix_cache") and net.cfg.attn_chunk:
                print(f"| {L} | {name} | | | not for attn_chunk={net.cfg.attn_chunk} (the cache attends to a whole prefix) |")
                continue
            dt, (out, _) = timed(lambda: run(**kw), on_gpu)
            same = (out == ref).float().mean().item()
            print(f"| {L} | {name} | {dt:.3f} | {B * G / dt:,.0f} | {base / dt:.1f}x plain, "
                  f"{100 * same:.0f}% tokens as plain |")


def keys_seen(model_cfg, T):
    """The keys each query attends to: all T, or its chunk's attn_chunk."""
    return model_cfg.attn_chunk if 0 < model_cfg.attn_chunk < T else T


def model_flops_per_token(model, T, head_share=1.0):
    """The model's useful work per token of a training step (PaLM, Appendix B): 6 N for the
    matmuls' forward and backward (N without the token embedding: a lookup, no matmul; the
    untied head is counted at head_share, the share of positions where it runs: all of them, or
    the masked ones where masked_ce gathers), and 12 L d T for bidirectional attention (QK^T and
    AV, 2 L d T each forward, x3 with the backward), T the keys a query sees."""
    n = model.num_params() - model.tok_emb.weight.numel() - (1 - head_share) * model.lm_head.weight.numel()
    return 6 * n + 12 * model.cfg.n_layer * model.cfg.n_embd * keys_seen(model.cfg, T)


def main(argv):
    with ends_in_one_line("interrupted: a benchmark writes nothing; run the command again"):
        return _main(argv)


def _main(argv):
    bench, cfg = parse(argv)
    if bench["sample_from"]:
        unused = [a.split("=")[0] for a in argv if a.startswith("--") and a[2:].split("=")[0] not in SAMPLING_KEYS]
        if unused:
            print(f"note: --sample_from times the sampler alone; {', '.join(unused)} "
                  f"{'set' if len(unused) > 1 else 'sets'} the training benchmark and {'are' if len(unused) > 1 else 'is'} left out")
        return bench_sampling(bench, train.pick_device(cfg["device"]))
    device = train.pick_device(cfg["device"])
    on_gpu = device.startswith("cuda")
    peak, peak_note = peak_flops(device)
    print(f"bench: config {cfg['config']}, block_size {cfg['block_size']}, batch {cfg['batch_size']}, "
          f"compile {cfg['compile']}, gather {bench['gather']}, {peak_note}")
    if not (peak and on_gpu):
        print("note: " + ("on the CPU, MFU and peak memory are not measured (no peak FLOP/s, no CUDA memory "
                          "statistics): -" if not on_gpu else "MFU is not measured (this GPU's peak is unknown): -"))
    print("| SDPA | mode | parameters | step (median) | tokens/s | MFU | peak memory | kernel |\n"
          "|---|---|---|---|---|---|---|---|")
    backends = bench["sdpa"].split(",")
    for backend in backends:
        args = (cfg, bench, backend, device, peak)
        if len(backends) == 1:
            bench_backend(*args)
        else:  # a process for each: in one, flash as the third fresh compile stalled (RESULTS.md, H100)
            in_own_process(bench_backend, args, f"--sdpa={backend}")


def bench_backend(cfg, bench, backend, device, peak):
    """The table's rows for one SDPA backend: each mode compiled afresh and timed; then the ratio."""
    on_gpu = device.startswith("cuda")
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
    tokens = cfg["batch_size"] * cfg["block_size"]
    mcfg = train.MemoryConfig.from_config(cfg)
    rows = {}
    for mode in bench["modes"].split(","):
        torch._dynamo.reset()  # compile afresh under this backend
        try:
            with measured_under(bench, backend):
                dt, mem_gib, raw_model, kernel = bench_training(cfg, mode == "memdlm", bench, device)
                # where the head runs, as masked_ce decided: every position, or the masked ones
                head_share = (expected_head_share(mcfg) if model.gathers(tokens, raw_model.cfg.vocab_size)
                              else (1.0, 1.0))
        except RuntimeError as e:  # a backend this card, dtype or shape does not support
            if "No viable backend" not in str(e):
                raise
            print(f"| {backend} | {mode} | | | | | | not available here |")
            continue
        n = raw_model.num_params()
        useful = model_flops_per_token(raw_model, cfg["block_size"], head_share[0]) * tokens
        mfu = useful / dt / peak if peak else None
        rows[mode], model_cfg = dt, raw_model.cfg
        print(f"| {backend} | {mode} | {n / 1e6:.1f}M | {dt * 1e3:.2f} ms | {tokens / dt:,.0f} tok/s | "
              f"{'-' if mfu is None else f'{100 * mfu:.1f}%'} | {f'{mem_gib:.2f} GiB' if on_gpu else '-'} | {kernel} |")
        del raw_model
        if on_gpu:
            torch.cuda.empty_cache()
    if "mdlm" in rows and "memdlm" in rows:
        print_ratio(rows["memdlm"] / rows["mdlm"], model_cfg, mcfg, cfg["block_size"], backend, head_share)


def in_own_process(fn, args, what):
    """fn(*args) in a fresh Python process (spawned: nothing of this one's CUDA or compiler state),
    its lines in order with ours. Ctrl-C or SIGTERM here ends it too; it fails in one line."""
    sys.stdout.flush()
    child = multiprocessing.get_context("spawn").Process(target=quiet_on_ctrl_c, args=(fn, args))
    child.start()
    try:
        child.join()
    finally:  # a Ctrl-C or SIGTERM here (raised in join) ends the child too
        child.terminate()
        child.join()
    if child.exitcode:
        raise SystemExit(f"{what}: its process failed (exit code {child.exitcode}; its error is above)")


def quiet_on_ctrl_c(fn, args):
    """A child's target: Ctrl-C reaches the whole terminal's process group, and the parent ends
    the child itself, so the child ignores it rather than print a traceback of its own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fn(*args)


@contextmanager
def measured_under(bench, backend):
    """What a step is compiled and timed under: the SDPA backend (torch's own choice for "default"),
    Inductor's caches off when backends are compared (a cached graph would bring back another
    backend's kernel: its key leaves the backend out, PyTorch issue 185449), and --gather's
    threshold for masked_ce; all as before afterwards."""
    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    default_gather = model.GATHER_ABOVE
    model.GATHER_ABOVE = GATHER[bench["gather"]]
    try:
        with nullcontext() if backend == "default" else sdpa_kernel([backends[backend]]), \
                torch._inductor.config.patch(force_disable_caches=bench["sdpa"] != "default"):
            yield
    finally:
        model.GATHER_ABOVE = default_gather


def print_ratio(ratio, model_cfg, mem_cfg, T, backend, head_share):
    if mem_cfg.trajectory == "anchor" and mem_cfg.scope == "response":
        floor = flop_floor(model_cfg, mem_cfg, T, head_share=head_share)
        print(f"SDPA {backend}: step-time ratio MemDLM/MDLM: {ratio:.2f}; FLOP floor {floor:.2f}"
              f"{' (the head at the masked tokens)' if head_share != (1.0, 1.0) else ''} "
              f"(measured {100 * (ratio / floor - 1):+.1f}% over it)")
    else:
        print(f"SDPA {backend}: step-time ratio MemDLM/MDLM: {ratio:.2f}")

if __name__ == "__main__":
    main(sys.argv[1:])
