"""Tiny Shakespeare (about 1 MB), downloaded once.

    python data/shakespeare/prepare.py [--tokenizer=byte]

Needs the network; offline it stops with a message naming the file to place by hand.
"""
import os
import sys
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
from data.tokenizer import write_bins  # noqa: E402

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"

if __name__ == "__main__":
    tok = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--tokenizer=")), "byte")
    path = os.path.join(HERE, "input.txt")
    if not os.path.exists(path):
        try:
            urllib.request.urlretrieve(URL, path + ".tmp")
        except OSError as e:
            raise SystemExit(f"cannot download {URL} ({e}); place the text at {path} by hand and rerun")
        os.replace(path + ".tmp", path)
    with open(path, encoding="utf-8") as f:
        print(write_bins([f.read()], tok, HERE))
