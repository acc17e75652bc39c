"""A synthetic needle-in-a-haystack suite in the spirit of RULER and BABILong, generated
with no download: training rows for train.py (NiahData), evaluation examples and their
score (the evaluation command line: python -m experiments.niah_eval).

Tasks (TASKS): single (a key's magic number), multikey (the asked key among distractor
keys), multivalue (every value of one key), vartrack (the variables a chain of assignments
gives one value, beside a distractor chain), cwe (the most common words of a numbered list),
babi (where a person is after people moved between rooms). Facts sit in a haystack of
RULER's "noise" filler sentences or of prose from the documentation text that ships with
CPython (pydoc_data.topics), at sentence boundaries; the question comes last and the answer
follows it. A length counts prompt + answer window, so a model sees its training layout.
Surface forms (FORMS): "fixed" is one wording per task; "train" varies templates, keys,
value lengths and names; "heldout" uses only templates and words that "train" never does.
Scoring as RULER: the fraction of the reference answers found in the output.
"""
import functools
import random
import re
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import torch

HAYSTACKS = ("noise", "prose")

NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
# a small vocabulary, so a small byte-level model can learn the format in minutes
WORDS = """apple anchor arrow badge basket beach berry blade block bloom board bottle branch brick
bridge brush bucket button cable camera candle canvas carpet castle cedar chain chalk cherry circle
cliff clock cloud coast coffee comet copper coral cotton crown crystal desert dollar dragon drum
eagle engine falcon feather fiddle flame forest fossil fountain frost galaxy glove grape harbor
helmet honey island jacket jungle kettle ladder lantern lemon marble meadow mirror monkey nickel
ocean olive orange palace panda pepper pillow planet pocket pumpkin rabbit radio ribbon rocket
saddle salmon shadow silver spider sponge statue tiger tomato tunnel turtle violin wagon walnut
window winter wizard""".split()
NAMES = ("Mary", "John", "Daniel", "Sandra", "Bill", "Fred", "Julie", "Jeff")  # bAbI's people and rooms
ROOMS = ("kitchen", "garden", "hallway", "bathroom", "bedroom", "office")
VERBS = ("went to", "moved to", "journeyed to", "travelled to", "went back to")
N_KEYS, N_VALUES = 3, 3              # needles of multikey (1 asked + distractors) and multivalue
VT_CHAINS, VT_VARS = 2, 3            # chains (1 asked + distractors) and variables per chain
CWE_TOP, CWE_MIN_ITEMS = 3, 9        # common words asked for; the shortest list
BABI_PEOPLE, BABI_MOVES = 3, 4


def check_task(name):
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}': choose from {', '.join(TASKS)}")
    return name


def parse_tasks(spec):
    """'all' or a comma list of task names; training rows draw from the list, so a task named
    twice makes twice as many rows (a mix weight)."""
    return list(TASKS) if spec == "all" else [check_task(t.strip()) for t in spec.split(",")]


@functools.lru_cache(maxsize=None)
def byte_encoding():
    from data.tokenizer import get_encoding
    return get_encoding("byte")


@functools.lru_cache(maxsize=1 << 16)
def _tok(enc, text):
    # bounded: words and list numbers stay cached, one-off facts cycle through
    return tuple(enc.encode_ordinary(text))


@functools.lru_cache(maxsize=None)
def _source(enc, kind):
    """A haystack source: its tokens, a flag at each sentence start, and the starts.
    Sentences are tokenised one by one and joined as tokens, so examples never re-tokenise
    long strings."""
    if kind == "noise":
        pieces = [" " + s for s in NOISE]
    else:
        import pydoc_data.topics
        topics = pydoc_data.topics.topics
        text = " ".join(" ".join(topics[k] for k in sorted(topics)).split())
        # a sentence, or at most 100 characters cut at a space: a needle lands near any depth
        pieces = re.findall(r" \S.{0,98}?[.!?](?= )| \S.{0,98}(?= )", f" {text} ")
    toks = enc.encode_ordinary_batch(pieces)
    is_start = np.zeros(sum(map(len, toks)), dtype=bool)
    is_start[np.cumsum([0] + [len(t) for t in toks[:-1]])] = True
    return np.array([i for t in toks for i in t], dtype=np.int64), is_start, np.flatnonzero(is_start)


