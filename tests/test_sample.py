"""Tests of sample.py: the unmasking schedule, blocks, determinism, batching, --adapt, the CLI.
CPU only, a few seconds: python -m pytest -q test_sample.py"""
import re

import numpy as np
import pytest
import torch

import sample
import train
from data.tokenizer import get_encoding, open_split
from memory import MemoryConfig, flat
from model import DiffusionLM, KVCache, ModelConfig, forward_process, mdlm_loss
from sample import documents, generate, main, pad_batch, plan, readability, reveal_schedule, write_memory

MASK = 257
MCFG = MemoryConfig(rank=4, alpha=8.0, layer_frac=0.5)  # fast weights on layer 1 of 2, LoRA scale 2 as the default
PROMPTS = [list(b"the quick"), list(b"over the lazy dog"), list(b"a")]


@pytest.fixture(scope="module")
def model():
    """A tiny model trained a few steps on one sentence, so its confidences are far from uniform;
    in float64, so two decodes that must agree (a row in a batch and alone) differ by rounding
    only (~1e-16), far below any gap between two candidates or confidences: their tokens must
    match on any BLAS, where float32 rounding could flip a near-tie."""
    torch.manual_seed(0)
    m = DiffusionLM(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64))
    text = torch.tensor(list(b"the quick brown fox jumps over the lazy dog. " * 4))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-2)
    for _ in range(60):
        x0 = torch.stack([text[i:i + 32] for i in torch.randint(len(text) - 32, (8,)).tolist()])
        maskable = torch.ones_like(x0, dtype=torch.bool)
        x_t, mask, t = forward_process(x0, maskable, m.cfg.mask_id)
        mdlm_loss(m, m(x_t), x0, mask, t, maskable).backward()
        opt.step()
        opt.zero_grad()
    return m.double().eval()


class Recorder(torch.nn.Module):
    """The model, keeping the canvas of every forward (the trace of a decode); bias is added to
    its logits."""

    def __init__(self, model, bias=0.0):
        super().__init__()
        self.model, self.cfg, self.bias, self.canvases = model, model.cfg, bias, []

    def forward(self, x, **kw):
        self.canvases.append(x.clone())
        return self.model(x, **kw)

    def logits(self, h):
        return self.model.logits(h) + self.bias


def trace(model, prompts, bias=0.0, **kw):
    """generate() and the generated part of the canvas before every forward and after the last."""
    rec = Recorder(model, bias)
    out, _ = generate(rec, prompts, **kw)
    for c in rec.canvases:  # the prompt is never altered
        for b, p in enumerate(prompts):
            assert c[b, :len(p)].tolist() == p
    states = [torch.stack([c[b, len(p):len(p) + out.shape[1]] for b, p in enumerate(prompts)]) for c in rec.canvases]
    return out, states + [out]


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_schedule_and_plan():
    assert reveal_schedule(10, 4) == [3, 3, 2, 2]
    assert reveal_schedule(8, 8) == [1] * 8
    assert plan(16, 8, 4) == (4, [2, 2])
    assert plan(16, 4) == (16, [4, 4, 4, 4])
    for args, msg in [((16, 8, 5), "multiple of block_len"), ((16, 2, 4), "multiple of the 4 blocks"),
                      ((16, 6, 4), "multiple of the 4 blocks"), ((16, 32, 4), "at most one step per token")]:
        with pytest.raises(ValueError, match=msg):
            plan(*args)


def test_pad_batch():
    ids, key_pad = pad_batch([[1, 2, 3], [], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 0], [4, 0, 0]]
    assert key_pad.tolist() == [[False] * 3, [True] * 3, [False, True, True]]


@pytest.mark.parametrize("kw", [dict(), dict(temperature=1.0, remasking="random", generator=gens(1, 2, 3, 4))])
def test_blocks_reveal_on_schedule(model, kw):
    prompts = PROMPTS + [[]]  # different lengths and an unconditional row
    gen_len, block_len, steps = 16, 4, 8
    out, states = trace(model, prompts, gen_len=gen_len, steps=steps, block_len=block_len, **kw)
    mask_id = model.cfg.mask_id
    assert len(states) == steps + 1 and (states[0] == mask_id).all()
    per_block = steps // (gen_len // block_len)
    for j, (before, after) in enumerate(zip(states, states[1:])):
        blk = j // per_block
        revealed = (before == mask_id) & (after != mask_id)
        assert (revealed.sum(1) == reveal_schedule(block_len, per_block)[j % per_block]).all()
        assert not revealed[:, :blk * block_len].any() and not revealed[:, (blk + 1) * block_len:].any()
        assert (before[:, (blk + 1) * block_len:] == mask_id).all()  # later blocks wait
        assert (before[:, :blk * block_len] != mask_id).all()  # earlier blocks are complete
        kept = before != mask_id
        assert (after[kept] == before[kept]).all()  # revealed tokens never change
    assert (out != mask_id).all() and (out < model.cfg.n_vocab).all()


