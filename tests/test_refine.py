"""DSnoT mask refinement: never worse than its starting mask, layouts kept, wired into the passes."""

import numpy as np
import onnx_ir as ir
import pytest
import torch

from sparsec.data import Calibration
from sparsec.errors import OptionError
from sparsec.passes import prune_methods, refine
from sparsec.pipeline import PassContext, parse_pass_specs, run_passes
from sparsec.sparsity import NMLayout, UnstructuredLayout, is_nm
from tests.helpers import linear, weights
from tests.test_prune_methods import correlated_inputs

LAYOUTS = [NMLayout(2, 4), NMLayout(1, 4), NMLayout(4, 8), UnstructuredLayout(0.5), UnstructuredLayout(0.7)]


def objective(x, w, new):
    """||X W^T - X W_sparse^T||^2, the calibration objective, in float64."""
    x, d = x.astype(np.float64), (w - new).astype(np.float64)
    return float(((x @ d.T) ** 2).sum())


def dense_values(result, w):
    return result.values if result.values is not None else np.where(result.mask, w, 0)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: l.name)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_refined_mask_is_never_worse_and_keeps_the_layout(layout, method):
    gains = []
    for seed in range(4):
        x = correlated_inputs(tokens=256, k=64, seed=seed)
        w = weights(24, 64, seed=10 + seed)
        stat = prune_methods.new_statistic(method, 64, "cpu", gram=True)
        stat.add(x)
        start = dense_values(prune_methods.prune_matrix(method, w, layout, stat), w)
        result = prune_methods.prune_matrix(method, w, layout, stat, refine="dsnot")
        new = dense_values(result, w)
        assert layout.complies(new)
        # Swaps happen within rows: every row keeps as many weights as it had.
        np.testing.assert_array_equal((new != 0).sum(1), (start != 0).sum(1))
        before, after = objective(x, w, start), objective(x, w, new)
        assert after <= before * (1 + 1e-6)
        # The record's figures are the same objective (H = 2/n X^T X: a constant factor).
        ratio = result.figures["objective_after"] / result.figures["objective_before"]
        assert ratio == pytest.approx(after / before, rel=1e-3)
        if method != "sparsegpt":  # a mask-only method stays mask-only: kept values are W's bits
            assert result.values is None and np.array_equal(new[result.mask], w[result.mask])
        gains.append(after / before)
    # Not a no-op: on these problems refinement finds real gains.
    assert np.mean(gains) < 0.97


def test_every_row_is_no_worse_than_its_start():
    x = correlated_inputs(tokens=256, k=32, seed=3)
    w = weights(8, 32, seed=4)
    layout = NMLayout(2, 4)
    mask = layout.mask(np.abs(w))
    gram = torch.from_numpy((x.T @ x).astype(np.float32))
    values, new_mask, figures = refine.dsnot(w, np.where(mask, w, 0), mask, gram, layout)
    assert figures["objective_after"] <= figures["objective_before"] and figures["swaps"] > 0
    before = refine.row_errors(torch.from_numpy(w), torch.from_numpy(np.where(mask, w, 0)), gram)
    after = refine.row_errors(torch.from_numpy(w), torch.from_numpy(values), gram)
    assert bool((after <= before * (1 + 1e-6)).all())
    assert is_nm(values, 2, 4, axis=1) and not np.array_equal(new_mask, mask)


def test_dsnot_rejects_block_layouts():
    from sparsec.sparsity import BlockLayout

    w = weights(8, 16)
    with pytest.raises(ValueError, match="dsnot refines"):
        refine.dsnot(w, w, np.ones_like(w, bool), torch.eye(16), BlockLayout(4, 4, 0.5))


def calibrated(tmp_path, spec, k=64, n=32):
    model = ir.serde.deserialize_model(linear(k=k, n=n))
    x = correlated_inputs(tokens=256, k=k, seed=7)
    calib = Calibration([{"X": x[:128]}, {"X": x[128:]}], "test")
    (record,) = run_passes(model, parse_pass_specs(spec), PassContext(calibration=calib))
    return model, record, x


@pytest.mark.parametrize("spec", ["nm:method=wanda,refine=dsnot,min_params=0",
                                  "nm:method=sparsegpt,refine=dsnot,min_params=0",
                                  "unstructured:method=magnitude,refine=dsnot,min_params=0"])
def test_pass_refines_with_calibration(tmp_path, spec):
    w = weights(64, 32, seed=0)  # the weight linear() builds
    model, record, x = calibrated(tmp_path, spec)
    new = model.graph.initializers["W"].const_value.numpy()
    assert len(record.changed) == 1
    info = record.extra["refine"]
    assert info["swaps"] > 0 and info["objective_after"] < info["objective_before"]
    assert any(n.startswith("dsnot:") for n in record.notes)
    if spec.startswith("nm"):
        assert is_nm(new, 2, 4, axis=0)
    if "sparsegpt" not in spec:
        kept = new != 0
        assert np.array_equal(new[kept], w[kept])


def test_refine_needs_calibration_and_rejects_bad_combinations():
    model = ir.serde.deserialize_model(linear(k=64, n=32))
    with pytest.raises(OptionError, match="refine=dsnot needs"):
        run_passes(model, parse_pass_specs("nm:method=magnitude,refine=dsnot,min_params=0"), PassContext())
    with pytest.raises(OptionError, match="targets=dense"):
        parse_pass_specs("nm:method=sparsegpt,targets=dense,refine=dsnot")
    with pytest.raises(OptionError, match="tiles"):
        parse_pass_specs("block:method=wanda,refine=dsnot")
    with pytest.raises(OptionError):
        parse_pass_specs("nm:refine=admm")
