"""Tiny Shakespeare (about 1 MB), downloaded once.

    python data/shakespeare/prepare.py [--tokenizer=byte]

Needs the network; offline it stops with a message naming the file to place by hand.
"""
import http.client
import os
import sys
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
from data.tokenizer import prepare_args, write_bins  # noqa: E402

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def read_text(path):
    """The text at path, downloaded there first when it is not there; one line for each failure."""
    if not os.path.exists(path):
        tmp = path + ".tmp"  # renamed once whole: a cut download never passes for the text
        try:
            urllib.request.urlretrieve(URL, tmp)
        except (OSError, http.client.HTTPException, KeyboardInterrupt) as e:  # URLError is an OSError
            if os.path.exists(tmp):
                os.remove(tmp)
            if isinstance(e, KeyboardInterrupt):
                raise SystemExit(f"interrupted during the download; nothing written to {path}: run this again") \
                    from None
            raise SystemExit(f"cannot download {URL} ({e}); place the text at {path} by hand and rerun") from None
        os.replace(tmp, path)
    if not os.path.isfile(path):  # a directory, or a FIFO that reading would block on
        raise SystemExit(f"{path} is not a regular file: remove it to download the text again")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise SystemExit(f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}): "
                         f"remove it to download it again, or save it as UTF-8") from None
    except OSError as e:
        raise SystemExit(f"cannot read {path} ({e.strerror or e}): place the text there as a plain file") from None
    if not text.strip():
        raise SystemExit(f"{path} is empty: remove it to download it again")
    return text


if __name__ == "__main__":
    tok = prepare_args(sys.argv[1:], "python data/shakespeare/prepare.py [--tokenizer=byte]")
    print(write_bins([read_text(os.path.join(HERE, "input.txt"))], tok, HERE))