class Fixed(torch.nn.Module):
    """A stand-in for the model: the logits at canvas position i of row b are table[b, i],
    whatever the canvas holds."""

    def __init__(self, table):
        super().__init__()
        self.cfg = ModelConfig()  # the byte tokenizer's ids: 258 real tokens, the mask 257
        self.table = torch.nn.Parameter(table, requires_grad=False)
        self.canvases = []

    def forward(self, x, **kw):
        self.canvases.append(x.clone())
        return self.table[:, :x.shape[1]]

    def logits(self, h):
        return h


def test_each_step_reveals_the_most_confident_positions():
    strength = torch.tensor([[1.0, 5, 3, 6, 2, 4], [6.0, 1, 2, 3, 5, 4]])  # each position's peak logit
    table = torch.zeros(2, 6, 320)
    table[:, torch.arange(6), 10 + torch.arange(6)] = strength  # position i proposes token 10 + i
    stub = Fixed(table)
    out, _ = generate(stub, [[], []], gen_len=6, steps=3)
    assert (out == 10 + torch.arange(6)).all()
    revealed = [(a == MASK) & (b != MASK) for a, b in zip(stub.canvases, stub.canvases[1:] + [out])]
    # two a step, in the order of confidence: the strengths 6 and 5, then 4 and 3, then 2 and 1
    assert [r.nonzero()[:, 1].view(2, 2).tolist() for r in revealed] == \
        [[[1, 3], [0, 4]], [[2, 5], [3, 5]], [[0, 4], [1, 2]]]


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_temperature_samples_the_softmax_of_logits_over_temperature(temperature):
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    table = torch.full((1, 8000, 320), float("-inf"))
    table[..., :4] = p.log()
    out, _ = generate(Fixed(table), [[]], gen_len=8000, steps=1, temperature=temperature,
                      generator=torch.Generator().manual_seed(0))
    want = p ** (1 / temperature) / (p ** (1 / temperature)).sum() * 8000
    seen = torch.bincount(out[0], minlength=4).double()
    assert len(seen) == 4 and ((seen - want) ** 2 / want).sum() < 16.3  # chi-square, 3 dof: p = 0.001


def test_only_real_tokens(model):
    """Even a model that favours them never proposes the mask or the embedding's padding rows."""
    bias = torch.zeros(model.cfg.vocab_size)
    bias[model.cfg.mask_id] = bias[model.cfg.n_vocab:] = 100.0
    for kw in dict(), dict(temperature=1.0):
        out, _ = trace(model, PROMPTS, bias, gen_len=8, steps=8, **kw)
        assert (out != model.cfg.mask_id).all() and (out < model.cfg.n_vocab).all()


def test_deterministic_and_seeded(model):
    a, _ = generate(model, PROMPTS, gen_len=16, steps=8)
    b, _ = generate(model, PROMPTS, gen_len=16, steps=8)
    assert torch.equal(a, b)
    kw = dict(gen_len=16, steps=16, temperature=1.0)
    c, _ = generate(model, PROMPTS, generator=torch.Generator().manual_seed(7), **kw)
    d, _ = generate(model, PROMPTS, generator=torch.Generator().manual_seed(7), **kw)
    e, _ = generate(model, PROMPTS, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(c, d) and not torch.equal(c, e)


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.8), dict(remasking="random", block_len=4),
                                dict(temperature=0.8, threshold=0.2, block_len=4),
                                dict(temperature=0.8, adapt=True, mcfg=MCFG)])
def test_batched_row_equals_alone(model, kw):
    """Padding and batch-mates change nothing: with a generator per row, a row's draws are its own."""
    seeds = [11, 12, 13]
    batch, losses = generate(model, PROMPTS, gen_len=16, steps=16, generator=gens(*seeds), **kw)
    for b, (p, s) in enumerate(zip(PROMPTS, seeds)):
        alone, alone_losses = generate(model, [p], gen_len=16, steps=16, generator=gens(s), **kw)
        assert torch.equal(batch[b], alone[0])
        if kw.get("adapt"):
            assert len(losses) == 2 and losses[0].shape == (3,)
            assert all(torch.allclose(l[b], la[0], atol=1e-5) for l, la in zip(losses, alone_losses))


