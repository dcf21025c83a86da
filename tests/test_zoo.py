"""The example models: each builder exports a model ORT runs, equal to its torch original."""

import numpy as np
import onnx
import pytest

from sparsec.model_io import load_model
from sparsec.models import entries, entry_for, text
from sparsec.runtime.session import create_session, run


def test_text_splits_are_disjoint_and_deterministic():
    cal, ev = text.text("calibration"), text.text("evaluation")
    assert len(cal) > 100_000 and len(ev) > 100_000
    assert cal[-200:] not in ev
    s = text.sentences("evaluation", 32)
    assert s == text.sentences("evaluation", 32) and all(8 <= len(x.split()) <= 40 for x in s)
    assert not set(s) & set(text.sentences("calibration", 200))


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama", "cnn", "minilm"])
def test_builders_export_runnable_models(zoo_path, name):
    path = zoo_path(name)
    onnx.checker.check_model(str(path), full_check=True)
    loaded = load_model(path)
    entry = entry_for(loaded.model.metadata_props)
    assert entry is entries()[name]
    if entry.real_inputs is not None:
        feeds = entry.real_inputs(1)
        out = run(create_session(path), feeds[0])
        assert all(np.isfinite(v).all() for v in out.values())


def test_minilm_export_matches_sentence_transformers(zoo_path):
    """The ONNX MiniLM gives the same sentence embeddings as the original PyTorch model."""
    from sentence_transformers import SentenceTransformer

    from sparsec.metrics import mean_pool
    from sparsec.models.bert import encode, minilm_dir

    sentences = text.sentences("evaluation", 8)
    reference = SentenceTransformer(str(minilm_dir()), device="cpu").encode(sentences)
    feeds = encode(sentences)
    hidden = run(create_session(zoo_path("minilm")), feeds)["last_hidden_state"]
    ours = mean_pool(hidden, feeds["attention_mask"])
    cos = (ours * reference).sum(-1) / np.linalg.norm(reference, axis=-1)
    assert cos.min() > 0.99999
