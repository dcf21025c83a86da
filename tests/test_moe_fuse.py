"""moe-fuse: transformers' exported MoE blocks (Mixtral, Qwen2-MoE, OLMoE) -> com.microsoft.MoE,
exact; tied routers stay the model's choice; other expert forms skipped with their code."""

import numpy as np
import onnx_ir as ir
import pytest

from sparsec.cli import main
from sparsec.model_io import load_model, save_model
from sparsec.passes.patterns import Code
from sparsec.pipeline import PassContext, parse_pass_specs, run_passes
from tests.helpers import run_ort

MODELS = ["tiny-mixtral", "tiny-qwen2-moe", "tiny-olmoe"]


def fuse(path, out):
    model = load_model(path).model
    (record,) = run_passes(model, parse_pass_specs("moe-fuse"), PassContext())
    return record, save_model(model, out), model


def ids(batch, seq, seed=0):
    return {"input_ids": np.random.default_rng(seed).integers(0, 30000, (batch, seq), dtype=np.int64)}


def ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


@pytest.mark.parametrize("name", MODELS)
def test_exported_moe_blocks_become_one_kernel_each_and_stay_exact(zoo_path, tmp_path, name):
    src = zoo_path(name)
    record, out, model = fuse(src, tmp_path / "fused.onnx")
    assert len(record.changed) == 2 and not record.skipped
    assert ops(model).count("MoE") == 2 and "GatherND" not in {
        n.op_type for n in model.graph if n.inputs and n.inputs[0] is not None and n.inputs[0].is_initializer()}
    renorm = {s.details["renormalized"] for s in record.changed}
    assert renorm == ({True} if name == "tiny-mixtral" else {False})
    for feed in (ids(2, 37), ids(1, 1, seed=1), ids(3, 5, seed=2)):  # prompt, one token, odd sizes
        want, got = run_ort(src, feed)[0], run_ort(out, feed)[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        assert np.abs(want).max() > 0.1  # the comparison is not between near-zero logits
    assert main(["verify", str(src), str(out), "--seed", "3"]) == 0


def test_tied_router_scores_keep_the_models_choice(zoo_path, tmp_path):
    """With every router logit equal, TopK's tie-break picks the experts; the fused graph keeps
    that TopK, so the kernel cannot pick others (its own tie-break differs on CPU and CUDA)."""
    loaded = load_model(zoo_path("tiny-olmoe")).model
    for name, value in loaded.graph.initializers.items():
        if name.endswith("mlp.gate.weight"):
            value.const_value = ir.tensor(np.zeros(value.shape.numpy(), np.float32), name=name)
    tied = save_model(loaded, tmp_path / "tied.onnx")
    _, out, _ = fuse(tied, tmp_path / "fused.onnx")
    feed = ids(2, 9)
    np.testing.assert_allclose(run_ort(out, feed)[0], run_ort(tied, feed)[0], rtol=1e-4, atol=1e-5)


def test_other_expert_forms_are_skipped_with_their_code(zoo_path, tmp_path):
    model = load_model(zoo_path("tiny-mixtral")).model
    sigmoids = [n for n in model.graph if n.op_type == "Sigmoid"]
    sigmoids[0].op_type = "Tanh"  # layer 0: experts with another activation
    squeezes = [n for n in model.graph if n.op_type == "Squeeze" and n.inputs[0].producer().op_type == "MatMul"
                and any(u.node.op_type == "Mul" for u in n.outputs[0].uses())]
    scale = next(u.node for u in squeezes[1].outputs[0].uses() if u.node.op_type == "Mul")
    scale.replace_input_with(1, scale.inputs[0])  # layer 1: outputs not scaled by the routing weights
    (record,) = run_passes(model, parse_pass_specs("moe-fuse"), PassContext())
    assert not record.changed
    assert record.skip_counts() == {Code.ACTIVATION_UNSUPPORTED: 1, Code.EXPERTS_UNMATCHED: 1}, record.skip_counts()
    model = load_model(zoo_path("tiny-mixtral")).model
    (record,) = run_passes(model, parse_pass_specs("moe-fuse:exclude=*layers.1*"), PassContext())
    assert len(record.changed) == 1 and record.skip_counts() == {Code.EXCLUDED: 1}
