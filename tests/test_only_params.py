"""tests/conftest.py's ``only_params`` mark: a test only with some params of a parametrized fixture."""

from __future__ import annotations

from tests.test_environment import run_inner

INNER = '''
import pytest

@pytest.fixture(scope="module", params=["userspace", "kernel"])
def plane(request):
    return request.param

def test_first(plane):
    pass

@pytest.mark.only_params(plane=["kernel"])
def test_kernel_only(plane):
    assert plane == "kernel"

def test_last(plane):
    pass
'''


def test_the_other_variants_are_deselected_not_skipped_and_the_order_stays(tmp_path):
    res = run_inner(tmp_path, "true", INNER)
    assert res.returncode == 0, res.stdout
    assert "5 passed, 1 deselected" in res.stdout and "skipped" not in res.stdout, res.stdout
    ran = [line.split("::")[1] for line in res.stdout.splitlines() if line.startswith("PASSED")]
    assert ran == ["test_first[userspace]", "test_last[userspace]",
                   "test_first[kernel]", "test_kernel_only[kernel]", "test_last[kernel]"], ran


def test_a_fixture_not_parametrized_is_a_usage_error(tmp_path):
    res = run_inner(tmp_path, None, INNER.replace("only_params(plane=", "only_params(planes="))
    assert res.returncode == 4, res.stdout + res.stderr
    assert "only_params(planes=...) but planes is not parametrized" in res.stdout + res.stderr
