"""The embedded default corpus: the documentation text that ships with CPython
(pydoc_data.topics, about 460 KB of English prose). No download.

    python data/pydoc/prepare.py [--tokenizer=byte]

writes train.bin / val.bin (numpy token ids) and meta.json beside this file.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
from data.tokenizer import prepare_args, write_bins  # noqa: E402


def prepare(tokenizer="byte", out_dir=HERE):
    try:
        import pydoc_data.topics
    except ImportError:  # some distributions ship Python without it
        raise SystemExit("this Python has no pydoc_data (its documentation text): install the full Python, "
                         "or train on another dataset (python data/shakespeare/prepare.py, then "
                         "--dataset=shakespeare)") from None
    topics = pydoc_data.topics.topics
    return write_bins([topics[k] for k in sorted(topics)], tokenizer, out_dir)


if __name__ == "__main__":
    print(prepare(prepare_args(sys.argv[1:], "python data/pydoc/prepare.py [--tokenizer=byte]")))
