"""Grading. `python -m pytest lessons` grades the student's solution.py of every lesson;
--impl=reference grades the core (must pass), --impl=wrong the planted wrong solutions (must
fail), --impl=DIR a tree of solutions laid out as lessons/ is (see grading.py).

lessons/pytest.ini makes this folder the rootdir when pytest is pointed at it, and collects the
graders (grade_*.py); the repository's own `python -m pytest -q` never collects them, so the
unimplemented stubs cannot fail the suite (tests/test_lessons.py runs the graders instead)."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the core (model.py, memory.py), from any cwd

import pytest  # noqa: E402
import torch  # noqa: E402

from lessons import grading  # noqa: E402

torch.set_num_threads(1)  # tiny models: threads only add overhead (as the repository's conftest)


def pytest_addoption(parser):
    parser.addoption("--impl", default=os.environ.get("LESSON_IMPL", "solution"),
                     help="what to grade: solution (default), reference, wrong, or a directory of solutions")


def pytest_configure(config):
    impl = config.getoption("impl")
    if impl not in ("solution", "reference", "wrong") and not Path(impl).is_dir():
        raise pytest.UsageError(f"--impl={impl}: use solution, reference, wrong or a directory holding "
                                f"<lesson>/solution.py")


def pytest_report_header(config):
    return f"grading: {config.getoption('impl')}"


@pytest.fixture(scope="module")
def impl(request):
    """The lesson's functions under test (the grader's REFERENCE names them)."""
    return grading.implementation(request.config.getoption("impl"), Path(request.module.__file__).parent,
                                  request.module.REFERENCE)
