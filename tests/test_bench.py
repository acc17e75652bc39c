"""bench.py on the CPU: the tables it prints (timings themselves are GPU benchmarks, not tests)."""
import re

import pytest

from experiments import bench
import train


def test_training_bench_prints_both_modes_and_the_ratio(capsys):
    bench.main(["--config", "tiny", "--steps=2", "--warmup=1"])
    out = capsys.readouterr().out
    for mode in ("mdlm", "memdlm"):
        assert re.search(rf"\| {mode} \| 0\.\dM \| [\d.]+ ms \| [\d,]+ tok/s \|", out)
    assert re.search(r"step-time ratio MemDLM/MDLM: \d+\.\d\d; FLOP floor \d\.\d\d \(measured [+-]\d+\.\d% over it\)", out)


def test_sampling_bench_and_its_errors(tmp_path, capsys):
    train.main(["--config", "tiny", f"--out_dir={tmp_path / 'text'}", "--max_iters=2"])
    capsys.readouterr()
    bench.main([f"--sample_from={tmp_path / 'text'}", "--prompt_lens=32", "--gen_len=8", "--block=4",
                "--sample_batch=2", "--device=cpu"])
    out = capsys.readouterr().out
    for setting in ("plain", "--adapt", "threshold 0.9", "prefix cache"):
        assert f"| 32 | {setting} |" in out
    assert re.search(r"prefix cache \| [\d.]+ \| [\d,]+ \| [\d.]+x plain, \d+% tokens as plain", out)
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
