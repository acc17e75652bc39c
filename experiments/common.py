"""What several experiments share: the command line's integer lists, their output files
(checked before the work, written whole), the names of Table 1's rows, and the statistics of
the tables (mean and standard error over seeds or examples, the paired difference with its 95%
t interval)."""
import os

from model import KEPT_SUFFIX

RUN_FILES = ("ckpt.pt", "log.jsonl", "train.lock")  # what train.py writes into an out_dir


def int_list(s):
    """'1,2,3' -> [1, 2, 3] (argparse type)."""
    return [int(v) for v in s.split(",")]


def repeat(paths):
    """(j, i) of the first path i that names the same file as an earlier one j, or None."""
    seen = {}
    for i, p in enumerate(paths):
        j = seen.setdefault(os.path.realpath(p), i)
        if j != i:
            return j, i
    return None


def writable(path, what, overwrite=False):
    """Stop now, before the work, when path cannot take the results: its directory missing, a
    directory or other non-file, a run's checkpoint or log, a file that exists (unless
    overwrite), or a place that cannot be written."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise SystemExit(f"{what}={path}: the directory {folder} does not exist: create it or choose another path")
    if os.path.isdir(path):
        raise SystemExit(f"{what}={path} is a directory: give a file name in it")
    name = os.path.basename(path).removesuffix(KEPT_SUFFIX)  # also the copies --overwrite=True keeps aside
    if name in RUN_FILES or name.endswith(".pt"):
        raise SystemExit(f"{what}={path} is a training run's file (checkpoint or log): choose another file name")
    if os.path.exists(path) and not os.path.isfile(path):
        raise SystemExit(f"{what}={path} is not a regular file: choose another path")
    if os.path.exists(path) and not overwrite:
        raise SystemExit(f"{path} exists: choose another {what} file, or pass --overwrite to replace it")
    probe = f"{path}.tmp{os.getpid()}"
    try:  # a real write: permissions alone do not tell (a read-only mount, /proc, a full quota)
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"{what}={path} cannot be written ({e.strerror or e}): choose another path") from None


def write_atomic(path, text):
    """text to path through a temporary file renamed over it: a failure leaves the old file whole."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise SystemExit(f"cannot write {path} ({e.strerror or e})") from None


def row_label(cfg, adapt, out_dir):
    """The name of a Table 1 row: the method a checkpoint was trained with, with or without adapt."""
    if cfg["mem"]:
        name = "MemDLM (Train & Inference)" if adapt else "MemDLM (Train-Only)"
    else:
        name = "Standard MDLM + adapt" if adapt else "Standard MDLM"
    return f"{name} {out_dir}"


def mean_stderr(scores):
    """mean and standard error (sample std / sqrt(n)) of a list of scores."""
    n = len(scores)
    m = sum(scores) / n
    se = (sum((s - m) ** 2 for s in scores) / (n - 1) / n) ** 0.5 if n > 1 else 0.0
    return dict(mean=m, stderr=se, n=n)


# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df):
    """The 0.975 quantile of Student's t: the table to 30 degrees of freedom, then the
    Cornish-Fisher expansion around the normal (within 1e-3 there)."""
    if df < 1:
        raise ValueError("a t interval needs at least 2 values")
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def paired(a, b):
    """The paired difference a - b over seeds: mean, its standard error, n, and the 95% t
    interval (lo, hi; None for one seed); tie when the interval contains 0."""
    s = mean_stderr([x - y for x, y in zip(a, b)])
    if s["n"] < 2:
        return {**s, "lo": None, "hi": None, "tie": None}
    half = t975(s["n"] - 1) * s["stderr"]
    return {**s, "lo": s["mean"] - half, "hi": s["mean"] + half, "tie": s["mean"] - half <= 0 <= s["mean"] + half}


def seeds_for(sd, half):
    """The fewest seeds n whose paired 95% t interval, t(n - 1) sd / sqrt(n), is at most +-half
    for differences of standard deviation sd (at least 2: an interval needs two)."""
    n = 2
    while t975(n - 1) * sd / n ** 0.5 > half:
        n += 1
    return n


def fmt_diff(d, f=".1f"):
    """A paired difference as `mean [lo, hi]`, then `tie` when the interval contains 0."""
    if d["n"] == 0:
        return "n/a"
    if d["lo"] is None:
        return f"{d['mean']:+{f}} (n=1)"
    return f"{d['mean']:+{f}} [{d['lo']:+{f}}, {d['hi']:+{f}}]" + (" tie" if d["tie"] else "")