# ---------------------------------------------------------------------------------------
# Surface forms. "fixed": one template per task, keys from WORDS, 7-digit values (5 in
# vartrack), 3-letter variables, bAbI's people and verbs: one format, as the first needle
# models here learned it. The varied forms draw keys of one or two words from WORDS +
# MORE_WORDS, values of 4-8 digits, variables of 2-4 letters, more people, rooms and verbs,
# and one of several templates per task, so a model learns to retrieve rather than one
# format. Every fifth word and name (in sorted order) and the templates and verbs listed as
# held out never appear in rows drawn with forms="train" (prose filler, being English, may
# hold any word, never as a key): an evaluation with forms="heldout" measures retrieval in
# forms that training never saw; "all" draws from both.

FORMS = ("fixed", "train", "heldout", "all")
# no word is a substring of another, so scoring by substring stays exact for cwe
MORE_WORDS = """acorn adobe agate alley amber antler anvil apron atlas autumn avocado bacon bagel bamboo
banjo barley barrel beacon beaver beetle bench bison blanket blossom bonnet boulder bracelet bramble bronze
buffalo bugle cabin cactus canal canoe canyon caramel cargo carrot cashew cello cement cereal chapel cheetah
chimney cider cinnamon citadel clover cobalt cobra cobweb compass cookie cricket crocus daisy dagger dolphin
donkey dune elbow ember emerald fern ferret fjord flannel flute forge garlic gazelle geyser ginger glacier
goblet gondola gorilla granite gravel griffin guitar hammock hazel hedge heron hickory hornet husky iceberg
igloo ivory jasmine jigsaw juniper kayak kernel kiwi koala lagoon larch lava lentil lilac linen lizard
lobster locket lotus lynx magnet mango maple meteor mitten mosaic moth muffin mustard nectar nutmeg oasis
oboe orchid otter oyster paddle pagoda papaya parrot pebble pelican pencil piano plume pony poplar puffin
quartz quill quiver raccoon raven reef rhubarb saffron sandal satchel scarf sequoia sherbet shovel sickle
sled sorrel spruce squid sundial swan teapot thimble thistle timber toffee topaz trumpet tulip tundra
umbrella velvet vessel vinegar volcano waffle walrus whistle willow wombat yacht zebra zephyr""".split()
MORE_NAMES = ("Anna", "Omar", "Lucy", "Pablo", "Grace", "Ivan", "Nora", "Kenji", "Rosa", "Tom", "Emma", "Hugo",
              "Lena", "Zoe", "Ravi", "Elsa", "Yusuf", "Clara", "Felix", "Maya", "Igor", "Wendy")
MORE_ROOMS = ("cellar", "attic", "library", "garage", "balcony", "pantry", "studio", "porch")
# (train, held out) templates; the first train template of each is the fixed form's.
# Needles of single, multikey, multivalue: (fact, question for one value, for all values)
NEEDLES = (
    ((" The magic number of {k} is {v}.", "What is the magic number of {k}?", "What are all the magic numbers of {k}?"),
     (" The special number for {k} is {v}.", "What is the special number for {k}?",
      "What are all the special numbers for {k}?"),
     (" Remember: the code for {k} is {v}.", "What is the code for {k}?", "What are all the codes for {k}?"),
     (" {k} has the secret value {v}.", "Which secret value does {k} have?", "Which secret values does {k} have?"),
     (" The number filed under {k} is {v}.", "Which number is filed under {k}?", "Which numbers are filed under {k}?")),
    ((" Note that the id of {k} is {v}.", "What is the id of {k}?", "What are all the ids of {k}?"),
     (" {k}'s lucky number is {v}.", "What is {k}'s lucky number?", "What are all of {k}'s lucky numbers?")))
# vartrack: (a value into a variable, a variable into a variable, question)
ASSIGNMENTS = (
    ((" VAR {a} = {v}.", " VAR {b} = VAR {a}.", "Which variables hold the value {v}?"),
     (" Let {a} be {v}.", " Let {b} be {a}.", "Which variables are equal to {v}?"),
     (" Set {a} to {v}.", " Set {b} to {a}.", "Which variables end up as {v}?"),
     (" {a} := {v}.", " {b} := {a}.", "Name every variable whose value is {v}.")),
    ((" {a} <- {v}.", " {b} <- {a}.", "Which variables carry {v} in the end?"),))
CWE_QUESTIONS = (("Which {n} words appear most often in the list?", "What are the {n} most common words in the list?",
                  "Which {n} words does the list repeat the most?"),
                 ("Name the {n} most frequent words of the list.",))
