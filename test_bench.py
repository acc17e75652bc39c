"""bench.py on the CPU: the tables it prints (timings themselves are GPU benchmarks, not tests)."""
import re

import pytest

import bench
import train


def test_training_bench_prints_both_modes_and_the_ratio(capsys):
    bench.main(["--config", "tiny", "--steps=2", "--warmup=1"])
    out = capsys.readouterr().out
    for mode in ("mdlm", "memdlm"):
        assert re.search(rf"\| {mode} \| 0\.\dM \| [\d.]+ ms \| [\d,]+ tok/s \|", out)
    assert re.search(r"step-time ratio MemDLM/MDLM: \d+\.\d\d", out)


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
    with pytest.raises(SystemExit, match="trained on text.*niah.py"):
        bench.main([f"--sample_from={tmp_path / 'niah'}", "--device=cpu"])
