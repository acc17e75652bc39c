"""What the graders share: the implementation under test, a tiny model and its random inputs.

A grader (lessons/<lesson>/grade_*.py) names the core's reference functions once, at its top,
in a dict REFERENCE; the fixture `impl` (lessons/conftest.py) hands each test the module
under test, chosen by --impl (or the environment variable LESSON_IMPL):

    solution    the student's lessons/<lesson>/solution.py (the default)
    reference   the core's functions (REFERENCE): every grader must pass
    wrong       lessons/<lesson>/wrong.py, a planted wrong solution: every grader must fail
    DIR         DIR/<lesson>/solution.py, a tree of solutions kept elsewhere (a course's own)
"""
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import torch

from model import DiffusionLM, ModelConfig

LESSONS = Path(__file__).resolve().parent
MASK_ID = ModelConfig.mask_id


def load_file(path, name):
    """The module of a .py file, loaded by path (lesson folders are not packages)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def implementation(target, lesson_dir, reference):
    """The functions under test for one lesson (see the module's docstring)."""
    lesson_dir = Path(lesson_dir)
    if target == "reference":
        return SimpleNamespace(**reference)
    path = lesson_dir / f"{target}.py" if target in ("solution", "wrong") else Path(target) / lesson_dir.name / "solution.py"
    if not path.is_file():
        raise FileNotFoundError(f"--impl={target}: no {path} (use solution, reference, wrong or a directory "
                                f"holding <lesson>/solution.py)")
    return load_file(path, f"lesson_{lesson_dir.name}_{target}".replace("-", "_"))


def tiny(n_layer=2, seed=0, **cfg):
    """A tiny random DiffusionLM in float64 (the graders compare to 1e-9, not to float32's noise)."""
    torch.manual_seed(seed)
    return DiffusionLM(ModelConfig(n_layer=n_layer, n_head=2, n_embd=32, **cfg)).double()


def tokens(B, T, seed=1):
    """Random byte tokens [B, T]."""
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


def prompt_response(B, T, prompt_lens):
    """maskable [B, T] of instruction-style rows: each row's first prompt_lens[b] tokens are its
    prompt (never masked, never scored), the rest its response."""
    return torch.arange(T)[None, :] >= torch.as_tensor(prompt_lens)[:, None]


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def state_at(model, rows, mask, split):
    """The memory.State of x_k = x0 with mask_id at mask, its h the bottom's output (the layers
    below split, with the graph where grad is enabled): what the inner loop hands inner_step."""
    from memory import State
    x_k = torch.where(mask, model.cfg.mask_id, rows.x0)
    return State(rows, mask, model(x_k, key_pad=rows.key_pad, stop=split))