BABI_QUESTIONS = (("Where is {p}?", "Where is {p} now?", "In which room is {p}?"), ("Which room is {p} in at the end?",))
BABI_VERBS = (VERBS + ("walked to", "ran to", "headed to"), ("hurried to", "strolled to"))


def _split(items):
    """(train, held out) of a vocabulary: every fifth item of its sorted list held out."""
    items = sorted(items)
    return tuple(w for i, w in enumerate(items) if i % 5 != 4), tuple(items[4::5])


@functools.lru_cache(maxsize=None)
def surface(forms):
    """What rows drawn with `forms` (see FORMS) are made of: vocabularies, (lo, hi) lengths of
    values and variable names, and templates."""
    if forms not in FORMS:
        raise ValueError(f"unknown forms '{forms}': choose from {', '.join(FORMS)}")
    if forms == "fixed":
        return SimpleNamespace(words=tuple(WORDS), two_words=False, digits=(7, 7), vt_digits=(5, 5), var_len=(3, 3),
                               needles=NEEDLES[0][:1], assignments=ASSIGNMENTS[0][:1], cwe=CWE_QUESTIONS[0][:1],
                               babi=BABI_QUESTIONS[0][:1], names=NAMES, rooms=ROOMS, verbs=VERBS)

    def share(pair):
        return {"train": pair[0], "heldout": pair[1], "all": pair[0] + pair[1]}[forms]
    return SimpleNamespace(words=share(_split(WORDS + MORE_WORDS)), two_words=True, digits=(4, 8), vt_digits=(4, 8),
                           var_len=(2, 4), needles=share(NEEDLES), assignments=share(ASSIGNMENTS),
                           cwe=share(CWE_QUESTIONS), babi=share(BABI_QUESTIONS), names=share(_split(NAMES + MORE_NAMES)),
                           rooms=ROOMS + MORE_ROOMS, verbs=share(BABI_VERBS))


def max_answer_len(task, forms="fixed"):
    """The longest answer (target) of a task in bytes: byte tokens, and a bound for any
    tokenizer (a token covers at least one byte). The answer window needs one more token,
    for <|endoftext|>."""
    return 1 + REGISTRY[check_task(task)].longest(surface(forms))


# ---------------------------------------------------------------------------------------
# Tasks: each draws its facts as (text, share of the haystack before it) with the needle
# first, the question, the answer text the window holds (target) and the reference answers.
# s: the surface forms (surface()).

def _pick(rng, items):
    """rng.choice; one item draws nothing, so the fixed forms draw as they always did."""
    return items[0] if len(items) == 1 else rng.choice(items)


def _width(rng, lo_hi):
    lo, hi = lo_hi
    return lo if lo == hi else rng.randint(lo, hi)


def _question(template, **kw):
    return f"\n{template.format(**kw)} Answer:"


def _keys(rng, n, s):
    """n distinct keys: words of s.words, or one or two of them each."""
    if not s.two_words:
        return rng.sample(s.words, n)
    keys = []
    while len(keys) < n:
        k = " ".join(rng.sample(s.words, rng.randint(1, 2)))
        keys += [k] * (k not in keys)
    return keys


def _values(rng, n, digits):
    """n distinct values of one length, so none is a substring of another (exact scores)."""
    d = _width(rng, digits)
    return [str(v) for v in rng.sample(range(10 ** (d - 1), 10 ** d), n)]


def _single(rng, d, s):
    (key,), (value,) = _keys(rng, 1, s), _values(rng, 1, s.digits)
    fact, question, _ = _pick(rng, s.needles)
    return [(fact.format(k=key, v=value), d)], _question(question, k=key), f" {value}", [value]


def _multikey(rng, d, s):
    keys, values = _keys(rng, N_KEYS, s), _values(rng, N_KEYS, s.digits)
    fact, question, _ = _pick(rng, s.needles)
    facts = [(fact.format(k=k, v=v), d if i == 0 else rng.random()) for i, (k, v) in enumerate(zip(keys, values))]
    return facts, _question(question, k=keys[0]), f" {values[0]}", values[:1]


def _multivalue(rng, d, s):
    (key,), values = _keys(rng, 1, s), _values(rng, N_VALUES, s.digits)
    fact, _, question = _pick(rng, s.needles)
    fracs = [d] + [rng.random() for _ in values[1:]]
    facts = [(fact.format(k=key, v=v), f) for v, f in zip(values, fracs)]
    order = sorted(range(N_VALUES), key=lambda i: (fracs[i], i))  # as they appear in the context
    return facts, _question(question, k=key), " " + ", ".join(values[i] for i in order), values


