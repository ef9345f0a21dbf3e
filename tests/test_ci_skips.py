"""Under CI=true a skipped test fails the run unless it is marked gpu (tests/ci_skips.py)."""

import pytest

CASES = '''
import pytest

def test_passes():
    pass

def test_skips_for_a_missing_package():
    pytest.importorskip("a_package_that_is_not_installed")

@pytest.mark.gpu
@pytest.mark.skipif(True, reason="needs a CUDA device")
def test_needs_a_gpu():
    pass
'''


@pytest.mark.parametrize("ci, outcomes", [("true", {"passed": 1, "failed": 1, "skipped": 1}),
                                          ("", {"passed": 1, "skipped": 2})])
def test_only_gpu_tests_may_skip_in_ci(pytester, monkeypatch, ci, outcomes):
    monkeypatch.setenv("CI", ci)
    pytester.makepyfile(test_cases=CASES)
    result = pytester.runpytest("-p", "ci_skips", "-p", "no:cacheprovider")
    result.assert_outcomes(**outcomes)
    if ci:
        result.stdout.fnmatch_lines(["*test_skips_for_a_missing_package skipped under CI=true without the 'gpu'"
                                     " mark*a_package_that_is_not_installed*"])


def test_a_module_level_skip_fails_in_ci(pytester, monkeypatch):
    monkeypatch.setenv("CI", "true")
    pytester.makepyfile(test_cases='import pytest\npytest.importorskip("not_installed_either")\n'
                                   'def test_never_collected():\n    pass\n')
    result = pytester.runpytest("-p", "ci_skips", "-p", "no:cacheprovider")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*skipped under CI=true without the 'gpu' mark*not_installed_either*"])
