"""The embedded default corpus: the documentation text that ships with CPython
(pydoc_data.topics, about 460 KB of English prose). No download.

    python data/pydoc/prepare.py [--tokenizer=byte]

writes train.bin / val.bin (numpy token ids) and meta.json beside this file.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
from data.tokenizer import write_bins  # noqa: E402


def prepare(tokenizer="byte", out_dir=HERE):
    import pydoc_data.topics
    topics = pydoc_data.topics.topics
    return write_bins([topics[k] for k in sorted(topics)], tokenizer, out_dir)


if __name__ == "__main__":
    tok = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--tokenizer=")), "byte")
    print(prepare(tok))