def _vartrack(rng, d, s):
    names, k = [], _width(rng, s.var_len)  # one length: no name is a substring of another
    while len(names) < VT_CHAINS * VT_VARS:
        v = "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=k))
        names += [v] * (v not in names)
    values, facts = _values(rng, VT_CHAINS, s.vt_digits), []
    first, copy, question = _pick(rng, s.assignments)
    for c in range(VT_CHAINS):  # the asked chain starts at the depth; each chain's hops follow it in order
        chain = names[c * VT_VARS:(c + 1) * VT_VARS]
        start = d if c == 0 else rng.random()
        fracs = [start] + sorted(rng.uniform(start, 1) for _ in chain[1:])
        facts += [(first.format(a=chain[0], v=values[c]), start)]
        facts += [(copy.format(a=u, b=v), f) for u, v, f in zip(chain, chain[1:], fracs[1:])]
    asked = names[:VT_VARS]
    return facts, _question(question, v=values[0]), " " + " ".join(asked), asked


def _babi(rng, d, s):
    people, room = rng.sample(s.names, BABI_PEOPLE), rng.choice(s.rooms)
    facts = [(f" {people[0]} {rng.choice(s.verbs)} the {room}.", d)]  # the asked person's last move
    for _ in range(BABI_MOVES - 1):
        f = rng.random()  # only moves before the last one may be the asked person's
        who = rng.choice(people if f < d else people[1:])
        facts.append((f" {who} {rng.choice(s.verbs)} the {rng.choice(s.rooms)}.", f))
    return facts, _question(_pick(rng, s.babi), p=people[0]), f" {room}", [room]


def _cwe(rng, d, s):
    # no facts but the common words: the list is drawn once the length is known
    common = rng.sample(s.words, CWE_TOP)
    return common, _question(_pick(rng, s.cwe), n=CWE_TOP), " " + " ".join(common), common


class Task(NamedTuple):
    build: callable    # (rng, depth share, surface forms) -> facts, question, target, answers
    longest: callable  # surface forms -> the longest target in bytes


_word = lambda s: max(len(w) for w in s.words)
# every task, registered here once: a new task is a builder and its longest answer
REGISTRY = dict(
    single=Task(_single, lambda s: s.digits[1]),
    multikey=Task(_multikey, lambda s: s.digits[1]),
    multivalue=Task(_multivalue, lambda s: N_VALUES * s.digits[1] + 2 * (N_VALUES - 1)),
    vartrack=Task(_vartrack, lambda s: VT_VARS * s.var_len[1] + VT_VARS - 1),
    cwe=Task(_cwe, lambda s: CWE_TOP * _word(s) + CWE_TOP - 1),
    babi=Task(_babi, lambda s: max(len(r) for r in s.rooms)),
)
TASKS = tuple(REGISTRY)


