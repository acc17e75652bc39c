"""Tokenizers as tiktoken Encodings, with the two special tokens a masked diffusion LM needs.

The default, "byte", is built here in code (256 byte tokens, no merges), so it needs no
download. "gpt2" and "o200k_base" are tiktoken's BPE files, available when tiktoken can
fetch or find them; the mask token is appended after their vocabulary.
"""
import os

import tiktoken

EOT, MASK = "<|endoftext|>", "<|mask|>"
HERE = os.path.dirname(os.path.abspath(__file__))  # data/: a dataset is a directory here


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


DTYPES = ("uint8", "uint16", "uint32")  # what a token file may hold: write_bins writes uint16 (uint32 past 65536 ids)


def prepare_args(argv, usage):
    """The --tokenizer=NAME of a prepare.py command line (default byte); anything else is one line."""
    tokenizer = "byte"
    for a in argv:
        if not a.startswith("--tokenizer=") or not a.split("=", 1)[1]:
            raise SystemExit(f"bad argument '{a}': usage: {usage}")
        tokenizer = a.split("=", 1)[1]
    check_tokenizer(tokenizer)
    return tokenizer


def write_bins(texts, tokenizer, out_dir, val_frac=0.1):
    """Tokenise texts (each ended by <|endoftext|>) into out_dir/{train,val}.bin and meta.json.
    The last val_frac of the tokens is the validation split. Each file appears atomically, and
    meta.json (which open_split needs) is removed first and written last: a crash in between
    leaves no meta.json, never one that describes other files."""
    import json

    import numpy as np
    enc = get_encoding(tokenizer)
    ids = []
    for text in texts:
        ids += enc.encode_ordinary(text) + [enc.eot_token]
    ids = np.array(ids, dtype=np.uint16 if enc.n_vocab < 2**16 else np.uint32)
    n_val = int(len(ids) * val_frac)
    if n_val < 1 or len(ids) - n_val < 1:
        raise SystemExit(f"the text is {len(ids)} tokens: too few for a train and a val split "
                         f"(val_frac={val_frac}); give a longer text")
    meta_path = os.path.join(out_dir, "meta.json")
    try:
        if os.path.lexists(meta_path):
            os.remove(meta_path)
        for split, arr in (("train", ids[:-n_val]), ("val", ids[-n_val:])):
            tmp = os.path.join(out_dir, f"{split}.bin.tmp")
            arr.tofile(tmp)
            os.replace(tmp, os.path.join(out_dir, f"{split}.bin"))
        meta = {"tokenizer": tokenizer, "dtype": str(ids.dtype), "train_tokens": len(ids) - n_val, "val_tokens": n_val}
        with open(meta_path + ".tmp", "w") as f:
            json.dump(meta, f)
        os.replace(meta_path + ".tmp", meta_path)
    except OSError as e:
        for tmp in ("train.bin.tmp", "val.bin.tmp", "meta.json.tmp"):  # a full disk's leftovers
            if os.path.isfile(os.path.join(out_dir, tmp)):
                os.remove(os.path.join(out_dir, tmp))
        raise SystemExit(f"cannot write the token files in {out_dir} ({e.strerror or e}): "
                         f"make it a writable directory with room, then run this again") from None
    return meta


def open_split(dataset, split, tokenizer, or_else=""):
    """The tokens of data/<dataset>/<split>.bin as a numpy memmap, checked against meta.json and
    the tokenizer that will read them: a missing or damaged file (meta.json not JSON or without
    its dtype, a byte count that is not whole tokens, an empty file, a token count other than
    meta.json's, an id the tokenizer does not have) is one line that says to prepare it again
    (or_else: another way out)."""
    import json
    import stat

    import numpy as np
    folder = os.path.join(HERE, dataset)
    path, meta_path = os.path.join(folder, f"{split}.bin"), os.path.join(folder, "meta.json")
    fix = f"run python data/{dataset}/prepare.py --tokenizer={tokenizer}{or_else}"

    def damaged(what):
        raise SystemExit(f"{what}: {fix} to write it again")

    for p in (meta_path, path):
        try:
            mode = os.stat(p).st_mode
        except OSError:
            raise SystemExit(f"no {split} split at {path} ({os.path.basename(p)} is missing): {fix}") from None
        if not stat.S_ISREG(mode):  # a directory, a FIFO (opening it would block), a device
            damaged(f"{p} is not a regular file")
    try:
        with open(meta_path, "rb") as f:
            meta = json.loads(f.read())
    except OSError as e:
        raise SystemExit(f"cannot read {meta_path} ({e.strerror or e}): make it readable, or {fix}") from None
    except ValueError as e:
        damaged(f"{meta_path} is not JSON ({e})")
    if not isinstance(meta, dict) or "dtype" not in meta or "tokenizer" not in meta:
        damaged(f"{meta_path} does not name the tokens' dtype and tokenizer")
    if meta["dtype"] not in DTYPES:
        damaged(f"{meta_path} gives dtype {meta['dtype']!r}: token ids are one of {', '.join(DTYPES)}")
    if meta["tokenizer"] != tokenizer:
        raise SystemExit(f"{path} holds '{meta['tokenizer']}' tokens, not '{tokenizer}': {fix}")
    size, width = os.path.getsize(path), np.dtype(meta["dtype"]).itemsize
    if size == 0:
        damaged(f"{path} is empty")
    if size % width:
        damaged(f"{path} is {size} bytes, not a whole number of {meta['dtype']} tokens ({width} bytes each): "
                f"the file is cut short or damaged")
    if isinstance(meta.get(f"{split}_tokens"), int) and meta[f"{split}_tokens"] != size // width:
        damaged(f"{path} holds {size // width} tokens, meta.json says {meta[f'{split}_tokens']}: the file is "
                f"cut short or from another preparation")
    try:
        tokens = np.memmap(path, dtype=meta["dtype"], mode="r")
    except OSError as e:
        raise SystemExit(f"cannot read {path} ({e.strerror or e}): make it readable, or {fix}") from None
    check_ids(tokens, get_encoding(tokenizer), tokenizer, path, fix)
    return tokens


def windows(tokens, T, B, generator):
    """B windows of T consecutive tokens at positions drawn from generator: a [B, T] int64 tensor
    (train.py's text batches, and the lessons' that must be the same kind)."""
    import numpy as np
    import torch
    ix = torch.randint(len(tokens) - T, (B,), generator=generator).tolist()
    return torch.from_numpy(np.stack([tokens[i:i + T].astype(np.int64) for i in ix]))


def check_ids(tokens, enc, name, path, fix, chunk=1 << 24):
    """Stop with one line at an id the tokenizer does not have, or the mask token (never data).
    One pass in chunks: about a second per GB."""
    mask = enc._special_tokens.get(MASK)
    for i in range(0, len(tokens), chunk):
        part = tokens[i:i + chunk]
        top = int(part.max())
        if top >= enc.n_vocab or (mask is not None and (part == mask).any()):
            at = i + int(((part >= enc.n_vocab) | (part == mask)).argmax())
            raise SystemExit(f"{path} holds token id {int(tokens[at])} at position {at}, not a token of "
                             f"'{name}' data (ids below {enc.n_vocab}, the mask {mask} never in data): "
                             f"{fix} to write it again")
