"""pytest plugin (entry point ``sparsec``): the ``onnx_equivalence`` fixture.

    def test_model(onnx_equivalence):
        onnx_equivalence("model.onnx", "model.sparse.onnx", min_cosine=0.99)
"""

from __future__ import annotations

import pytest


@pytest.fixture
def onnx_equivalence():
    """:func:`sparsec.testing.assert_equivalent`, as a fixture."""
    from sparsec.testing import assert_equivalent

    return assert_equivalent
