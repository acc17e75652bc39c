"""The lessons' graders have teeth, and hypergrad.py refuses what it cannot run.

Every grader passes on the core (--impl=reference) and fails on its lesson's planted wrong
solution (--impl=wrong) with an assertion, so no grader is toothless; the stubs a student fills
in raise NotImplementedError and have the signatures the graders call. The graders run as a
student runs them (python -m pytest lessons), in a subprocess, so this suite's own collection
never touches the stubs."""
import ast
import inspect
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from lessons import grading, hypergrad
from model import DiffusionLM, ModelConfig

ROOT = Path(__file__).resolve().parents[1]
LESSON_DIRS = sorted(p for p in (ROOT / "lessons").iterdir() if p.is_dir() and list(p.glob("grade_*.py")))


def grade(target, tmp_path):
    """Run every grader against target; the exit code and, per lesson folder, the failures'
    messages (from pytest's JUnit XML)."""
    xml = tmp_path / f"{target}.xml"
    run = subprocess.run([sys.executable, "-m", "pytest", "lessons", f"--impl={target}", "-q", f"--junitxml={xml}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    failures = {d.name: [] for d in LESSON_DIRS}
    for case in ET.parse(xml).iter("testcase"):
        for bad in list(case.iter("failure")) + list(case.iter("error")):
            failures.setdefault(case.get("file", case.get("classname")).replace(".", "/").split("/")[0], []).append(
                (bad.tag, bad.get("message", "")))
    return run, failures


def test_the_lessons_are_seven_and_each_has_a_page_a_stub_a_wrong_solution_and_a_grader():
    assert [d.name[:2] for d in LESSON_DIRS] == [f"{i:02d}" for i in range(1, 8)]
    for d in LESSON_DIRS:
        assert {"README.md", "solution.py", "wrong.py"} <= {p.name for p in d.iterdir()}, d.name
        assert f"python -m pytest lessons/{d.name}" in (d / "README.md").read_text(), f"{d.name}: the page says how to grade"


def test_every_grader_passes_on_the_reference(tmp_path):
    run, failures = grade("reference", tmp_path)
    assert run.returncode == 0, run.stdout[-3000:]
    assert not any(failures.values())


def test_every_grader_fails_its_planted_wrong_solution_by_an_assertion(tmp_path):
    run, failures = grade("wrong", tmp_path)
    assert run.returncode != 0, "a grader passed a planted wrong solution"
    for lesson, bad in failures.items():
        assert bad, f"{lesson}: its grader passes the planted wrong solution (a toothless grader)"
        # the grader's verdict, not a crash of the wrong solution (a TypeError proves nothing)
        assert all(tag == "failure" and msg.startswith(("AssertionError", "assert "))
                   for tag, msg in bad), (lesson, bad)


def functions(module):
    return {n: f for n, f in vars(module).items() if inspect.isfunction(f) and f.__module__ == module.__name__}


@pytest.mark.parametrize("lesson", LESSON_DIRS, ids=lambda d: d.name)
def test_the_stub_raises_not_implemented_with_the_signatures_the_grader_calls(lesson):
    grader = grading.load_file(next(lesson.glob("grade_*.py")), f"grader_{lesson.name}")
    stub = grading.load_file(lesson / "solution.py", f"stub_{lesson.name}")
    wrong = grading.load_file(lesson / "wrong.py", f"wrong_{lesson.name}")
    stubs, wrongs = functions(stub), functions(wrong)
    assert set(stubs) == set(wrongs) == set(grader.REFERENCE), lesson.name
    for name, f in stubs.items():
        assert inspect.signature(f) == inspect.signature(wrongs[name]), f"{lesson.name}: {name}"
        last = ast.parse(inspect.getsource(f)).body[0].body[-1]  # after the docstring: raise NotImplementedError
        assert isinstance(last, ast.Raise) and ast.unparse(last.exc).startswith("NotImplementedError"), name
        assert inspect.getdoc(f), f"{lesson.name}: {name} has no docstring"


# ---- hypergrad.py: one line, not a table of nan, for what it cannot run (issue 24) ----------

def write_checkpoint(out_dir, **config):
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32)
    os.makedirs(out_dir)
    torch.save({"model": DiffusionLM(cfg).state_dict(), "model_args": asdict(cfg), "step": 0,
                "config": {"dataset": "pydoc", "tokenizer": "byte", "block_size": 16, "batch_size": 2, **config}},
               os.path.join(out_dir, "ckpt.pt"))


def test_hypergrad_refuses_a_checkpoint_whose_trajectory_it_does_not_know(tmp_path):
    write_checkpoint(tmp_path / "out", mem_trajectory="zigzag")
    with pytest.raises(SystemExit) as e:
        hypergrad.main([f"--out_dir={tmp_path / 'out'}", "--ks=1", "--batches=1"])
    msg = str(e.value.code)
    assert "zigzag" in msg and "trajectory" in msg and "\n" not in msg


@pytest.mark.parametrize("clip", ["nan", "inf", "-inf", "0", "-1"])
def test_hypergrad_refuses_a_clip_that_is_not_finite_and_positive(clip, tmp_path):
    with pytest.raises(SystemExit) as e:
        hypergrad.main([f"--clip={clip}", f"--out_dir={tmp_path / 'none'}"])  # refused before any checkpoint is read
    assert "finite --clip > 0" in str(e.value.code)


def test_hypergrad_takes_no_abbreviations(capsys):
    with pytest.raises(SystemExit) as e:
        hypergrad.main(["--batch=2"])  # not --batches, nor --batch_size
    assert e.value.code == 2 and "unrecognized arguments: --batch=2" in capsys.readouterr().err


def test_an_impl_that_names_nothing_is_one_line():
    run = subprocess.run([sys.executable, "-m", "pytest", "lessons", "--impl=refrence", "-q"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "Traceback" not in run.stdout + run.stderr
    assert "--impl=refrence: use solution, reference, wrong or a directory holding <lesson>/solution.py" in run.stderr