def _cwe_list(common, budget, rng, enc, words):
    """A numbered list " 1. word 2. word ..." of at most `budget` tokens (within one item):
    each common word appears f ~ n/10 times (at least twice), the other words of `words` fill
    the rest, cycling, so each appears fewer times. Returns the tokens and the common words in
    order of first appearance."""
    rare = [w for w in words if w not in common]
    rng.shuffle(rare)
    avg = sum(len(_tok(enc, " " + w)) for w in words) / len(words) + len(_tok(enc, f" {budget // 8}."))
    f = max(2, int(budget / avg) // 10)
    words = [w for w in common for _ in range(f)]
    used = sum(len(_tok(enc, f" {i + 1}.")) + len(_tok(enc, " " + w)) for i, w in enumerate(words))
    while True:
        w = rare[(len(words) - len(common) * f) % len(rare)]
        item = len(_tok(enc, f" {len(words) + 1}.")) + len(_tok(enc, " " + w))
        if used + item > budget:
            break
        words.append(w)
        used += item
    rng.shuffle(words)
    out = [t for i, w in enumerate(words) for t in _tok(enc, f" {i + 1}.") + _tok(enc, " " + w)]
    return out, sorted(common, key=words.index)


def _place(facts, budget, rng, enc, haystack):
    """Facts (tokens, frac) inserted into `budget` haystack tokens, each at the sentence
    boundary nearest frac * budget (ties in list order): frac is the share of the haystack
    before the fact, as RULER's depth. Returns the context and each fact's (start, end) in it, in
    the order of facts (the needle, facts[0], first)."""
    tokens, is_start, starts = _source(enc, haystack)
    idx = (starts[rng.randrange(len(starts))] + np.arange(budget)) % len(tokens)  # wraps around
    filler = tokens[idx].tolist()
    bounds = np.append(np.flatnonzero(is_start[idx]), budget)
    out, last, spans = [], 0, [None] * len(facts)
    for i in sorted(range(len(facts)), key=lambda i: (facts[i][1], i)):
        toks, frac = facts[i]
        j = int(np.searchsorted(bounds, frac * budget))
        near = bounds[max(j - 1, 0):j + 1]
        p = int(near[np.abs(near - frac * budget).argmin()])  # never before `last`: fracs are sorted
        out += filler[last:p]
        spans[i] = (len(out), len(out) + len(toks))
        out += toks
        last = p
    return out + filler[last:], spans


def make_example(task, length, depth, rng, enc=None, haystack="noise", answer_len=0, forms="fixed", fill=1.0):
    """One example: dict(prompt=token ids, answers=reference strings, target=the answer text
    a model should write, needle_pos=token index of the needle, or None for cwe, fact_spans=the
    (start, end) of every fact in the prompt, the needle first, [] for cwe).

    length: prompt + answer_len tokens (the prompt fills it, cwe's within one list item), or
    a (lo, hi) range: uniform over [max(lo, this example's minimum), hi]. An example that
    cannot fit (keys, names and templates vary in length) is drawn again, up to 100 times.
    depth: the share of the haystack before the needle in percent (0 start, 100 end). rng: a
    random.Random or a seed. enc: a tiktoken Encoding (default: the byte-level one).
    haystack: "noise" or "prose" (cwe has none: its list fills the context).
    forms: the surface forms, see FORMS. fill: the longest length drawn, as a share of the way
    from this example's minimum to hi (a length curriculum: 0 gives the facts with no haystack).
    """
    rng = rng if isinstance(rng, random.Random) else random.Random(rng)
    enc = enc or byte_encoding()
    check_task(task)
    s = surface(forms)
    if haystack not in HAYSTACKS:
        raise ValueError(f"unknown haystack '{haystack}': choose from {', '.join(HAYSTACKS)}")
    lo, hi = length if isinstance(length, tuple) else (length, length)
    for _ in range(100):  # draw again until one fits
        facts, question, target, answers = REGISTRY[task].build(rng, depth / 100, s)
        question = _tok(enc, question)
        if task == "cwe":  # its facts are the common words; room for the shortest list of the longest words
            fixed = CWE_MIN_ITEMS * (len(_tok(enc, f" {CWE_MIN_ITEMS}.")) + max(len(_tok(enc, " " + w)) for w in s.words))
        else:
            facts = [(_tok(enc, text), frac) for text, frac in facts]
            fixed = sum(len(t) for t, _ in facts)
        need = answer_len + len(question) + fixed
        answer_fits = not answer_len or len(_tok(enc, target)) < answer_len  # room for <|endoftext|>
        if need <= hi and answer_fits:
            break
    if need > hi:
        raise ValueError(f"length {hi} is too short for task {task}: needs at least {need} tokens")
    if not answer_fits:
        raise ValueError(f"the answer of task {task} ({target!r}) needs {len(_tok(enc, target)) + 1} tokens "
                         f"with <|endoftext|>: raise answer_len={answer_len}")
    lo = max(lo, need)
    length = rng.randint(lo, lo + int(fill * (hi - lo)))
    if task == "cwe":
        context, common = _cwe_list(facts, length - answer_len - len(question), rng, enc, s.words)
        target, spans = " " + " ".join(common), []  # the same words, in order of first appearance
    else:
        context, spans = _place(facts, length - need, rng, enc, haystack)
    return dict(prompt=context + list(question), answers=answers, target=target,
                needle_pos=spans[0][0] if spans else None, fact_spans=spans)


def hide_answers(example, enc=None):
    """The prompt with every fact that holds a reference answer cut out (write-then-hide: what
    attention can no longer find). A fact holds an answer when its text contains one, as score
    counts it: the needle of single and multikey, every value of multivalue, the asked chain of
    vartrack, the moves into the answer's room in babi. cwe has no facts: its prompt is kept."""
    enc = enc or byte_encoding()
    prompt, answers = example["prompt"], [a.lower() for a in example["answers"]]
    cut = [(a, b) for a, b in example["fact_spans"] if any(x in enc.decode(prompt[a:b]).lower() for x in answers)]
    return [t for i, t in enumerate(prompt) if not any(a <= i < b for a, b in cut)]


def score(output_text, answers):
    """RULER's metric: the fraction of the reference answers found (case-insensitive) in the output."""
    out = output_text.lower()
    return sum(a.lower() in out for a in answers) / len(answers)


# ---------------------------------------------------------------------------------------
# train.py's hook for dataset="niah" (SOURCE): its config keys, presets, checks and rows

# the keys NiahData reads from the train config, with their defaults
NIAH_DEFAULTS = dict(niah_tasks="all", niah_min_len=0, niah_full_frac=0.25, niah_answer_len=32,
                     niah_haystack="noise", niah_forms="fixed", niah_curriculum=0)
PRESETS = {
    # needle rows, prompt unmasked, answer scored: one task at 256 tokens, one GPU, minutes
    "niah": dict(out_dir="out-niah", dataset="niah", block_size=256, batch_size=128, max_iters=4000, n_layer=8,
                 n_head=8, n_embd=512, lr=6e-4, min_lr=6e-5, warmup_iters=200, eval_interval=500, eval_iters=10,
                 log_interval=50, niah_tasks="single", niah_answer_len=16),
    # the multi-seed protocol (experiments/protocol.py): single and the Table 1 tasks this width learns in a mix
    # (multivalue, cwe; vartrack and babi: RESULTS.md) in varied surface forms over noise and prose
    # filler; the 32-token window holds the longest answer (multivalue: 29 + <|endoftext|>); rows grow
    # to 256 tokens over the first 4000 steps; cwe is the slowest, so it is named four times (two thirds
    # of the rows: answer accuracy >= 0.9 within 60% of the steps in 7 of 9 seeds, 3 of 5 at half, 3 of 5
    # at a third); two workers draw the rows ahead of the loop (the CPU-side row generation otherwise
    # stalls the GPU)
    "niah_proto": dict(out_dir="out-niah-proto", dataset="niah", block_size=256, batch_size=128, max_iters=16000,
                       n_layer=8, n_head=8, n_embd=512, lr=6e-4, min_lr=6e-5, warmup_iters=200, eval_interval=500,
                       eval_iters=10, log_interval=50, niah_tasks="single,multivalue,cwe,cwe,cwe,cwe",
                       niah_answer_len=32, niah_forms="train", niah_haystack="noise,prose", niah_full_frac=0.1,
                       niah_curriculum=4000, data_workers=2),
    "niah_tiny": dict(out_dir="out-niah-tiny", dataset="niah", block_size=256, batch_size=8, max_iters=20,
                      n_layer=2, n_head=2, n_embd=64, warmup_iters=5, eval_interval=10, eval_iters=2,
                      log_interval=10, mem_rank=8, compile=False, niah_tasks="single,babi"),
}


def check_config(cfg):
    """Stop with one line at the first niah_* setting of a train config that cannot train."""
    def need(ok, msg):
        if not ok:
            raise SystemExit(msg)
    need(cfg["niah_answer_len"] >= 1, f"--niah_answer_len={cfg['niah_answer_len']}: must be a positive integer")
    for k in ("niah_min_len", "niah_curriculum"):
        need(cfg[k] >= 0, f"--{k}={cfg[k]}: must be >= 0")
    need(cfg["niah_min_len"] <= cfg["block_size"], f"--niah_min_len={cfg['niah_min_len']}: must be at most "
                                                   f"--block_size={cfg['block_size']} (rows are block_size tokens)")
    try:
        parse_tasks(cfg["niah_tasks"])
    except ValueError as e:
        raise SystemExit(f"--niah_tasks={cfg['niah_tasks']}: {e}") from None
    need(0 <= cfg["niah_full_frac"] <= 1, f"--niah_full_frac={cfg['niah_full_frac']}: must be within 0 and 1")
    need(set(cfg["niah_haystack"].split(",")) <= set(HAYSTACKS),
         f"--niah_haystack={cfg['niah_haystack']}: use {', '.join(HAYSTACKS)} or a comma list of them")
    need(cfg["niah_forms"] in FORMS, f"--niah_forms={cfg['niah_forms']}: use one of {', '.join(FORMS)}")


class NiahData:
    """Rows of prompt (not maskable), answer window (niah_answer_len tokens: the answer, then
    <|endoftext|> to the end, maskable: the model learns to stop), padding to block_size
    (key_pad, not maskable). With probability niah_full_frac a whole batch is maskable, so the
    model keeps learning the haystack text too. Per batch, not per row: the loss is normalised
    by the batch's maskable tokens, so full rows in a mixed batch would outweigh the answers
    (at 0.25 and 512 tokens, 84% of the weight) and retrieval would learn far more slowly.
    Lengths (prompt + window) are uniform over [max(niah_min_len, the task's minimum),
    block_size], depths over 0-100, tasks over niah_tasks (a task named twice: twice the rows),
    haystacks over niah_haystack (a comma list: "noise,prose" mixes both); niah_forms is the
    surface forms (FORMS).
    niah_curriculum > 0: a length curriculum for training rows, as retrieval is learned sooner in
    short contexts: at step s the longest row is the share min(1, s / niah_curriculum) of the way
    from the example's minimum to block_size (make_example's fill). Eval rows always span it all."""

    def __init__(self, cfg, device):
        from data.tokenizer import get_encoding
        self.enc, self.device = get_encoding(cfg["tokenizer"]), device
        self.T, self.B, self.answer_len, self.seed = cfg["block_size"], cfg["batch_size"], cfg["niah_answer_len"], cfg["seed"]
        self.min_len, self.full_frac = cfg["niah_min_len"], cfg["niah_full_frac"]
        self.curriculum = cfg["niah_curriculum"]
        self.haystacks, self.forms = cfg["niah_haystack"].split(","), cfg["niah_forms"]
        try:
            self.tasks = parse_tasks(cfg["niah_tasks"])
            for t in self.tasks:  # fail now, not at some step: every task must fit the window and block_size
                need = max_answer_len(t, self.forms) + 1
                if self.enc.name == "byte" and need > self.answer_len:  # else a longer answer would be drawn again, unseen
                    raise ValueError(f"the answers of task {t} take up to {need} tokens with <|endoftext|>: "
                                     f"set niah_answer_len >= {need}")
                for h in self.haystacks:
                    make_example(t, (self.T, self.T), 50, 0, self.enc, h, self.answer_len, self.forms)
        except ValueError as e:
            raise SystemExit(f"niah: {e} (block_size={self.T}, niah_answer_len={self.answer_len})") from None

    def batch(self, split, gen, step=None, with_tasks=False):
        """(x0, maskable, key_pad) [B, T] each; the rows are drawn from a python RNG seeded by gen
        and the split, so batches are reproducible and val rows come from their own stream.
        step: the training step, for the curriculum of train rows (None: the full range of lengths).
        with_tasks: also return each row's task name (for per-task eval accuracy)."""
        rng = random.Random(f"niah:{split}:{self.seed}:{torch.randint(2 ** 62, (1,), generator=gen).item()}")
        eot = self.enc.eot_token
        x = np.full((self.B, self.T), eot, dtype=np.int64)
        maskable = np.zeros((self.B, self.T), dtype=bool)
        key_pad = np.ones((self.B, self.T), dtype=bool)
        full = rng.random() < self.full_frac
        curriculum = split == "train" and step is not None and self.curriculum
        fill = min(1.0, step / self.curriculum) if curriculum else 1.0
        tasks = []
        for b in range(self.B):
            tasks.append(rng.choice(self.tasks))
            ex = make_example(tasks[-1], (self.min_len, self.T), rng.uniform(0, 100), rng,
                              self.enc, _pick(rng, self.haystacks), self.answer_len, self.forms, fill)
            ans = _tok(self.enc, ex["target"])
            row = ex["prompt"] + list(ans) + [eot] * (self.answer_len - len(ans))
            x[b, :len(row)] = row
            key_pad[b, :len(row)] = False
            maskable[b, 0 if full else len(ex["prompt"]):len(row)] = True
        out = tuple(torch.from_numpy(a) for a in (x, maskable, key_pad))
        if self.device.startswith("cuda"):
            out = tuple(a.pin_memory().to(self.device, non_blocking=True) for a in out)
        return (out, tasks) if with_tasks else out


SOURCE = SimpleNamespace(defaults=NIAH_DEFAULTS, presets=PRESETS, check=check_config, data=NiahData)
