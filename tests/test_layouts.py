"""unstructured and block passes; canonical matrices; layouts."""

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper

from sparsec.errors import OptionError
from sparsec.passes import patterns
from sparsec.passes.patterns import Code
from sparsec.pipeline import PassContext, parse_pass_specs, run_passes
from sparsec.sparsity import BlockLayout, UnstructuredLayout
from tests.helpers import FLOAT, linear, make_model, weights


def prune(proto, spec):
    model = ir.serde.deserialize_model(proto)
    (record,) = run_passes(model, parse_pass_specs(spec), PassContext())
    return model, record


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_unstructured(sparsity):
    model, record = prune(linear(k=64, n=32), f"unstructured:sparsity={sparsity},min_params=0")
    w = model.graph.initializers["W"].const_value.numpy()
    assert np.mean(w == 0) == pytest.approx(sparsity, abs=1 / w.size)
    assert record.changed[0].details["layout"] == f"{sparsity:.0%} unstructured"
    _, again = prune(ir.serde.serialize_model(model), f"unstructured:sparsity={sparsity},min_params=0")
    assert again.skip_counts() == {Code.ALREADY_SPARSE: 1}


@pytest.mark.parametrize("rows,cols", [(4, 4), (8, 16), (32, 32)])
def test_block_tiles_in_canonical_form(rows, cols):
    model, _ = prune(linear("Gemm", k=64, n=64, transB=1), f"block:rows={rows},cols={cols},min_params=0")
    w = model.graph.initializers["W"].const_value.numpy()  # Gemm transB: (N, K) is canonical already
    tiles = w.reshape(64 // rows, rows, 64 // cols, cols).swapaxes(1, 2)
    kept_per_tile = np.count_nonzero(tiles, axis=(2, 3))
    zero_tiles = kept_per_tile == 0
    assert zero_tiles.mean() == pytest.approx(0.5, abs=0.5 / zero_tiles.size + 1e-9)
    # Whole tiles go: every tile is all zeros or keeps all its (random, non-zero) weights.
    assert set(np.unique(kept_per_tile).tolist()) == {0, rows * cols}


def test_block_not_divisible_and_options():
    _, record = prune(linear(k=64, n=30), "block:rows=4,cols=4,min_params=0")
    assert record.skip_counts() == {Code.NOT_DIVISIBLE: 1}
    with pytest.raises(OptionError, match="one of 4, 8, 16, 32"):
        parse_pass_specs("block:rows=3")
    with pytest.raises(OptionError, match="multiple of cols"):
        parse_pass_specs("block:cols=32,method=sparsegpt,blocksize=48")


def test_canonical_matrix_roundtrip_for_every_layout():
    cases = [
        (linear("MatMul", 64, 32), (32, 64)),
        (linear("Gemm", 64, 32, transB=1), (32, 64)),
        (make_model([helper.make_node("Conv", ["X", "W"], ["Y"], name="lin", group=2)],
                    [("X", FLOAT, [1, 16, 8, 8])], [("Y", FLOAT, [1, 8, 6, 6])], {"W": weights(8, 8, 3, 3)}), (8, 72)),
        (make_model([helper.make_node("MatMul", ["X", "W"], ["Y"], name="lin")],
                    [("X", FLOAT, [3, 5, 16])], [("Y", FLOAT, [3, 5, 8])], {"W": weights(3, 16, 8)}), (24, 16)),
    ]
    for proto, shape in cases:
        site = patterns.match_linear_weight(next(n for n in ir.serde.deserialize_model(proto).graph if n.name == "lin"))
        w = site.weight.numpy()
        m = site.to_matrix(w)
        assert m.shape == shape == site.matrix_shape
        np.testing.assert_array_equal(site.from_matrix(m), w)
        if site.op == "Conv":
            # Columns run (kh, kw, c_in): consecutive columns are consecutive input channels.
            np.testing.assert_array_equal(m[0, :8], w[0, :, 0, 0])
            np.testing.assert_array_equal(m[0, 8:16], w[0, :, 0, 1])


def test_layout_masks():
    scores = np.arange(32, dtype=float).reshape(4, 8)
    assert UnstructuredLayout(0.25).mask(scores).sum() == 24
    per_row = UnstructuredLayout(0.5).mask(scores[::-1], per_row=True)
    assert (per_row.sum(1) == 4).all()
    block = BlockLayout(2, 4, 0.5).mask(scores)
    assert block.sum() == 16 and block[2:, 4:].all() and not block[:2, :4].any()