def test_threshold(model):
    kw = dict(gen_len=16, steps=16, block_len=8)
    out, states = trace(model, PROMPTS, threshold=0.2, **kw)
    mask_id = model.cfg.mask_id
    assert (out != mask_id).all() and len(states) - 1 <= 16
    for before, after in zip(states, states[1:]):
        blk = (before != mask_id).sum(1).min() // 8  # the block of the least advanced row
        left = (before[:, blk * 8:(blk + 1) * 8] == mask_id).sum(1)
        revealed = ((before == mask_id) & (after != mask_id)).sum(1)
        assert (revealed >= (left > 0).long()).all()  # at least one per row that has masks left
    # everything is above 0: one forward per block; nothing is above 1: the plain schedule
    assert len(trace(model, PROMPTS, threshold=0.0, **kw)[1]) - 1 == 2
    assert torch.equal(generate(model, PROMPTS, threshold=1.0, **kw)[0], generate(model, PROMPTS, **kw)[0])


def test_adapt_writes_a_fresh_memory(model):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([PROMPTS[1]])
    fast, losses = write_memory(model, [PROMPTS[1]], MCFG, ratio=0.2, generator=gens(0))
    assert len(losses) == 2 and losses[0].shape == (1,)
    # phi_0 adds exactly 0 (B = 0), so any change is the memory's
    assert (model.logits(model(ids, fast=fast)) - model.logits(model(ids))).abs().max() > 1e-5
    # the base model is untouched and every call starts from phi_0: B after A equals B alone,
    # and B in a batch with A (a generator per row) equals B alone
    write_memory(model, [PROMPTS[0]], MCFG, ratio=0.2, generator=gens(5))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    again, _ = write_memory(model, [PROMPTS[1]], MCFG, ratio=0.2, generator=gens(0))
    both, _ = write_memory(model, PROMPTS[:2], MCFG, ratio=0.2, generator=gens(5, 0))
    for f, g, h in zip(flat(fast), flat(again), flat(both)):
        assert torch.equal(f, g) and torch.allclose(f[0], h[1], atol=1e-6)


def test_adapt_padded_batch_equals_alone(model):
    """One padded batch (a shared generator, memory.adapt's batched path) against each row alone.
    Its random draws depend on the batch, so take a setting whose outcome draws cannot change:
    every prompt token masked (ratio 1) and a full-rank delta starting at 0."""
    mcfg = MemoryConfig(adapter="full", layer_frac=0.5)
    batch, losses = write_memory(model, PROMPTS, mcfg, ratio=1.0, generator=torch.Generator().manual_seed(0))
    for b, p in enumerate(PROMPTS):
        alone, alone_losses = write_memory(model, [p], mcfg, ratio=1.0, generator=torch.Generator().manual_seed(1))
        assert all(torch.allclose(f[b], g[0], atol=1e-6) for f, g in zip(flat(batch), flat(alone)))
        assert all(torch.allclose(l[b], la[0], atol=1e-6) for l, la in zip(losses, alone_losses))


def test_adapt_needs_a_prompt(model):
    with pytest.raises(ValueError, match="non-empty prompt"):
        generate(model, [PROMPTS[0], []], gen_len=8, steps=8, adapt=True, mcfg=MCFG)


# ---------------------------------------------------------------------------------------
# the prefix cache

def test_prefix_cache_one_step_per_block_is_plain(model):
    """Every block's first step is a full forward: with one step per block the cache is never
    read, and the outputs are exactly the plain path's (a one-block layout included)."""
    for kw in [dict(gen_len=16, steps=1), dict(gen_len=16, steps=4, block_len=4),
               dict(gen_len=16, steps=4, block_len=4, temperature=0.8),
               dict(gen_len=16, steps=2, block_len=8, temperature=0.8, adapt=True, mcfg=MCFG)]:
        cached, _ = generate(model, PROMPTS, generator=gens(1, 2, 3), prefix_cache=True, **kw)
        assert torch.equal(cached, generate(model, PROMPTS, generator=gens(1, 2, 3), **kw)[0])


