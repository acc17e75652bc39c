"""bench.py on the CPU: the tables it prints (timings themselves are GPU benchmarks, not tests)."""
import multiprocessing
import os
import re
import signal
import sys
import threading
import time

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import flop_registry

from data.tokenizer import get_encoding
from experiments import bench
from model import ends_in_one_line
import train


def test_training_bench_prints_both_modes_the_kernel_and_the_ratio(capfd):
    # two backends: each in a process of its own, its lines in order with the parent's (capfd: at the fd)
    bench.main(["--config", "tiny", "--steps=2", "--warmup=1", "--device=cpu", "--sdpa=default,math"])
    out = capfd.readouterr().out
    # a table with its header; on the CPU what is not measured is "-", and a note says so (no "nan")
    assert ("| SDPA | mode | parameters | step (median) | tokens/s | MFU | peak memory | kernel |\n"
            "|---|---|---|---|---|---|---|---|\n") in out
    # the profiler names the kernel that ran: torch's CPU choice is its flash kernel; --sdpa=math forces math
    for backend, kernel in (("default", "flash"), ("math", "math")):
        for mode in ("mdlm", "memdlm"):
            assert re.search(rf"\n\| {backend} \| {mode} \| 0\.\dM \| [\d.]+ ms \| [\d,]+ tok/s \| - \| - \| {kernel} \|\n",
                             out), out
        assert re.search(rf"SDPA {backend}: step-time ratio MemDLM/MDLM: \d+\.\d\d; FLOP floor \d\.\d\d "
                         r"\(measured [+-]\d+\.\d% over it\)", out)
    assert "note: on the CPU, MFU and peak memory are not measured" in out and "nan" not in out
    bench.main(["--config", "tiny", "--steps=1", "--warmup=0", "--device=cpu", "--sdpa=efficient", "--modes=mdlm"])
    assert "| efficient | mdlm | | | | | | not available here |" in capfd.readouterr().out  # a CUDA kernel
    with pytest.raises(SystemExit, match=r"^--sdpa=flash,fast: a comma list of default, cudnn, flash, efficient, math$"):
        bench.main(["--config", "tiny", "--device=cpu", "--sdpa=flash,fast"])


def test_sampling_bench_and_its_errors(tmp_path, capsys):
    train.main(["--config", "tiny", f"--out_dir={tmp_path / 'text'}", "--max_iters=2"])
    capsys.readouterr()
    bench.main([f"--sample_from={tmp_path / 'text'}", "--prompt_lens=32", "--gen_len=8", "--block=4",
                "--sample_batch=2", "--device=cpu"])
    out = capsys.readouterr().out
    for setting in ("plain", "--adapt", "threshold 0.9", "prefix cache"):
        assert f"| 32 | {setting} |" in out
    assert re.search(r"prefix cache \| [\d.]+ \| [\d,]+ \| [\d.]+x plain, \d+% tokens as plain", out)
    with pytest.raises(SystemExit, match=r"^--prompt_lens: 99999 tokens is not shorter than the held-out split"):
        bench.main([f"--sample_from={tmp_path / 'text'}", "--prompt_lens=32,99999", "--device=cpu"])
    train.main(["--config", "niah_tiny", f"--out_dir={tmp_path / 'niah'}", "--max_iters=1"])
    with pytest.raises(SystemExit, match="trained on text.*niah_eval"):
        bench.main([f"--sample_from={tmp_path / 'niah'}", "--device=cpu"])


class CountedFlops(TorchDispatchMode):
    """The FLOPs of the matmuls and attention run under it, as torch.utils.flop_counter counts each
    op (its FlopCounterMode tracks modules with hooks that torch.func.grad refuses)."""
    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._overloadpacket in flop_registry:
            shape = lambda x: x.shape if isinstance(x, torch.Tensor) else x
            self.total += flop_registry[func._overloadpacket](*tree_map(shape, args), **tree_map(shape, kwargs or {}),
                                                              out_val=tree_map(shape, out))
        return out


@pytest.mark.parametrize("model_kw, mem_kw, gather", [
    ({}, {}, False),                                         # the paper's default: K = 2, one memory layer of 8
    ({}, {"steps": 1}, False), ({}, {"steps": 3}, False),    # x_t alone; a state between x_pre and x_t
    ({}, {"layer_frac": 0.5}, False),                        # four memory layers
    ({}, {"adapter": "full", "layer_frac": 0.3}, False),     # full-rank fast weights
    ({"block_size": 64, "attn_chunk": 16}, {}, False),       # attention in chunks
    ({}, {}, True),                                          # the head at the masked positions alone
])
def test_flop_floor_is_what_torch_counts_in_the_two_steps(monkeypatch, model_kw, mem_kw, gather):
    """flop_floor equals the ratio of the FLOPs torch counts in an MDLM and a MemDLM loss and
    backward of one batch (8 layers of width 64, attention on the math kernel so that its matmuls
    are counted), at the masked shares this batch drew when the head gathers."""
    import memory
    import model
    cfg = model.ModelConfig(**{"n_layer": 8, "n_head": 2, "n_embd": 64, "block_size": 32, **model_kw})
    mcfg = memory.MemoryConfig(**{"rank": 4, **mem_kw})
    monkeypatch.setattr(model, "GATHER_ABOVE", 0 if gather else float("inf"))
    shares, gathered = [], memory.gathered
    monkeypatch.setattr(memory, "gathered", lambda m, mask: shares.append(mask.float().mean().item()) or gathered(m, mask))
    torch.manual_seed(0)
    net = model.DiffusionLM(cfg)
    x0, maskable = torch.randint(0, 256, (4, cfg.block_size)), torch.ones(4, cfg.block_size, dtype=torch.bool)

    def counted(loss):
        with sdpa_kernel(SDPBackend.MATH), CountedFlops() as c:
            loss(torch.Generator().manual_seed(0)).backward()
        return c.total
    def mdlm(g):
        x_t, mask, t = model.forward_process(x0, maskable, cfg.mask_id, generator=g)
        return model.mdlm_loss(net, net(x_t), x0, mask, t, maskable)
    ratio = counted(lambda g: memory.memdlm_loss(net, x0, maskable, mcfg, generator=g)[0]) / counted(mdlm)
    head_share = (shares[1], shares[0]) if gather else (1.0, 1.0)  # the states noisiest first: x_pre, x_t
    assert bench.flop_floor(cfg, mcfg, cfg.block_size, head_share=head_share) == pytest.approx(ratio, rel=1e-9)
    assert ratio > 1.05


