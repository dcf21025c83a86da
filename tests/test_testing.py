"""sparsec.testing.assert_equivalent and the pytest fixture, as users' CI uses them."""

import numpy as np
import pytest

from sparsec.testing import assert_equivalent
from tests.helpers import linear, save, weights

pytest_plugins = ["pytester"]


@pytest.fixture
def models(tmp_path):
    a = save(linear(k=128, n=64), tmp_path / "a.onnx")
    same = save(linear(k=128, n=64), tmp_path / "same.onnx")
    w = linear(k=128, n=64)
    arr = np.frombuffer(w.graph.initializer[0].raw_data, np.float32).copy()
    arr[:8] *= 1.001  # a small change: fails exact tolerances, passes a cosine budget
    w.graph.initializer[0].raw_data = arr.tobytes()
    near = save(w, tmp_path / "near.onnx")
    return a, same, near


def test_pass_and_fail(models, tmp_path):
    a, same, near = models
    verdict = assert_equivalent(a, same)
    assert verdict.passed
    with pytest.raises(AssertionError, match="outputs differ beyond tolerance") as info:
        assert_equivalent(a, near)
    assert "FAILED | output 'Y'" in str(info.value)
    assert_equivalent(a, near, min_cosine=0.999)
    with pytest.raises(AssertionError, match="cosine .* < min_cosine 1.0"):
        assert_equivalent(a, save(linear(k=128, n=64, seed=4), tmp_path / "other.onnx"), min_cosine=1.0)
    assert_equivalent(a, near, max_rel_err=0.01)  # 8 of 128 weights moved by 0.1%: far less than 1%
    with pytest.raises(AssertionError, match="relative L2 error .* > max_rel_err 0.5"):
        assert_equivalent(a, save(linear(k=128, n=64, seed=4), tmp_path / "other.onnx"), max_rel_err=0.5)
    np.savez(tmp_path / "in.npz", X=weights(3, 128))
    assert assert_equivalent(a, same, tmp_path / "in.npz").input_sets == 1
    assert assert_equivalent(a, same, [{"X": weights(2, 128)}], atol=0, rtol=0).passed


@pytest.mark.integration
def test_fixture_in_a_users_test_suite(pytester, models):
    a, same, near = models
    pytester.makepyfile(f"""
        def test_same(onnx_equivalence):
            onnx_equivalence(r"{a}", r"{same}")

        def test_near(onnx_equivalence):
            onnx_equivalence(r"{a}", r"{near}")
    """)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*outputs differ beyond tolerance*"])