@pytest.mark.parametrize("adapt", [False, True])
def test_exact_prefix_reproduces_full_forward(model, adapt):
    """The active region (each row from its block start to its end of canvas) on the exact prefix
    keys/values gives the full forward's hidden states and logits there, for a padded batch of
    different prompt lengths, with and without fast weights."""
    gen_len, start, cfg = 16, 4, model.cfg
    fast = write_memory(model, PROMPTS, MCFG, ratio=0.2, generator=gens(1, 2, 3))[0] if adapt else None
    torch.manual_seed(0)
    rows = [p + torch.randint(cfg.n_vocab, (gen_len,)).tolist() for p in PROMPTS]  # a partly decoded canvas
    canvas, key_pad = pad_batch(rows, cfg.eot_id)
    cache = KVCache()
    full = model(canvas, fast=fast, key_pad=key_pad, cache=cache)
    act = torch.tensor([len(p) + start for p in PROMPTS])[:, None] + torch.arange(gen_len - start)
    cache.keep_prefix(act[:, 0], act)
    assert cache.pad is not None and cache.keys[0].shape[2] == max(map(len, PROMPTS)) + start
    h = model(canvas.gather(1, act), fast=fast, cache=cache)
    ref = full.gather(1, act[..., None].expand(-1, -1, full.shape[-1]))
    assert (h - ref).abs().max() < 1e-5
    assert (model.logits(h) - model.logits(ref)).abs().max() < 1e-5


def test_rope_positions_beyond_the_table(model):
    """pos past the cached RoPE tables (block_size 64) gets fresh ones, as a long input does."""
    x = torch.randint(model.cfg.n_vocab, (1, 80), generator=torch.Generator().manual_seed(0))
    full = model(x)
    cache = KVCache()
    model(x, cache=cache)
    cache.keep_prefix(torch.tensor([70]), torch.arange(70, 80)[None])  # the exact prefix: from the full forward
    assert (model(x[:, 70:], cache=cache) - full[:, 70:]).abs().max() < 1e-5
    cache = KVCache()
    model(x, cache=cache)
    cache.keep_prefix(torch.tensor([0]), torch.arange(80)[None])  # no prefix: positions 0..T-1 are the default
    assert torch.equal(model(x, cache=cache), full)


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.8, block_len=4),
                                dict(temperature=0.8, threshold=0.2, block_len=4),
                                dict(temperature=0.8, block_len=8, adapt=True, mcfg=MCFG)])
def test_prefix_cache_batched_row_equals_alone(model, kw):
    seeds = [11, 12, 13]
    batch, _ = generate(model, PROMPTS, gen_len=16, steps=16, generator=gens(*seeds), prefix_cache=True, **kw)
    for b, (p, s) in enumerate(zip(PROMPTS, seeds)):
        alone, _ = generate(model, [p], gen_len=16, steps=16, generator=gens(s), prefix_cache=True, **kw)
        assert torch.equal(batch[b], alone[0])


def test_prefix_cache_finishes_and_keeps_the_prompt(model):
    prompts = PROMPTS + [[]]
    rec = Recorder(model)
    out, _ = generate(rec, prompts, gen_len=16, steps=16, block_len=4, prefix_cache=True)
    assert (out != model.cfg.mask_id).all() and (out < model.cfg.n_vocab).all()
    full = [c for c in rec.canvases if c.shape[1] == max(map(len, prompts)) + 16]
    assert len(full) == 4 and len(rec.canvases) == 16  # one full forward per block, then the active region
    for c in full:  # the prompt is never altered
        assert all(c[b, :len(p)].tolist() == p for b, p in enumerate(prompts))
    # the plain path decodes mostly the same tokens
    plain, _ = generate(model, prompts, gen_len=16, steps=16, block_len=4)
    assert (out == plain).float().mean() > 0.5


# ---------------------------------------------------------------------------------------
# the command line

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    train.main(["--config", "tiny", f"--out_dir={d}", "--max_iters=2", "--eval_iters=1"])
    return str(d)


def test_cli_samples(ckpt, capsys):
    main([f"--out_dir={ckpt}", "--prompt=Hello", "--num_samples=2", "--gen_len=8", "--adapt", "--temperature=1"])
    cap = capsys.readouterr()
    out = cap.out
    assert "are the same" not in cap.err
    assert "adapt step 1/2: inner loss" in out and "adapt step 2/2" in out
    assert "sample 2/2" in out and out.count("\nHello") == 2
    main([f"--out_dir={ckpt}", "--prompt=Hello", "--num_samples=2", "--gen_len=8", "--temperature=0"])
    cap = capsys.readouterr()  # greedy decoding draws nothing: the samples are one
    assert "the 2 samples are the same" in cap.err
    texts = re.split(r"---------- sample \d/2 ----------\n", cap.out)[1:]
    assert len(texts) == 2 and texts[0] == texts[1]
    main([f"--out_dir={ckpt}", "--gen_len=8", "--block_len=4", "--steps=4", "--unconditional"])
    assert "sample 1/1" in capsys.readouterr().out
    main([f"--out_dir={ckpt}", "--prompt=Hello", "--gen_len=8", "--block_len=4", "--prefix_cache", "--adapt"])
    assert "sample 1/1" in capsys.readouterr().out
    main([f"--out_dir={ckpt}", "--prompt=Hello", "--gen_len=8", "--temperature=1", "--stats"])
    corpus_white = readability([], documents(get_encoding("byte"), open_split("pydoc", "train", "byte")))[3]
    assert re.search(r"stats: \d+\.\d% of the \d+ generated words occur in the training text; whitespace "
                     rf"\d+\.\d% of the characters \(the training text: {100 * corpus_white:.1f}%\)",
                     capsys.readouterr().out)