def test_expected_head_share_is_the_mean_masked_share():
    from memory import MemoryConfig
    t = torch.rand(200_000, generator=torch.Generator().manual_seed(0))
    for s in (1.25, 1.5, 2.0):
        at_t, at_pre = bench.expected_head_share(MemoryConfig(pre_scale=s))
        assert at_t == 0.5 and at_pre == pytest.approx((s * t).clamp(max=1).mean().item(), abs=3e-3)


def test_mfu_counts_6n_and_full_attention(monkeypatch, capsys):
    """MFU = (6 N + 12 L d T) x tokens / step time / peak (N: the matmuls' weights, not the
    embedding lookup; QK^T and AV over the T keys a query sees): on a fake GPU peak, with the step
    time fixed, the printed MFU is that count's, by hand."""
    cfg = train.parse_config(["--config", "tiny", "--device=cpu"])  # 2 layers, width 64, T = 64, batch 8
    model = train.DiffusionLM(train.model_config(cfg, get_encoding("byte")))
    N = model.num_params() - 320 * 64  # the 320-row byte embedding is a lookup
    assert bench.model_flops_per_token(model, 64) == 6 * N + 12 * 2 * 64 * 64
    chunked = train.DiffusionLM(train.model_config({**cfg, "attn_chunk": 16}, get_encoding("byte")))
    assert bench.model_flops_per_token(chunked, 64) == 6 * N + 12 * 2 * 64 * 16  # attention within 16 keys
    # where masked_ce gathers, the head counts at the share of positions where it runs
    assert bench.model_flops_per_token(model, 64, 0.5) == 6 * (N - 320 * 64 / 2) + 12 * 2 * 64 * 64
    dt, tokens = 0.5, 8 * 64
    peak = (6 * N + 12 * 2 * 64 * 64) * tokens / dt / 0.5  # 50% MFU exactly
    monkeypatch.setattr(bench, "peak_flops", lambda device: (peak, "a fake peak"))
    monkeypatch.setattr(bench, "bench_training", lambda cfg, mem, b, device: (dt, float("nan"), model, "flash"))
    bench.main(["--config", "tiny", "--device=cpu", "--modes=mdlm"])
    out = capsys.readouterr().out
    assert re.search(r"\| mdlm \| 0\.\dM \| 500\.00 ms \| 1,024 tok/s \| 50\.0% \| - \| flash \|", out), out


def test_bench_ctrl_c_is_one_line(monkeypatch):
    def interrupted(*a):
        raise KeyboardInterrupt
    monkeypatch.setattr(bench, "bench_training", interrupted)
    with pytest.raises(SystemExit, match=r"^interrupted: a benchmark writes nothing; run the command again$"):
        bench.main(["--config", "tiny", "--device=cpu"])


def test_gather_and_the_inductor_caches_hold_while_a_step_is_timed_and_are_restored(monkeypatch, capsys):
    import torch._inductor.config as inductor
    import model
    default, caches_off = model.GATHER_ABOVE, inductor.force_disable_caches
    seen, real = [], bench.bench_training
    def spy(*a):
        seen.append((model.GATHER_ABOVE, inductor.force_disable_caches))
        return real(*a)
    monkeypatch.setattr(bench, "bench_training", spy)
    argv = ["--config", "tiny", "--steps=1", "--warmup=0", "--device=cpu", "--modes=mdlm"]
    for extra, expected in ((["--gather=on"], (0, caches_off)), (["--gather=off"], (float("inf"), caches_off)),
                            (["--gather=auto", "--sdpa=math"], (default, True))):
        bench.main(argv + extra)
        assert seen[-1] == expected and (model.GATHER_ABOVE, inductor.force_disable_caches) == (default, caches_off)
    assert "gather on" in capsys.readouterr().out.split("gather off")[0]
    with pytest.raises(SystemExit, match=r"^--gather=yes: use auto, on or off$"):
        bench.main(argv + ["--gather=yes"])


def test_a_backend_in_its_own_process_fails_in_one_line_and_ends_with_its_parent():
    with pytest.raises(SystemExit, match=r"^--sdpa=math: its process failed \(exit code 3; its error is above\)$"):
        bench.in_own_process(sys.exit, (3,), "--sdpa=math")
    # a SIGTERM (or Ctrl-C) to the parent while the child runs: the parent ends it and stops in one line
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    start = time.monotonic()
    with pytest.raises(SystemExit, match="^stopped$"), ends_in_one_line("stopped"):
        bench.in_own_process(time.sleep, (60,), "--sdpa=math")
    assert time.monotonic() - start < 30 and not multiprocessing.active_children()


def test_bench_help_lists_its_settings(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("Benchmark training steps") and "gather (default auto)" in out
