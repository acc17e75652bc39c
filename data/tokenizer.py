"""Tokenizers as tiktoken Encodings, with the two special tokens a masked diffusion LM needs.

The default, "byte", is built here in code (256 byte tokens, no merges), so it needs no
download. "gpt2" and "o200k_base" are tiktoken's BPE files, available when tiktoken can
fetch or find them; the mask token is appended after their vocabulary.
"""
import tiktoken

EOT, MASK = "<|endoftext|>", "<|mask|>"


def check_tokenizer(name):
    """Stop with one line unless name is byte or an encoding tiktoken knows."""
    names = ["byte", *tiktoken.list_encoding_names()]
    if name not in names:
        raise SystemExit(f"unknown tokenizer '{name}': choose one of {', '.join(names)}")


def get_encoding(name="byte"):
    check_tokenizer(name)
    if name == "byte":
        # no merges: every byte is its own token; a GPT-2-like split keeps pieces short
        return tiktoken.Encoding(
            name="byte",
            pat_str=r"""'s|'t|'re|'ve|'m|'ll|'d| ?\w+| ?\d+| ?[^\s\w]+|\s+(?!\S)|\s+""",
            mergeable_ranks={bytes([i]): i for i in range(256)},
            special_tokens={EOT: 256, MASK: 257},
        )
    try:
        base = tiktoken.get_encoding(name)
    except Exception as e:  # tiktoken raises several types when its file cannot be fetched
        raise SystemExit(f"tokenizer '{name}' is unavailable ({type(e).__name__}): "
                         f"use --tokenizer=byte, or run once where tiktoken can download it") from e
    special = dict(base._special_tokens)
    special.setdefault(MASK, base.n_vocab)
    return tiktoken.Encoding(name=f"{name}_mask", pat_str=base._pat_str,
                             mergeable_ranks=base._mergeable_ranks, special_tokens=special)


def decode(enc, ids):
    """Decode, cutting at the first <|endoftext|> and dropping any other special token."""
    eot = enc.eot_token
    out = []
    for i in ids:
        if i == eot:
            break
        if i < enc.n_vocab and i != enc._special_tokens.get(MASK):
            out.append(i)
    return enc.decode(out, errors="replace")


def write_bins(texts, tokenizer, out_dir, val_frac=0.1):
    """Tokenise texts (each ended by <|endoftext|>) into out_dir/{train,val}.bin and meta.json.
    The last val_frac of the tokens is the validation split. Files appear atomically."""
    import json
    import os

    import numpy as np
    enc = get_encoding(tokenizer)
    ids = []
    for text in texts:
        ids += enc.encode_ordinary(text) + [enc.eot_token]
    ids = np.array(ids, dtype=np.uint16 if enc.n_vocab < 2**16 else np.uint32)
    n_val = int(len(ids) * val_frac)
    for split, arr in (("train", ids[:-n_val]), ("val", ids[-n_val:])):
        tmp = os.path.join(out_dir, f"{split}.bin.tmp")
        arr.tofile(tmp)
        os.replace(tmp, os.path.join(out_dir, f"{split}.bin"))
    meta = {"tokenizer": tokenizer, "dtype": str(ids.dtype), "train_tokens": len(ids) - n_val, "val_tokens": n_val}
    with open(os.path.join(out_dir, "meta.json.tmp"), "w") as f:
        json.dump(meta, f)
    os.replace(os.path.join(out_dir, "meta.json.tmp"), os.path.join(out_dir, "meta.json"))
    return meta


def open_split(dataset, split, tokenizer, or_else=""):
    """The tokens of data/<dataset>/<split>.bin as a numpy memmap, checked against the tokenizer
    that will read them; a missing file or another tokenizer is one line (or_else: another way out)."""
    import json
    import os

    import numpy as np
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), dataset)
    path = os.path.join(folder, f"{split}.bin")
    fix = f"run python data/{dataset}/prepare.py --tokenizer={tokenizer}{or_else}"
    try:
        with open(os.path.join(folder, "meta.json")) as f:
            meta = json.load(f)
        tokens = np.memmap(path, dtype=meta["dtype"], mode="r")
    except OSError:
        raise SystemExit(f"no {split} split at {path}: {fix}") from None
    if meta["tokenizer"] != tokenizer:
        raise SystemExit(f"{path} holds '{meta['tokenizer']}' tokens, not '{tokenizer}': {fix}")
    return tokens
