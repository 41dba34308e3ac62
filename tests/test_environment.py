"""tests/environment.py: a missing capability skips a test, and fails it under CI=true."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

INNER = '''
import pytest
from tests.environment import needs, require

@needs("no frobnicator here")
def test_marked():
    pass

def test_required():
    require(None, "no widget here")

@needs(None)
def test_nothing_missing():
    pass
'''


def run_inner(tmp_path: Path, ci: str | None, text: str = INNER) -> subprocess.CompletedProcess:
    inner = tmp_path / "test_inner.py"
    inner.write_text(text)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    # The project's config and tests/conftest.py (which applies @needs) as a plugin.
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                           "-c", str(ROOT / "pyproject.toml"), "-p", "tests.conftest", str(inner)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_missing_capabilities_skip_outside_ci(tmp_path):
    res = run_inner(tmp_path, None)
    assert res.returncode == 0, res.stdout
    assert "1 passed, 2 skipped" in res.stdout
    assert "no frobnicator here" in res.stdout and "no widget here" in res.stdout


@pytest.mark.parametrize("ci", ["true", "1"])
def test_missing_capabilities_fail_under_ci(tmp_path, ci):
    res = run_inner(tmp_path, ci)
    assert res.returncode == 1, res.stdout
    # The marked test fails before its fixtures run (an error in setup), the other in its call.
    assert "1 failed, 1 passed, 1 error" in res.stdout, res.stdout
    assert "CI=true and this test cannot run: no frobnicator here" in res.stdout
    assert "CI=true and this test cannot run: no widget here" in res.stdout


UNMARKED_LAB = '''
import pytest
from tests.netns import Lab

def test_unmarked():
    Lab()

@pytest.mark.netns
def test_marked():
    Lab().close()
'''


def test_a_lab_in_a_test_not_marked_netns_is_refused(tmp_path):
    res = run_inner(tmp_path, None, UNMARKED_LAB)
    assert "1 failed, 1 passed" in res.stdout, res.stdout
    assert "test_unmarked builds a namespace Lab: mark it @pytest.mark.netns" in res.stdout