def test_cli_samples_with_the_checkpoints_defaults(ckpt, tmp_path, monkeypatch):
    """With no --block_len or --temperature, sample.py takes those the checkpoint's preset names
    (sample_block_len, used where it divides gen_len, else one block; sample_temperature), else
    blocks of 32 and temperature 0."""
    train.main(["--config", "tiny", f"--out_dir={tmp_path}", "--max_iters=2", "--eval_iters=1", "--sample_block_len=4",
                "--sample_temperature=0.5"])
    layouts, real = [], sample.generate

    def spy(model, prompts, **kw):
        layouts.append(tuple(kw[k] for k in ("gen_len", "steps", "block_len", "temperature")))
        return real(model, prompts, **kw)
    monkeypatch.setattr(sample, "generate", spy)
    for argv in ([f"--out_dir={tmp_path}"], [f"--out_dir={tmp_path}", "--gen_len=10"],
                 [f"--out_dir={tmp_path}", "--block_len=8", "--temperature=0"], [f"--out_dir={ckpt}"]):
        main(argv + ["--prompt=Hello"])
    assert layouts == [(32, 32, 4, 0.5), (10, 10, 10, 0.5), (32, 32, 8, 0.0), (32, 32, 32, 0.0)]


def test_cli_long_context_warns(ckpt, capsys):
    main([f"--out_dir={ckpt}", "--prompt=" + "x" * 60, "--gen_len=8"])  # block_size is 64
    cap = capsys.readouterr()
    assert "exceeds the training context block_size=64" in cap.err and "sample 1/1" in cap.out


def test_cli_errors(ckpt, tmp_path):
    (tmp_path / "empty.txt").write_text("\n")
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({"model": {}}, bad / "ckpt.pt")
    cases = [([f"--out_dir={tmp_path / 'none'}"], "no checkpoint at"),
             ([f"--out_dir={bad}"], "not a checkpoint of this model"),
             ([f"--out_dir={ckpt}", f"--prompt_file={tmp_path / 'empty.txt'}"], "is empty"),
             ([f"--out_dir={ckpt}", f"--prompt_file={tmp_path / 'missing.txt'}"], "cannot read"),
             ([f"--out_dir={ckpt}", "--gen_len=10", "--block_len=4"], "multiple of block_len"),
             ([f"--out_dir={ckpt}", "--gen_len=16", "--block_len=4", "--steps=2"], "multiple of the 4 blocks"),
             ([f"--out_dir={ckpt}", "--gen_len=16", "--block_len=4", "--steps=6"], "multiple of the 4 blocks"),
             ([f"--out_dir={ckpt}", "--gen_len=16", "--steps=32"], "at most one step per token"),
             ([f"--out_dir={ckpt}", "--adapt", "--unconditional"], "--adapt writes the prompt")]
    if not torch.cuda.is_available():
        cases.append(([f"--out_dir={ckpt}", "--device=cuda"], "no CUDA GPU"))
    for argv, msg in cases:
        with pytest.raises(SystemExit, match=msg):
            main(argv)


def test_readability_counts_corpus_words_and_whitespace():
    words, n, white, corpus_white = readability(["the cat zzq", "   "], "the cat sat.\n")
    assert (words, n) == (2 / 3, 3) and white == 5 / 14 and corpus_white == 3 / 13


def test_the_training_text_is_every_document():
    """--stats compares with the whole train split, not its first document (where decode stops)."""
    eot = 256
    ids = np.array(list(b"the cat") + [eot] + list(b"sat") + [eot] + list(b" on"), dtype=np.uint16)
    enc = get_encoding("byte")
    assert enc.eot_token == eot and documents(enc, ids) == "the cat\nsat\n on"
    assert readability(["sat on"], documents(enc, ids))[0] == 1.0
