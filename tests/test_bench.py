"""bench.py on the CPU: the tables it prints (timings themselves are GPU benchmarks, not tests)."""
import re

import pytest

from data.tokenizer import get_encoding
from experiments import bench
import train


def test_training_bench_prints_both_modes_the_kernel_and_the_ratio(capsys):
    bench.main(["--config", "tiny", "--steps=2", "--warmup=1", "--device=cpu", "--sdpa=default,math"])
    out = capsys.readouterr().out
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
    assert "| efficient | mdlm | | | | | | not available here |" in capsys.readouterr().out  # a CUDA kernel
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


def test_flop_floor_counts_each_pass_of_the_memdlm_step():
    """8 layers of width 64 (SwiGLU hidden 192), 320 vocabulary rows, T = 16, one memory layer of
    rank 4: counted by hand, pass by pass, per token."""
    from memory import MemoryConfig
    from model import ModelConfig
    cfg = ModelConfig(n_layer=8, n_head=2, n_embd=64, block_size=16)
    layer = 2 * (4 * 64 * 64 + 3 * 64 * 192) + 4 * 16 * 64   # matmuls + QK^T and AV
    lora = 2 * 4 * ((64 + 192) * 2 + (192 + 64))            # gate, up (64 -> 192), down (192 -> 64)
    head = 2 * 64 * 320
    bottom, top = 7 * layer, layer + lora + head
    mdlm = 3 * (8 * layer + head)
    memdlm = 3 * bottom + 1 * bottom + 2 * 2 * top + 3 * top  # shared bottom, x_pre's bottom, 2 inner, outer
    assert bench.flop_floor(cfg, MemoryConfig(rank=4), 16) == pytest.approx(memdlm / mdlm)
    # more inner steps or more memory layers cost more
    assert bench.flop_floor(cfg, MemoryConfig(rank=4, steps=3), 16) > memdlm / mdlm
    assert bench.flop_floor(cfg, MemoryConfig(rank=4, layer_frac=0.5), 16) > memdlm / mdlm
    # with the gather each pass's head runs at its expected masked share: 1/2 at x_t, 1 - 1/(2 s) = 2/3 at x_pre
    top_at = lambda share: layer + lora + share * head
    gathered = (3 * bottom + bottom + 2 * top_at(2 / 3) + 2 * top_at(0.5) + 3 * top_at(0.5)) / (3 * (8 * layer + head / 2))
    assert bench.flop_floor(cfg, MemoryConfig(rank=4), 16, gathered=True) == pytest.approx(gathered)
    # attention in chunks of 16 at T = 64 costs what full attention at 16 does
    chunked = ModelConfig(n_layer=8, n_head=2, n_embd=64, block_size=64, attn_chunk=16)
    assert bench.flop_floor(chunked, MemoryConfig(rank=4), 64) == pytest.approx(memdlm / mdlm)


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
                            (["--gather=auto", "--sdpa=default,math"], (default, True))):
        bench.main(argv + extra)
        assert seen[-1] == expected and (model.GATHER_ABOVE, inductor.force_disable_caches) == (default, caches_off)
    assert "gather on" in capsys.readouterr().out.split("gather off")[0]
    with pytest.raises(SystemExit, match=r"^--gather=yes: use auto, on or off$"):
        bench.main(argv + ["--gather=yes"])


def test_bench_help_lists_its_settings(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("Benchmark training steps") and "gather (default auto)" in out
