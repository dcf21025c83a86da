"""Block-level reconstruction (reconstruct=block): the refit is the masked least-squares solution,
the mask and layout hold, the block error it reports is the one measured in ONNX Runtime, and
option errors."""

import numpy as np
import pytest

from sparsec.data import load_calibration
from sparsec.errors import OptionError
from sparsec.graph import all_nodes
from sparsec.model_io import load_model
from sparsec.passes import patterns
from sparsec.passes.prune_methods import ColumnNorms
from sparsec.passes.reconstruct import BlockTarget
from sparsec.pipeline import PassContext, parse_pass_specs, run_passes
from sparsec.runtime.staged import StagedRunner
from sparsec.sparsity import is_nm, nm_mask


def _problem(seed=0, tokens=300, k=32, rows=12):
    rng = np.random.default_rng(seed)
    x_dense = rng.standard_normal((tokens, k)).astype(np.float32)
    x_pruned = (x_dense + 0.3 * rng.standard_normal((tokens, k))).astype(np.float32)
    w = rng.standard_normal((rows, k)).astype(np.float32)
    return x_pruned, x_dense, w


def _target(x_pruned, x_dense, w):
    stat = BlockTarget(ColumnNorms(w.shape[1]), w.shape[1], w)
    for part in np.array_split(np.arange(len(x_pruned)), 3):  # accumulated over input sets
        stat.add(x_pruned[part], x_dense[part])
    return stat


@pytest.mark.parametrize("layout", ["2:4", "unstructured"])
def test_refit_is_least_squares_on_each_rows_mask(layout):
    x_pruned, x_dense, w = _problem()
    stat = _target(x_pruned, x_dense, w)
    rng = np.random.default_rng(1)
    mask = nm_mask(np.abs(w), 2, 4, axis=1) if layout == "2:4" else rng.random(w.shape) < 0.5  # rows differ in count
    values = stat.refit(mask, damp=0.0)
    assert not values[~mask].any()
    for r in range(w.shape[0]):
        keep = mask[r]
        expected, *_ = np.linalg.lstsq(x_pruned[:, keep].astype(np.float64), x_dense @ w[r], rcond=None)
        # Gram products are accumulated in float32 (as the Hessians are): ~1e-6 relative.
        np.testing.assert_allclose(values[r, keep], expected, rtol=1e-5, atol=1e-6)
    # The error figure is the measured one, and the refit beats keeping the dense values on the mask.
    direct = np.linalg.norm(x_pruned @ values.T - x_dense @ w.T) / np.linalg.norm(x_dense @ w.T)
    assert stat.error(values) == pytest.approx(direct, rel=1e-6)
    assert stat.error(values) < stat.error(np.where(mask, w, 0))
    assert stat.inner.tokens == len(x_pruned)  # the method's own statistic saw every token too


def _feeds_and_value(model, name):
    return next(v for n in all_nodes(model) for v in n.inputs if v is not None and v.name == name)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_block_exits_refit_and_the_reported_error_is_real(zoo_path, method):
    path = zoo_path("tiny-llama")
    model = load_model(path).model
    calib = load_calibration("builtin", model, samples=4, seqlen=32)
    spec = f"nm:method={method},reconstruct=block,min_params=0"
    (record,) = run_passes(model, parse_pass_specs(spec), PassContext(calibration=calib))
    exits = [s for s in record.changed if "block_error" in s.details]
    assert sorted(s.site.rsplit(".", 1)[-1] for s in exits) == ["down_proj", "down_proj", "o_proj", "o_proj"]
    assert all(s.details["block_error"] < s.details["block_error_method"] for s in exits)
    assert "reconstruct=block: 4 block exits refit to the dense blocks" in record.notes
    sites = {s.label: s for n in all_nodes(model) if n.op_type == "MatMul" and (s := patterns.match_linear_weight(n))}
    for s in record.changed:
        assert is_nm(sites[s.site].to_matrix(sites[s.site].weight.numpy()), 2, 4, axis=1)
    # The first block's dense input is the model's own: its target is the dense model's o_proj input.
    first = next(s for s in exits if s.site.endswith("layers.0.self_attn.o_proj"))
    o_node = sites[first.site].node
    x_pruned = np.concatenate([a.reshape(-1, a.shape[-1]) for a in StagedRunner(model, calib.feeds).capture(o_node.inputs[0])])
    dense = load_model(path).model
    x_dense = np.concatenate([a.reshape(-1, a.shape[-1]) for a in
                              StagedRunner(dense, calib.feeds).capture(_feeds_and_value(dense, o_node.inputs[0].name))])
    w_new = sites[first.site].weight.numpy()
    w = next(s for n in all_nodes(dense) if (s := patterns.match_linear_weight(n)) and s.label == first.site).weight.numpy()
    measured = np.linalg.norm(x_pruned @ w_new - x_dense @ w) / np.linalg.norm(x_dense @ w)
    assert first.details["block_error"] == pytest.approx(measured, rel=1e-3)


def test_reconstruction_needs_calibration_and_pruned_targets(zoo_path):
    model = load_model(zoo_path("tiny-llama")).model
    with pytest.raises(OptionError, match="reconstruct=block needs"):
        run_passes(model, parse_pass_specs("nm:reconstruct=block,min_params=0"), PassContext())
    with pytest.raises(OptionError, match="targets=pruned"):
        parse_pass_specs("unstructured:method=sparsegpt,targets=dense,reconstruct=block")
    with pytest.raises(OptionError, match="rank / rank_ratio"):
        parse_pass_specs("nm:method=wanda,reconstruct=block,rank_ratio=0.1")


def test_refined_masks_are_the_ones_refit(zoo_path):
    """refine=dsnot with reconstruct=block: the exits' refined masks are refit (the refit keeps
    each mask, so the refined layout holds), and both figures are reported."""
    model = load_model(zoo_path("tiny-llama")).model
    calib = load_calibration("builtin", model, samples=4, seqlen=32)
    spec = "nm:method=wanda,refine=dsnot,reconstruct=block,min_params=0"
    (record,) = run_passes(model, parse_pass_specs(spec), PassContext(calibration=calib))
    exits = [s for s in record.changed if "block_error" in s.details]
    assert len(exits) == 4 and all("refine" in s.details for s in exits)
    assert all(s.details["block_error"] < s.details["block_error_method"] for s in exits)
    assert record.extra["refine"]["objective_after"] <= record.extra["refine"]["objective_before"]
    sites = {s.label: s for n in all_nodes(model) if n.op_type == "MatMul" and (s := patterns.match_linear_weight(n))}
    for s in record.changed:
        assert is_nm(sites[s.site].to_matrix(sites[s.site].weight.numpy()), 2, 4, axis=1)


def test_refit_falls_back_to_numpy_when_the_gram_block_is_not_positive_definite(monkeypatch):
    import torch

    x_pruned, x_dense, w = _problem(seed=3)
    stat = _target(x_pruned, x_dense, w)
    mask = nm_mask(np.abs(w), 2, 4, axis=1)
    expected = stat.refit(mask, damp=0.0)
    real = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda a: (real(a)[0], torch.ones(a.shape[0], dtype=torch.int32)))
    np.testing.assert_allclose(stat.refit(mask, damp=0.0), expected, rtol=1e-6, atol=1e-8)
